"""The paper preset on the GPU at hand, measured against its plan: memory, speed, share of peak FLOP/s.

    python benchmarks/gpu_check.py [--steps 10] [--images 16] [--out gpu_check.json]

What runs is what ``diffad.train.fit`` and ``diffad.scoring.score_raw`` run: the device plan
(``diffad.train.plan_training``: precision, GradScaler, gradient checkpointing, where the EMA
lives) picks the settings, the UNet and its EMA are built like ``fit`` builds them, each step is
``diffad.train.training_step`` on random images, and scoring is ``score_raw`` itself (fp32, one
UNet pass per image and timestep, features included). Printed and written to one JSON file:
``torch.cuda.max_memory_allocated`` beside the plan's estimate, training steps/s, scored images/s,
and each as a percentage of the chip's peak FLOP/s (FLOPs counted by torch's FlopCounterMode).

No dataset and no download: the feature head and the scoring backbone use the offline
EfficientNet-Lite0 (its channels stand in for b4's 272; the head is 0.03% of the FLOPs). The
UNet starts from random weights (speed and memory do not depend on them). Under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from diffad.device import GIB, Precision
from diffad.presets import get_preset
from diffad.scoring import score_raw
from diffad.train import (Batch, TrainedModel, build_diffusion, build_feature_extractor, build_unet,
                          make_optimizer, plan_training, training_step)


def forward_flops(preset, feature_channels: int) -> int:
    """FLOPs of one UNet pass of one image (diffusion output and features), counted on fake tensors."""
    with FakeTensorMode(), FlopCounterMode(display=False) as counter:
        unet = build_unet(preset, feature_channels, 1).eval()
        x = torch.randn(1, 3, preset.image_size, preset.image_size)
        with torch.no_grad():
            unet(x, torch.tensor([10]), y=torch.tensor([0]), return_features=True)
    return counter.get_total_flops()


def time_training(plan, extractor, steps: int) -> tuple[float, int, torch.nn.Module]:
    """Seconds per training step, the peak bytes allocated and the EMA, the run built as fit builds it."""
    preset, device = plan.preset, torch.device("cuda")
    channels = extractor.out_channels
    unet = build_unet(preset, channels, 1, plan.gradient_checkpointing).to(device)
    ema = build_unet(preset, channels, 1).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    ema.to(device if plan.ema_device == "device" else "cpu")
    optimizer = make_optimizer(unet, preset, "cuda")
    scaler = torch.amp.GradScaler("cuda") if plan.precision.needs_grad_scaler else None
    if plan.channels_last:
        unet.to(memory_format=torch.channels_last)
    diffusion = build_diffusion(preset)
    b, size = preset.batch_size, preset.image_size

    def batch() -> Batch:
        x0 = torch.rand(b, 3, size, size, device=device) * 2 - 1
        with torch.no_grad():
            target = extractor(x0)
        return Batch(x0, torch.randint(1000, (b,), device=device), torch.randn_like(x0), target,
                     torch.zeros(b, dtype=torch.long, device=device))

    kwargs = dict(lr=preset.lr, feature_loss_weight=preset.feature_loss_weight, grad_clip=preset.grad_clip,
                  precision=plan.precision, scaler=scaler, ema=ema, ema_rate=preset.ema_rate,
                  channels_last=plan.channels_last)
    unet.train()
    for _ in range(3):
        training_step(unet, optimizer, diffusion, batch(), **kwargs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        training_step(unet, optimizer, diffusion, batch(), **kwargs)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated()
    ema.to(device).eval()
    del unet, optimizer
    return seconds, peak, ema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=16, help="images to score")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (benchmarks/bench_plan.py plans for one without it)")
        return 1
    preset = get_preset("paper", backbone="tf_efficientnet_lite0", init_checkpoint=None)
    extractor = build_feature_extractor(preset, "cuda")
    plan = plan_training(preset, "cuda", feature_channels=extractor.out_channels)
    print(f"plan: {plan.describe()}", flush=True)
    step_s, train_peak, ema = time_training(plan, extractor, args.steps)
    peak_flops = plan.accelerator.peak_flops_for(plan.precision)
    train_util = plan.flops_per_step / step_s / peak_flops if peak_flops else None

    model = TrainedModel(preset, ["check"], ema, extractor.out_channels)
    images = torch.rand(args.images, 3, preset.image_size, preset.image_size)
    score_raw(model, images[:2], category="check", device="cuda", extractor=extractor)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    score_raw(model, images, category="check", device="cuda", extractor=extractor)
    torch.cuda.synchronize()
    image_s = (time.perf_counter() - start) / args.images
    score_flops = forward_flops(preset, extractor.out_channels) * len(preset.test_timesteps)
    fp32_peak = plan.accelerator.peak_flops_for(Precision.FP32)
    result = {
        "gpu": plan.accelerator.name, "memory_bytes": plan.accelerator.memory_bytes,
        "compute_capability": list(plan.accelerator.compute_capability), "torch": torch.__version__,
        "plan": plan.to_json(),
        "train_peak_bytes_measured": train_peak, "train_peak_bytes_estimated": plan.peak_bytes,
        "estimate_over_measured": plan.peak_bytes / train_peak,
        "train_seconds_per_step": step_s, "train_steps_per_second": 1 / step_s,
        "train_hours_per_category": step_s * preset.train_steps / 3600,
        "train_share_of_peak_flops": train_util,
        "score_seconds_per_image": image_s, "score_images_per_second": 1 / image_s,
        "score_unet_flops_per_image": score_flops,
        "score_share_of_fp32_peak_flops": score_flops / image_s / fp32_peak if fp32_peak else None,
    }
    print(f"training: {1 / step_s:.2f} steps/s at batch {preset.batch_size} ({result['train_hours_per_category']:.1f} h "
          f"for {preset.train_steps} steps), peak {train_peak / GIB:.2f} GiB measured vs {plan.peak_bytes / GIB:.2f} "
          f"GiB estimated" + (f", {100 * train_util:.0f}% of peak FLOP/s" if train_util else ""))
    print(f"scoring (score_raw, fp32): {1 / image_s:.2f} images/s, {len(preset.test_timesteps)} UNet passes each"
          + (f", {100 * result['score_share_of_fp32_peak_flops']:.0f}% of fp32 peak" if fp32_peak else ""))
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
