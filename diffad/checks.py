"""Input checks shared by training, scoring, the probes and the baselines: one place, one wording.

Every public function that takes images calls :func:`check_images`, so a wrong shape, dtype,
size or value range is a ValueError that names the argument and says what was expected,
never a traceback deep inside torch. This module imports nothing else from diffad.
"""

from __future__ import annotations

import torch

__all__ = ["check_images"]

_TOLERANCE = 1e-4


def check_images(images, what: str = "images", image_size: int | None = None,
                 value_range: tuple[float, float] | None = (0.0, 1.0), allow_empty: bool = False,
                 channels: tuple[int, ...] = (3,)) -> torch.Tensor:
    """``images`` as a float tensor (N, 3, H, W), else a ValueError naming ``what``.

    ``image_size``: the side a trained model expects; ``value_range``: the range the values must
    lie in ((0, 1) for images as diffad.data returns them, (-1, 1) for the diffusion's range,
    None for anything, e.g. noisy x_t); ``channels``: the channel counts accepted ((1, 3): grey too).
    """
    scale = "" if value_range is None else f" in [{value_range[0]:g}, {value_range[1]:g}]"
    shape = " or ".join(f"(N, {c}, H, W)" for c in channels)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor {shape}{scale}, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in channels:
        raise ValueError(f"{what} must be a float tensor {shape}{scale}; got shape {tuple(images.shape)}")
    if images.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{what} is empty (N = 0)")
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"{what} are {tuple(images.shape[-2:])} but the model was trained at {image_size}x{image_size}; "
            f"load the dataset with image_size={image_size}")
    if not images.is_floating_point():
        raise ValueError(f"{what} must be floating point{scale}, got dtype {images.dtype}")
    if value_range is not None and images.numel():
        low, high = float(images.min()), float(images.max())
        if low < value_range[0] - _TOLERANCE or high > value_range[1] + _TOLERANCE:
            hint = " (diffad.data returns them so; diffad maps them to [-1, 1] itself)" if value_range == (0.0, 1.0) else ""
            raise ValueError(f"{what} must lie in{scale}{hint}, got values in [{low:.3g}, {high:.3g}]")
    return images.float()
