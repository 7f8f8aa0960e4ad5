"""What SPADE, PaDiM and PatchCore share: the frozen backbone, input checks, maps at image size.

The baselines take images in [0, 1] like :class:`diffad.data.MVTecAD` returns them and
convert them to the backbone's [-1, 1] input with :func:`diffad.data.to_diffusion_range`.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from diffad.backbones import FeatureExtractor
from diffad.checks import check_images
from diffad.data import to_diffusion_range
from diffad.smoothing import smooth
from diffad.device import pick_device

# The PaDiM, SPADE and PatchCore papers blur their maps with sigma 4 at 256x256 (224 crops).
PAPER_SMOOTHING_SIGMA = 4.0
PAPER_IMAGE_SIZE = 256


class Prediction(NamedTuple):
    """Anomaly maps (N, H, W) at image size and image scores (N,), on the CPU."""

    maps: torch.Tensor
    scores: torch.Tensor


def build_extractor(
    backbone: str | FeatureExtractor,
    layers: Sequence[int] | None,
    grid_size: int | None,
    input_size: int | None,
    pretrained: bool,
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a timm name, or the given one unchanged."""
    if isinstance(backbone, FeatureExtractor):
        given = {"layers": layers, "grid_size": grid_size, "input_size": input_size}
        clash = [name for name, value in given.items() if value is not None]
        if clash:
            raise ValueError(
                f"{clash} apply only when backbone is a name; the FeatureExtractor passed in "
                "already fixes them (build it with the settings you want)"
            )
        return backbone
    if not isinstance(backbone, str):
        raise ValueError(f"backbone must be a timm name or a FeatureExtractor, got {type(backbone).__name__}")
    return FeatureExtractor(backbone, layers=layers, grid_size=grid_size, input_size=input_size, pretrained=pretrained)


def smoothing_sigma_for(smoothing_sigma: float | None, height: int, width: int) -> float:
    """The blur in pixels: given, or the papers' sigma 4 at 256 px scaled to this image size."""
    if smoothing_sigma is None:
        return PAPER_SMOOTHING_SIGMA * min(height, width) / PAPER_IMAGE_SIZE
    if smoothing_sigma < 0:
        raise ValueError(f"smoothing_sigma must be >= 0 (0: no blur), got {smoothing_sigma}")
    return float(smoothing_sigma)


def to_image_size(grid_maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(N, h, w) grid scores -> (N, H, W): bilinear upsampling, then a Gaussian blur."""
    maps = F.interpolate(grid_maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return smooth(maps, sigma)


class FeatureBaseline:
    """Common state of a backbone-feature baseline: the extractor, its device, the fitted size."""

    def __init__(
        self,
        backbone: str | FeatureExtractor,
        layers: Sequence[int] | None,
        grid_size: int | None,
        input_size: int | None,
        pretrained: bool,
        smoothing_sigma: float | None,
        device,
        batch_size: int,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        smoothing_sigma_for(smoothing_sigma, PAPER_IMAGE_SIZE, PAPER_IMAGE_SIZE)  # validates
        self.device = pick_device(device)
        self.extractor = build_extractor(backbone, layers, grid_size, input_size, pretrained).to(self.device)
        self.smoothing_sigma = smoothing_sigma
        self.batch_size = batch_size
        self.image_size: tuple[int, int] | None = None  # set by fit
        self.grid: tuple[int, int] | None = None  # set by fit

    @property
    def is_fitted(self) -> bool:
        return self.image_size is not None

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the backbone, the fitted statistics and the scores."""
        return next(self.extractor.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FeatureBaseline":
        """Move the backbone and every fitted statistic to ``device``, and cast them to ``dtype``.

        ``dtype`` (float32 or float64; None keeps it): float64 makes a CPU computation that
        amplifies rounding, such as gradient denoising, give the same digits on every CPU.
        """
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = self.device if device is None else torch.device(device)
        self.extractor.to(self.device, dtype)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                setattr(self, name, value.to(self.device, cast))
        return self

    def _check_fit_input(self, images) -> torch.Tensor:
        return check_images(images, "training images")

    def _check_test_input(self, images) -> torch.Tensor:
        if not self.is_fitted:
            raise ValueError(f"{type(self).__name__} is not fitted: call .fit(normal_training_images) first")
        images = check_images(images)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but {type(self).__name__} was fitted on "
                f"{self.image_size} images; use the same image size"
            )
        return images

    def _batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Batches of ``images`` on the device, in the backbone's [-1, 1] range."""
        for start in range(0, len(images), self.batch_size):
            yield to_diffusion_range(images[start:start + self.batch_size].to(self.device, self.dtype))

    def _to_maps(self, grid_maps: torch.Tensor) -> torch.Tensor:
        """Grid scores (N, h, w) -> smoothed maps (N, H, W) at the fitted image size."""
        height, width = self.image_size
        sigma = smoothing_sigma_for(self.smoothing_sigma, height, width)
        return to_image_size(grid_maps.cpu(), self.image_size, sigma)
