"""Speed of the cpu preset here, and the size of the paper preset (counted, not timed).

    python benchmarks/bench_model.py [--steps 10]

Prints: training steps/s and scoring UNet passes/s of the cpu preset on this machine (random
data, so no dataset is needed); parameter count and FLOPs of one paper-preset UNet forward at
256x256 (built on the meta device: no memory, no weights), and UNet passes per scored image.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffad.backbones import FeatureExtractor, backbone_info
from diffad.models import count_parameters
from diffad.presets import get_preset
from diffad.models.denoiser import build_diffusion, build_unet


def time_training(preset, feature_channels: int, steps: int) -> float:
    """Seconds per optimisation step (forward, both losses, backward, AdamW), after 2 warm-up steps."""
    unet = build_unet(preset, feature_channels, None)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=preset.lr)
    diffusion = build_diffusion(preset)
    x0 = torch.rand(preset.batch_size, 3, preset.image_size, preset.image_size) * 2 - 1
    grid = preset.image_size // 4
    target = torch.randn(preset.batch_size, feature_channels, grid, grid)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        t = torch.randint(preset.max_train_timestep or 1000, (preset.batch_size,))
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        output, features = unet(x_t, t, return_features=True)
        loss = diffusion.training_losses_from_output(output, x0, x_t, t, noise)["loss"].mean()
        loss = loss + F.mse_loss(features, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
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
    args = parser.parse_args()
    torch.manual_seed(0)
    cpu = get_preset("cpu")
    channels = FeatureExtractor(cpu.backbone, pretrained=False).out_channels
    step = time_training(cpu, channels, args.steps)
    score = time_scoring_pass(cpu, channels, args.steps)
    n_t = len(cpu.test_timesteps)
    print(f"cpu preset ({cpu.image_size}px, batch {cpu.batch_size}, {torch.get_num_threads()} threads): "
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
