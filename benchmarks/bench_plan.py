"""Device plans of the paper preset for the GPUs people use, and the paper UNet's real step on this CPU.

    python benchmarks/bench_plan.py               # the plan table (about 2 minutes, no GPU needed)
    python benchmarks/bench_plan.py --cpu-step    # also one real full-size training step here

The table: for a T4 16 GB (Colab), L4 24 GB, A100 40 GB and 80 GB, the precision, gradient
checkpointing and EMA placement ``plan_training`` chooses, the estimated peak memory of one
training step (a real step on fake tensors) against the memory less 1 GiB, and the time per
category at an assumed 35% of the chip's peak FLOP/s; then the cpu preset on this machine.

``--cpu-step`` builds the paper UNet at full size (554M parameters, 256 px, batch 1) with real
weights on this CPU, runs one forward pass and one AdamW training step (fp32, gradient
checkpointing), and prints their times, the process's peak RSS growth, and the fake-tensor
estimate of the same step beside it.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from diffad.backbones import FeatureExtractor
from diffad.device import ACCELERATORS, GIB
from diffad.presets import get_preset
from diffad.device_plan import plan_training
from diffad.models.denoiser import build_diffusion, build_unet
from diffad.step import Batch, make_optimizer, training_step

PAPER_FEATURE_CHANNELS = 24 + 32 + 56 + 160  # EfficientNet-b4 stages 1-4, as the authors tap them
GPUS = ("T4", "L4", "A100-40GB", "A100-80GB")


def plan_table() -> list[str]:
    rows = ["| GPU | precision | grad. checkpointing | EMA | est. peak GiB | budget GiB | fits | s/step | h/category |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in GPUS:
        gpu = ACCELERATORS[name]
        plan = plan_training("paper", memory_gib=gpu.memory_gib, compute_capability=gpu.compute_capability,
                             feature_channels=PAPER_FEATURE_CHANNELS)
        scaler = " + GradScaler" if plan.precision.needs_grad_scaler else ""
        rows.append(f"| {name} {gpu.memory_gib:.1f} GiB | {plan.precision.value}{scaler} | "
                    f"{'yes' if plan.gradient_checkpointing else 'no'} | {plan.ema_device} | "
                    f"{plan.peak_bytes / GIB:.1f} | {plan.budget_bytes / GIB:.1f} | {'yes' if plan.fits else 'NO'} | "
                    f"{plan.seconds_per_step:.2f} | {plan.hours_per_model:.1f} |")
    cpu = get_preset("cpu")
    channels = FeatureExtractor(cpu.backbone, pretrained=False).out_channels
    plan = plan_training(cpu, "cpu", feature_channels=channels)
    rows.append(f"| this CPU (cpu preset) | {plan.precision.value} | no | beside the weights | "
                f"{plan.peak_bytes / GIB:.2f} | - | - | - | - |")
    return rows


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_step() -> list[str]:
    """One real forward and one real training step of the full-size paper UNet on this CPU."""
    preset = get_preset("paper", batch_size=1, gradient_checkpointing=True, precompute_features=True)
    plan = plan_training(preset, "cpu", feature_channels=PAPER_FEATURE_CHANNELS)
    rss0 = _rss_bytes()
    torch.manual_seed(0)
    unet = build_unet(preset, PAPER_FEATURE_CHANNELS, 1, gradient_checkpointing=True)
    ema = build_unet(preset, PAPER_FEATURE_CHANNELS, 1).requires_grad_(False)
    optimizer = make_optimizer(unet, preset, "cpu")
    diffusion = build_diffusion(preset)
    x0 = torch.rand(1, 3, 256, 256) * 2 - 1
    batch = Batch(x0, torch.tensor([200]), torch.randn_like(x0), torch.randn(1, PAPER_FEATURE_CHANNELS, 64, 64),
                  torch.tensor([0]))
    start = time.perf_counter()
    with torch.no_grad():
        unet.eval()(x0, batch.t, y=batch.y, return_features=True)
    forward_s = time.perf_counter() - start
    unet.train()
    start = time.perf_counter()
    training_step(unet, optimizer, diffusion, batch, lr=preset.lr, feature_loss_weight=1.0,
                  grad_clip=preset.grad_clip, ema=ema, ema_rate=preset.ema_rate)
    step_s = time.perf_counter() - start
    grown = _rss_bytes() - rss0
    return [f"paper UNet on this CPU ({torch.get_num_threads()} threads), 256 px, batch 1, fp32: "
            f"forward {forward_s:.1f} s; first training step with checkpointing {step_s:.1f} s",
            f"peak RSS growth {grown / GIB:.2f} GiB (the first step also creates AdamW's state); "
            f"fake-tensor estimate of a steady step: {plan.peak_bytes / GIB:.2f} GiB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-step", action="store_true")
    args = parser.parse_args()
    print("\n".join(plan_table()), flush=True)
    if args.cpu_step:
        print("\n".join(cpu_step()))


if __name__ == "__main__":
    main()
