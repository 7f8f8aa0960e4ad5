"""SPADE (Cohen & Hoshen, 2020): nearest-neighbour distances to normal backbone features.

Two levels, both plain k-nearest-neighbour retrieval with no training at all:

* **image score**: the mean Euclidean distance from the test image's globally average-pooled
  deep feature to its ``k`` nearest normal training images (the paper: k = 50);
* **pixel map**: each grid position of the test image is compared with *every* position of
  those ``k`` nearest training images (so a normal part may match a normal part anywhere in
  a similar image); its score is the mean distance to its ``pixel_k`` nearest features
  (the paper: 1). The grid is upsampled to the image and blurred (sigma 4 at 256 px).

The paper pools WideResNet-50's layer 4 for the image level and uses layers 1-3 for pixels:
``SPADE("wide_resnet50_2", image_layer=4)``. By default the deepest pixel layer is pooled.
Memory: all training images' grid features are kept on ``device``
(N x positions x channels floats).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from diffad.backbones import FeatureExtractor, default_layers
from diffad.baselines.common import FeatureBaseline, Prediction


class SPADE(FeatureBaseline):
    """k-NN anomaly detection on pooled (image level) and per-position (pixel level) features.

    Args:
        backbone: timm name (the paper: ``wide_resnet50_2``) or a built
            :class:`FeatureExtractor` (then ``layers``, ``grid_size``, ``input_size`` must be None,
            and all its stages are pixel features).
        layers: timm stage indices stacked for the pixel features (default: the family's).
        k: nearest training images for the image score and the pixel gallery.
        pixel_k: nearest gallery features averaged for a position's score.
        image_layer: timm stage whose global average pool is the image feature
            (default: the deepest stage the extractor computes).
        grid_size, input_size, pretrained: passed to :class:`FeatureExtractor`.
        smoothing_sigma: Gaussian blur of the maps in pixels; None is 4 at 256 px, scaled
            with the image size; 0 turns it off.
        device: where the backbone and the training features live (default CUDA when present).
        batch_size: images per backbone pass.
        chunk_size: gallery features per ``torch.cdist`` call (memory bound).
        extractor: alternative keyword for a built :class:`FeatureExtractor`.
    """

    def __init__(
        self,
        backbone: str | FeatureExtractor = "wide_resnet50_2",
        layers: Sequence[int] | None = None,
        k: int = 50,
        pixel_k: int = 1,
        image_layer: int | None = None,
        grid_size: int | None = None,
        input_size: int | None = None,
        pretrained: bool = True,
        smoothing_sigma: float | None = None,
        device=None,
        batch_size: int = 32,
        chunk_size: int = 8192,
        extractor: FeatureExtractor | None = None,
    ):
        for name, value in (("k", k), ("pixel_k", pixel_k), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        backbone = extractor if extractor is not None else backbone
        extractor_layers = layers
        if isinstance(backbone, str):
            pixel_layers = tuple(layers) if layers is not None else default_layers(backbone)
            extractor_layers = tuple(sorted(set(pixel_layers) | ({image_layer} if image_layer is not None else set())))
        super().__init__(backbone, extractor_layers, grid_size, input_size, pretrained, smoothing_sigma,
                         device, batch_size)
        built = self.extractor.layers
        if not isinstance(backbone, str):
            pixel_layers = built
        if image_layer is None:
            image_layer = max(built)
        if image_layer not in built:
            raise ValueError(f"image_layer {image_layer} is not one of the extractor's stages {built}")
        self.pixel_positions = [built.index(layer) for layer in pixel_layers]
        self.image_position = built.index(image_layer)
        self.image_layer = image_layer
        self.k = k
        self.pixel_k = pixel_k
        self.chunk_size = chunk_size
        self.train_pooled: torch.Tensor | None = None  # (N, C_image)
        self.train_grid: torch.Tensor | None = None  # (N, P, C_pixel)

    def __repr__(self) -> str:
        fitted = (f"fitted on {len(self.train_pooled)} images of {self.image_size}, grid {self.grid}"
                  if self.is_fitted else "not fitted")
        return (f"SPADE(backbone={self.extractor.name!r}, stages={self.extractor.layers}, "
                f"image_layer={self.image_layer}, k={self.k}, pixel_k={self.pixel_k}, {fitted})")

    def _features(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled image features (B, C_image) and grid features (B, P, C_pixel) of a [-1, 1] batch."""
        stages = self.extractor.stage_features(batch)
        grid = self.extractor.output_grid(*batch.shape[-2:])
        pooled = stages[self.image_position].mean(dim=(2, 3))
        maps = [stages[i] for i in self.pixel_positions]
        maps = [m if tuple(m.shape[-2:]) == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
                for m in maps]
        return pooled, torch.cat(maps, dim=1).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> "SPADE":
        """Keep the features of normal training images (N, 3, H, W) in [0, 1]."""
        images = self._check_fit_input(images)
        pooled, grids = zip(*(self._features(batch) for batch in self._batches(images)))
        self.train_pooled = torch.cat(pooled)
        self.train_grid = torch.cat(grids)
        self.image_size = tuple(images.shape[-2:])
        self.grid = self.extractor.output_grid(*self.image_size)
        return self

    def _nearest_distances(self, query: torch.Tensor, gallery: torch.Tensor, count: int) -> torch.Tensor:
        """The ``count`` smallest distances (Q, count) from each query row to the gallery rows, in chunks."""
        best = None
        for start in range(0, len(gallery), self.chunk_size):
            distances = torch.cdist(query, gallery[start:start + self.chunk_size])
            if best is not None:
                distances = torch.cat([best, distances], dim=1)
            best = distances.topk(min(count, distances.shape[1]), dim=1, largest=False).values
        return best

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly maps (N, H, W), upsampled and blurred, and image scores (N,): mean k-NN distance."""
        images = self._check_test_input(images)
        k = min(self.k, len(self.train_pooled))
        positions = self.train_grid.shape[1]
        if self.pixel_k > k * positions:
            raise ValueError(f"pixel_k={self.pixel_k} exceeds the {k * positions} gallery features")
        scores, grid_maps = [], []
        for batch in self._batches(images):
            pooled, grid_features = self._features(batch)
            image_distances = torch.cdist(pooled, self.train_pooled).topk(k, dim=1, largest=False)
            scores.append(image_distances.values.mean(dim=1).cpu())
            for query, neighbours in zip(grid_features, image_distances.indices):
                gallery = self.train_grid[neighbours].reshape(-1, self.train_grid.shape[-1])
                nearest = self._nearest_distances(query, gallery, self.pixel_k)
                grid_maps.append(nearest.mean(dim=1).view(*self.grid).cpu())
        maps = self._to_maps(torch.stack(grid_maps))
        return Prediction(maps, torch.cat(scores))
