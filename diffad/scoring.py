"""Test-time scores: the KL map, the RGB map, the feature map, their ensemble, image scores.

For each test timestep t the clean image x0 is noised once to x_t and the UNet runs **once**.
That one pass gives

* the **KL map**: per element, D_KL( q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t) ) in bits,
  with the predicted x0 clipped to [-1, 1], averaged over the colour channels. Where the noise
  "hid" an anomaly, the model's reverse step disagrees with the true posterior;
* the **RGB map** |x0_hat - x0| (the paper's ablation: worse than KL);
* the **feature map**: channel-mean squared error between the feature head's prediction from
  x_t and the backbone's features of x0, upsampled to the image size.

``score_raw`` keeps every map per timestep, so that normalisation, smoothing and the ensemble
weight alpha can be changed afterwards without running the UNet again (``anomaly_maps``).

Timesteps index the scoring schedule (the paper: a 250-step respacing of T = 1000, so
{5, 50, 100} are original steps {20, 201, 401}). ``timestep_mode="consistent"`` (default)
gives both branches the same, mapped timestep in one pass; ``"authors"`` reproduces the
official code, which embeds the raw 5/50/100 for the feature branch while x_t carries the
respaced noise, and so spends a second pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffad.data import to_diffusion_range
from diffad.train import TrainedModel, build_diffusion, build_feature_extractor, check_images, pick_device

MAP_TYPES = ("kl", "rgb", "feature")
NORMALIZATIONS = ("per_image", "validation", "none")
TIMESTEP_MODES = ("consistent", "authors")


@dataclass
class RawMaps:
    """Per-timestep maps of N images: each tensor is (N, K, H, W) for K timesteps, on the CPU."""

    timesteps: tuple[int, ...]
    kl: torch.Tensor
    rgb: torch.Tensor
    feature: torch.Tensor

    def __len__(self) -> int:
        return self.kl.shape[0]

    def get(self, kind: str) -> torch.Tensor:
        if kind not in MAP_TYPES:
            raise ValueError(f"unknown map type {kind!r}; choose from {MAP_TYPES}")
        return getattr(self, kind)


def _noise_for(index: int, seed: int, shape, k: int) -> torch.Tensor:
    """The noise for image ``index`` at its k-th timestep: fixed by (seed, index), not by batching."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn((k,) + tuple(shape), generator=generator)


# The preset fields score_raw reads that shape the raw per-timestep maps (with image_size); the
# others (alpha, normalisation, smoothing, top-k) are applied afterwards by anomaly_maps, and the
# batch size does not change the maps (each image has its own noise).
RAW_MAP_FIELDS = ("timestep_respacing", "test_timesteps", "timestep_mode")


@torch.no_grad()
def score_raw(
    model: TrainedModel,
    images: torch.Tensor,
    category: str | None = None,
    timesteps: tuple[int, ...] | None = None,
    timestep_mode: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device=None,
    extractor=None,
    progress: bool = False,
) -> RawMaps:
    """KL, RGB and feature maps of ``images`` (N, 3, H, W) in [0, 1] at each test timestep."""
    preset = model.preset
    timesteps = tuple(preset.test_timesteps if timesteps is None else timesteps)
    mode = timestep_mode or preset.timestep_mode
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}; got {mode!r}")
    images = check_images(images, preset.image_size)
    diffusion = build_diffusion(preset, preset.timestep_respacing)
    bad = [t for t in timesteps if not 0 <= t < diffusion.num_timesteps]
    if bad or not timesteps:
        raise ValueError(f"test timesteps {list(timesteps)} must lie in [0, {diffusion.num_timesteps}) "
                         f"of the {diffusion.num_timesteps}-step scoring schedule")
    device = pick_device(device)
    unet = model.unet.to(device).eval()
    extractor = extractor if extractor is not None else build_feature_extractor(preset, device)
    model.unet_kwargs(category, 1)  # fails early, naming the categories, when a label is missing
    batch_size = batch_size or preset.score_batch_size
    n, _, h, w = images.shape
    k = len(timesteps)
    out = {kind: torch.empty(n, k, h, w) for kind in MAP_TYPES}
    for start in tqdm(range(0, n, batch_size), desc="score", disable=not progress, leave=False):
        x0 = to_diffusion_range(images[start:start + batch_size]).to(device)
        b = x0.shape[0]
        noise = torch.stack([_noise_for(start + i, seed, x0.shape[1:], k) for i in range(b)], dim=1).to(device)
        target = model.feature_target(extractor(x0))
        label = model.unet_kwargs(category, b, device)
        for j, t_index in enumerate(timesteps):
            t = torch.full((b,), t_index, device=device, dtype=torch.long)
            x_t = diffusion.q_sample(x0, t, noise=noise[j])
            output, features = unet(x_t, diffusion.model_timesteps(t), return_features=True, **label)
            if mode == "authors":  # the official code's feature branch: raw index as timestep
                _, features = unet(x_t, t, return_features=True, **label)
            output = output.float()
            kl = diffusion.kl_map(output, x0, x_t, t, clip_denoised=True)
            pred_x0 = diffusion.p_mean_variance_from_output(output, x_t, t, clip_denoised=True)["pred_xstart"]
            feature_error = (features.float() - target).pow(2).mean(dim=1, keepdim=True)
            out["kl"][start:start + b, j] = kl.mean(dim=1).cpu()
            out["rgb"][start:start + b, j] = (pred_x0 - x0).abs().mean(dim=1).cpu()
            out["feature"][start:start + b, j] = F.interpolate(
                feature_error, size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu()
    return RawMaps(timesteps, out["kl"], out["rgb"], out["feature"])


@dataclass
class Normalizer:
    """Mean and std of each map type at each timestep, over normal validation images."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    @classmethod
    def fit(cls, raw: RawMaps, smoothing_sigma: float = 0.0) -> "Normalizer":
        mean, std = {}, {}
        for kind in MAP_TYPES:
            maps = smooth(raw.get(kind), smoothing_sigma)
            mean[kind] = maps.mean(dim=(0, 2, 3))
            std[kind] = maps.std(dim=(0, 2, 3)).clamp_min(1e-12)
        return cls(mean, std)

    def apply(self, kind: str, maps: torch.Tensor) -> torch.Tensor:
        return (maps - self.mean[kind][None, :, None, None]) / self.std[kind][None, :, None, None]


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (..., H, W) maps, reflecting at the border; sigma 0 is a no-op."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma)
    r = len(kernel) // 2
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.reshape(shape)


def _zscore_per_image(maps: torch.Tensor) -> torch.Tensor:
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    std = maps.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (maps - mean) / std


def normalized(raw: RawMaps, kind: str, normalization: str = "per_image",
               normalizer: Normalizer | None = None, smoothing_sigma: float = 0.0) -> torch.Tensor:
    """One map type, smoothed, normalised and averaged over timesteps: (N, H, W).

    ``per_image`` is the paper's choice: the pixel-level (KL, RGB) maps are z-scored within each
    image and the feature map is left raw. It discards how anomalous the whole image is.
    ``validation`` divides every map type by statistics of normal validation images, which keeps
    that information and puts the two branches on one scale. ``none`` leaves the maps raw.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    maps = smooth(raw.get(kind), smoothing_sigma)
    if normalization == "per_image" and kind != "feature":
        maps = _zscore_per_image(maps)
    elif normalization == "validation":
        if normalizer is None:
            raise ValueError("normalization='validation' needs a Normalizer fitted on normal validation maps")
        maps = normalizer.apply(kind, maps)
    return maps.mean(dim=1)


def anomaly_maps(raw: RawMaps, alpha: float = 0.5, normalization: str = "per_image",
                 normalizer: Normalizer | None = None, smoothing_sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """Final maps (N, H, W): ``kl``, ``rgb``, ``feature`` and ``ensemble`` = alpha*kl + (1-alpha)*feature."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    maps = {kind: normalized(raw, kind, normalization, normalizer, smoothing_sigma) for kind in MAP_TYPES}
    maps["ensemble"] = alpha * maps["kl"] + (1.0 - alpha) * maps["feature"]
    return maps


def image_scores(maps: torch.Tensor, top_k: int = 64) -> torch.Tensor:
    """Image score: mean of the ``top_k`` highest pixels, k given at 256x256 and scaled with the area."""
    n, h, w = maps.shape
    k = max(1, round(top_k * h * w / (256 * 256)))
    return maps.reshape(n, -1).topk(k, dim=1).values.mean(dim=1)
