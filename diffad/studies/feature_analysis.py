"""Measurements of backbone features: how many dimensions they use, how hard they are to predict.

The paper chose EfficientNet features for its feature branch because ResNet / WideResNet
features are "high-dimensional and hard to reconstruct". The feature-extraction chapter
measures that claim instead of repeating it, with two tools:

* **Effective dimensionality** -- treat every grid position of every image as one sample of a
  C-dimensional vector and run PCA: :func:`explained_variance` gives the variance ratios,
  :func:`components_for_variance` the number of principal components that carry a given
  fraction of the variance, and :func:`low_rank_error` how much of the variance of *held-out*
  images a rank-k projection fitted on training images misses.
* **Predictability from a noisy image** -- what the denoiser's feature head must do:
  :func:`prediction_error` trains one small convolutional predictor (the same for every
  backbone) to map a lightly noised image to the backbone's features of the clean image, and
  reports the fraction of variance it leaves unexplained on held-out images (0 = perfect,
  1 = no better than predicting the channel mean), overall and per stage.

:func:`pca_rgb` shows a feature map as a picture (its top three principal components as RGB).
Features are (N, C, H, W) tensors, e.g. the output of
:class:`diffad.backbones.FeatureExtractor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffad.checks import check_images
from diffad.diffusion import get_named_beta_schedule

__all__ = [
    "PredictionResult",
    "components_for_variance",
    "explained_variance",
    "low_rank_error",
    "pca_rgb",
    "positions",
    "prediction_error",
]

MAX_POSITIONS = 50_000  # default sample of grid positions for the PCA measurements


# --------------------------------------------------------------------------- PCA


def positions(features: torch.Tensor, max_positions: int | None = None, seed: int = 0) -> torch.Tensor:
    """(N, C, H, W) feature maps -> (P, C) float64 rows, one per grid position (on the GPU if they are).

    With ``max_positions``, at most that many positions are drawn at random (seeded, without
    replacement) before anything is copied, so large maps (256 px, 1792 channels) stay cheap.
    """
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 4:
        raise ValueError(f"features must have shape (N, C, H, W), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got dtype {features.dtype}")
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                      or max_positions < 2):
        raise ValueError(f"max_positions must be an int >= 2 or None, got {max_positions!r}")
    n, channels, height, width = features.shape
    total = n * height * width
    features = features.detach()
    if features.device.type not in ("cpu", "cuda"):  # e.g. MPS has no float64
        features = features.cpu()
    if max_positions is not None and total > max_positions:
        chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_positions]
        chosen = chosen.to(features.device)
        index_n, rest = chosen // (height * width), chosen % (height * width)
        rows = features[index_n, :, rest // width, rest % width].double()
    else:
        rows = features.double().permute(0, 2, 3, 1).reshape(-1, channels)
    if rows.shape[0] < 2:
        raise ValueError("need at least two feature vectors (positions) to measure variance")
    if not torch.isfinite(rows).all():
        raise ValueError("features contain NaN or infinite values")
    return rows


def _principal_axes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, eigenvalues (descending) and eigenvectors (columns) of the rows' covariance."""
    mean = rows.mean(0)
    centred = rows - mean
    covariance = centred.T @ centred / (rows.shape[0] - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return mean, eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)


def explained_variance(features: torch.Tensor, max_positions: int | None = MAX_POSITIONS) -> np.ndarray:
    """Fraction of the total variance along each principal component, descending (sums to 1)."""
    _, eigenvalues, _ = _principal_axes(positions(features, max_positions))
    total = float(eigenvalues.sum())
    if total <= 0:
        raise ValueError("features have zero variance: every position holds the same vector")
    return (eigenvalues / total).cpu().numpy()


def components_for_variance(features: torch.Tensor, fraction: float, max_positions: int | None = MAX_POSITIONS) -> int:
    """The fewest principal components whose variance reaches ``fraction`` of the total."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    cumulative = np.cumsum(explained_variance(features, max_positions))
    # A tiny tolerance so that fraction=1.0 is reached despite rounding.
    return int(min(np.searchsorted(cumulative, fraction - 1e-12) + 1, len(cumulative)))


def low_rank_error(
    train_features: torch.Tensor, test_features: torch.Tensor, rank: int, max_positions: int | None = MAX_POSITIONS
) -> float:
    """Fraction of the test features' variance that a rank-``rank`` PCA of the training features misses.

    The projection (mean and top principal axes) is fitted on ``train_features`` only, so this
    measures how well a low-dimensional model of normal features generalises to new images:
    ``||x - mean - P (x - mean)||^2 / ||x - mean_test||^2`` summed over test positions.
    """
    train_rows = positions(train_features, max_positions)
    test_rows = positions(test_features, max_positions, seed=1)
    if train_rows.shape[1] != test_rows.shape[1]:
        raise ValueError(f"train and test features differ in channels: {train_rows.shape[1]} vs {test_rows.shape[1]}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank <= train_rows.shape[1]:
        raise ValueError(f"rank must be an int in [0, {train_rows.shape[1]}] (the channels), got {rank!r}")
    mean, _, axes = _principal_axes(train_rows)
    centred = test_rows - mean
    kept = axes[:, : int(rank)]
    residual = centred - (centred @ kept) @ kept.T
    total = float(((test_rows - test_rows.mean(0)) ** 2).sum())
    if total <= 0:
        raise ValueError("test features have zero variance")
    return float((residual**2).sum()) / total


def pca_rgb(features: torch.Tensor, reference: torch.Tensor | None = None) -> np.ndarray:
    """Feature maps as pictures: the top three principal components as R, G, B in [0, 1].

    ``features`` (N, C, H, W) -> (N, H, W, 3). The axes and the colour scale (1st-99th
    percentile per component) come from ``reference`` (default: ``features`` itself), so
    several images share one colouring.
    """
    reference = features if reference is None else reference
    ref_rows = positions(reference, MAX_POSITIONS)
    if ref_rows.shape[1] < 3:
        raise ValueError(f"pca_rgb needs at least 3 channels, got {ref_rows.shape[1]}")
    rows = positions(features)
    if rows.shape[1] != ref_rows.shape[1]:
        raise ValueError(f"features and reference differ in channels: {rows.shape[1]} vs {ref_rows.shape[1]}")
    mean, _, axes = _principal_axes(ref_rows)
    ref_scores = ((ref_rows - mean) @ axes[:, :3]).cpu().numpy()
    lo, hi = np.percentile(ref_scores, 1, axis=0), np.percentile(ref_scores, 99, axis=0)
    scores = ((rows - mean) @ axes[:, :3]).cpu().numpy()
    rgb = np.clip((scores - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    n, _, height, width = features.shape
    return rgb.reshape(n, height, width, 3).astype(np.float32)


# ----------------------------------------------------------------- predictability


@dataclass
class PredictionResult:
    """Held-out error of predicting clean-image features from a noisy image.

    ``fvu``: fraction of variance unexplained, averaged over channels (each channel
    standardised, as the cpu preset's feature loss weighs them); ``fvu_per_group``: the
    same per channel group (e.g. per backbone stage); ``losses``: the training loss per step.
    """

    fvu: float
    fvu_per_group: list[float]
    channels: int
    losses: list[float] = field(repr=False)


class _Predictor(nn.Module):
    """A small, fixed conv net: image -> features on a grid ``stride`` times coarser.

    The image is first folded into the grid (pixel unshuffle: each ``stride`` x ``stride``
    patch becomes one position with ``3 * stride**2`` channels), so every convolution runs at
    the feature grid's resolution and the measurement stays cheap on a CPU.
    """

    def __init__(self, out_channels: int, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.net = nn.Sequential(
            nn.Conv2d(3 * stride * stride, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        out = self.net(F.pixel_unshuffle(images, self.stride))
        if tuple(out.shape[-2:]) != grid:
            out = F.interpolate(out, size=grid, mode="bilinear", align_corners=False)
        return out


@torch.no_grad()
def _features(extractor, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([extractor(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)])


def prediction_error(
    extractor,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    steps: int = 300,
    batch_size: int = 16,
    max_timestep: int = 300,
    width: int = 64,
    lr: float = 2e-3,
    groups: Sequence[int] | None = None,
    seed: int = 0,
    device=None,
) -> PredictionResult:
    """Train a small conv net to predict ``extractor``'s features of clean images from noisy ones.

    Images are in [-1, 1]. Each step noises a batch like the diffusion's forward process,
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with t uniform below ``max_timestep`` of the
    linear 1000-step schedule, and regresses the features of ``x_0`` (each channel standardised
    with the training images' statistics). The same network, steps and data serve every
    backbone, so the held-out error compares how hard their features are to reconstruct.
    ``groups``: channel counts that split the features (e.g. ``extractor.channels``, per stage).
    """
    train_images = check_images(train_images, "train_images", value_range=(-1.0, 1.0))
    test_images = check_images(test_images, "test_images", value_range=(-1.0, 1.0))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 1 <= max_timestep <= 1000:
        raise ValueError(f"max_timestep must be in [1, 1000], got {max_timestep!r}")
    if device is None:
        parameter = next(iter(extractor.parameters()), None) if isinstance(extractor, nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    train_targets, test_targets, groups = _standardised_targets(extractor, train_images, test_images, groups, device)
    channels, grid = train_targets.shape[1], tuple(train_targets.shape[-2:])

    stride = max(1, min(train_images.shape[-2] // grid[0], train_images.shape[-1] // grid[1]))
    predictor = _Predictor(channels, width, stride).to(device)
    optimiser = torch.optim.Adam(predictor.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / steps)
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - get_named_beta_schedule("linear", 1000)), dtype=torch.float32)

    def noised(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, max_timestep, (len(images),), generator=gen)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn(images.shape, generator=gen)
        return (abar.sqrt() * images.cpu() + (1 - abar).sqrt() * noise).to(device)

    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(train_images), (batch_size,), generator=generator)
        prediction = predictor(noised(train_images[index], generator), grid)
        loss = F.mse_loss(prediction, train_targets[index].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))

    predictor.eval()
    test_generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        predictions = torch.cat([
            predictor(noised(test_images[i : i + 32], test_generator), grid) for i in range(0, len(test_images), 32)
        ])
    overall, per_group = _unexplained(predictions, test_targets.to(device), groups)
    return PredictionResult(overall, per_group, channels, losses)


def _standardised_targets(extractor, train_images, test_images, groups, device):
    """Backbone features of both image sets, each channel z-scored with the training statistics,
    and the channel groups (all channels in one group when ``groups`` is None)."""
    train_targets = _features(extractor, train_images, 32, device)
    test_targets = _features(extractor, test_images, 32, device)
    channels = train_targets.shape[1]
    groups = [channels] if groups is None else [int(g) for g in groups]
    if sum(groups) != channels or min(groups) < 1:
        raise ValueError(f"groups {groups} must be positive and sum to the features' {channels} channels")
    mean = train_targets.mean(dim=(0, 2, 3), keepdim=True)
    std = train_targets.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train_targets - mean) / std, (test_targets - mean) / std, groups


def _unexplained(predictions: torch.Tensor, targets: torch.Tensor, groups) -> tuple[float, list[float]]:
    """Fraction of the targets' variance left unexplained, overall and per channel group.

    Per group: summed squared error over summed variance. Channels are standardised, so each
    varying channel counts about equally, and a constant (dead) channel adds nothing to either.
    """
    squared_error = ((predictions - targets) ** 2).mean(dim=(0, 2, 3)).cpu().double()
    variance = targets.var(dim=(0, 2, 3), correction=0).cpu().double()
    if float(variance.sum()) <= 0:
        raise ValueError("the test images' features do not vary: cannot measure explained variance")

    def fvu(error: torch.Tensor, var: torch.Tensor) -> float:
        return float(error.sum() / var.sum()) if float(var.sum()) > 0 else float("nan")

    per_group = [fvu(e, v) for e, v in zip(squared_error.split(groups), variance.split(groups))]
    return fvu(squared_error, variance), per_group
