"""Speed of the cpu preset here, and the size of the paper preset (counted, not timed).

    python benchmarks/bench_model.py [--steps 10] [--precision auto|fp32|bf16]

Prints: training steps/s and scoring UNet passes/s of the cpu preset on this machine (random
data, so no dataset is needed); parameter count and FLOPs of one paper-preset UNet forward at
256x256 (built on the meta device: no memory, no weights), and UNet passes per scored image.
The training step is :func:`diffad.step.training_step` as ``diffad train`` runs it (both losses,
gradient clipping, AdamW, the EMA), in the precision and memory layout of the run's plan: on a
CPU with AVX512-BF16 or AMX, ``--precision bf16`` times the faster opt-in.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffad.backbones import FeatureExtractor, backbone_info
from diffad.device import PRECISION_CHOICES
from diffad.device_plan import plan_training
from diffad.models import count_parameters
from diffad.models.denoiser import build_diffusion, build_unet
from diffad.presets import get_preset
from diffad.step import Batch, draw_batch, make_optimizer, training_step


def time_training(preset, plan, feature_channels: int, steps: int) -> float:
    """Seconds per optimisation step of :func:`training_step` under ``plan`` (its precision and
    layout), after 2 warm-up steps (the first steps allocate and choose kernels)."""
    unet = build_unet(preset, feature_channels, None)
    ema = copy.deepcopy(unet).requires_grad_(False)
    if plan.channels_last:
        unet.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(unet, preset, "cpu")
    diffusion = build_diffusion(preset)
    generator = torch.Generator().manual_seed(0)
    size, grid = preset.image_size, preset.image_size // 4
    max_t = preset.max_train_timestep or diffusion.num_timesteps
    times = []
    for i in range(steps + 2):
        x0 = torch.rand(preset.batch_size, 3, size, size, generator=generator) * 2 - 1
        _, t, noise = draw_batch(generator, 1, preset.batch_size, max_t, x0.shape[1:])
        target = torch.randn(preset.batch_size, feature_channels, grid, grid, generator=generator)
        start = time.perf_counter()
        training_step(unet, optimizer, diffusion, Batch(x0, t, noise, target), lr=preset.lr,
                      feature_loss_weight=preset.feature_loss_weight, grad_clip=preset.grad_clip,
                      precision=plan.precision, ema=ema, ema_rate=preset.ema_rate,
                      channels_last=plan.channels_last, check_finite=False)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


@torch.no_grad()
def time_scoring_pass(preset, feature_channels: int, repeats: int) -> float:
    """Seconds per UNet pass on a scoring batch (one pass per image and timestep)."""
    unet = build_unet(preset, feature_channels, None).eval()
    x = torch.randn(preset.score_batch_size, 3, preset.image_size, preset.image_size)
    t = torch.full((preset.score_batch_size,), 10)
    unet(x, t, return_features=True)
    start = time.perf_counter()
    for _ in range(repeats):
        unet(x, t, return_features=True)
    return (time.perf_counter() - start) / repeats


def paper_size() -> tuple[int, int, int]:
    """Parameters (1000 and 15 classes) and FLOPs of one paper-preset forward at 256x256, on meta."""
    preset = get_preset("paper")
    channels = sum(s["channels"] for s in backbone_info(preset.backbone)[:4])
    with torch.device("meta"):
        imagenet = build_unet(preset, channels, 1000)
        mvtec = build_unet(preset, channels, 15)
        x = torch.randn(1, 3, 256, 256)
        t = torch.tensor([10])
        y = torch.tensor([0])
        counter = FlopCounterMode(display=False)
        with counter:
            mvtec(x, t, y=y, return_features=True)
    return count_parameters(imagenet), count_parameters(mvtec), counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="of the training step (auto: fp32 on a CPU, as the shipped models)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cpu = get_preset("cpu", precision=args.precision)
    channels = FeatureExtractor(cpu.backbone, pretrained=False).out_channels
    plan = plan_training(cpu, "cpu", feature_channels=channels, estimate=False)
    step = time_training(cpu, plan, channels, args.steps)
    score = time_scoring_pass(cpu, channels, args.steps)
    n_t = len(cpu.test_timesteps)
    layout = "channels-last" if plan.channels_last else "NCHW"
    print(f"cpu preset ({cpu.image_size}px, batch {cpu.batch_size}, {torch.get_num_threads()} threads, "
          f"{plan.precision.value} {layout}): "
          f"{1 / step:.2f} training steps/s ({step:.2f} s/step; {cpu.train_steps} steps = {cpu.train_steps * step / 60:.1f} min)")
    per_pass = score / cpu.score_batch_size
    print(f"cpu preset scoring: {1 / per_pass:.1f} UNet passes/s per image; {n_t} timesteps -> "
          f"{n_t * per_pass:.3f} s per image (UNet only)")
    params_1000, params_15, flops = paper_size()
    paper = get_preset("paper")
    print(f"paper preset UNet: {params_1000:,} parameters with 1000 classes, {params_15:,} with 15 (MVTec)")
    print(f"paper preset: {flops / 1e9:.1f} GFLOPs per 256x256 forward (diffusion output and features together)")
    print(f"paper preset scoring: {len(paper.test_timesteps)} UNet passes per image "
          f"(one per timestep; the authors' code spends {2 * len(paper.test_timesteps)})")


if __name__ == "__main__":
    main()
