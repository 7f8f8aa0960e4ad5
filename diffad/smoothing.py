"""Gaussian smoothing of anomaly maps, shared by the diffusion scores and the baselines.

This module imports nothing else from diffad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "smooth"]


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
