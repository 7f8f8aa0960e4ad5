"""Value-range conversions between image tensors and the diffusion model.

:class:`~diffad.data.MVTecAD` returns images in [0, 1]. The diffusion model, like OpenAI's
guided-diffusion that the paper builds on, works in [-1, 1] (so that pure Gaussian noise and
data have comparable scale). The conversion is kept public and explicit rather than hidden
inside the dataset, so every chapter shows where it happens. Both functions work on torch
tensors and numpy arrays of any shape.
"""

from __future__ import annotations

__all__ = ["to_diffusion_range", "from_diffusion_range"]


def to_diffusion_range(x):
    """Map images from [0, 1] to the diffusion model's [-1, 1]: ``2 x - 1``."""
    return x * 2 - 1


def from_diffusion_range(x, clamp: bool = False):
    """Map model-range images back to [0, 1]: ``(x + 1) / 2``; ``clamp=True`` clips to [0, 1] (for display)."""
    y = (x + 1) / 2
    if clamp:
        y = y.clamp(0, 1) if hasattr(y, "clamp") else y.clip(0, 1)
    return y
