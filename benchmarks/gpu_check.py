"""A short GPU check of the paper preset: one training step and one scoring pass, timed.

    python benchmarks/gpu_check.py [--steps 20] [--batch 2]

Runs on random data (no dataset, no downloads): the paper-size UNet with a 272-channel feature
head (EfficientNet-b4's stages) trains with bf16 autocast and channels-last as diffad.train does,
then scores with one UNet pass per image and timestep. Prints steps/s, passes/s, peak memory.
Exits with a message when no GPU is present.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from diffad.presets import get_preset
from diffad.train import build_diffusion, build_unet

PAPER_FEATURE_CHANNELS = 24 + 32 + 56 + 160  # EfficientNet-b4 stages 1-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 1
    device = torch.device("cuda")
    preset = get_preset("paper", batch_size=args.batch)
    unet = build_unet(preset, PAPER_FEATURE_CHANNELS, 15).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=preset.lr)
    diffusion = build_diffusion(preset)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    x0 = torch.rand(args.batch, 3, 256, 256, device=device) * 2 - 1
    y = torch.zeros(args.batch, dtype=torch.long, device=device)
    target = torch.randn(args.batch, PAPER_FEATURE_CHANNELS, 64, 64, device=device)

    def train_step():
        t = torch.randint(1000, (args.batch,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype):
            output, features = unet(x_t, t, y=y, return_features=True)
        loss = diffusion.training_losses_from_output(output.float(), x0, x_t, t, noise)["loss"].mean()
        loss = loss + F.mse_loss(features.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    torch.cuda.synchronize()
    step = (time.perf_counter() - start) / args.steps
    train_mem = torch.cuda.max_memory_allocated() / 2**30

    unet.eval()
    batch = 8
    x = torch.randn(batch, 3, 256, 256, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 201, device=device)
    yb = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        unet(x, t, y=yb, return_features=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            unet(x, t, y=yb, return_features=True)
        torch.cuda.synchronize()
    per_pass = (time.perf_counter() - start) / (args.steps * batch)
    print(f"{torch.cuda.get_device_name()}: paper preset training {1 / step:.2f} steps/s at batch {args.batch} "
          f"({step * preset.train_steps / 60:.0f} min for {preset.train_steps} steps), peak {train_mem:.1f} GiB")
    print(f"scoring: {1 / per_pass:.1f} UNet passes/s per image; {len(preset.test_timesteps)} timesteps -> "
          f"{len(preset.test_timesteps) * per_pass * 1000:.0f} ms per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
