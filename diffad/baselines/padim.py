"""PaDiM (Defard et al., 2021): one Gaussian of normal backbone features per grid position.

Fitting stacks the backbone's stage features on one grid, keeps a seeded random subset of
``n_features`` channels (the paper's dimensionality reduction) and estimates, at every grid
position, the mean and the covariance of the normal images' features, regularised by
``eps * I`` so that it stays invertible even with fewer images than channels. A test
position's anomaly score is its Mahalanobis distance to that Gaussian,
sqrt((f - mu)^T Sigma^-1 (f - mu)); the grid of distances is upsampled to the image and
blurred (sigma 4 at 256 px, as in the paper). The image score is the map's maximum.

The distance is differentiable with respect to the image, through the frozen backbone:
:mod:`diffad.denoise` follows its gradient to turn an anomalous image into a normal one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffad.backbones import FeatureExtractor
from diffad.baselines.common import FeatureBaseline, Prediction
from diffad.checks import check_images
from diffad.data import to_diffusion_range


class PaDiM(FeatureBaseline):
    """Per-position Gaussian model of normal features; Mahalanobis distance as anomaly score.

    Args:
        backbone: timm name (the paper: ``wide_resnet50_2``, layers 1-3) or a built
            :class:`FeatureExtractor` (then ``layers``, ``grid_size``, ``input_size`` must be None).
        layers, grid_size, input_size, pretrained: passed to :class:`FeatureExtractor`.
        n_features: size of the random channel subset (seeded by ``seed``); None keeps all.
        eps: covariance regularisation, Sigma + eps * I (the paper: 0.01).
        smoothing_sigma: Gaussian blur of the maps in pixels; None is 4 at 256 px, scaled
            with the image size; 0 turns it off.
        device: where the backbone and the statistics live (default CUDA when present).
        batch_size: images per backbone pass.
        chunk_size: grid positions per batched inverse / distance computation (memory bound).
        extractor: alternative keyword for a built :class:`FeatureExtractor`.
        dtype: float32, or float64 for digits that hold on every CPU (``.to(dtype=...)``
            casts a fitted model; the extractor is cast in place).
    """

    def __init__(
        self,
        backbone: str | FeatureExtractor = "wide_resnet50_2",
        layers: Sequence[int] | None = None,
        n_features: int | None = 100,
        grid_size: int | None = None,
        input_size: int | None = None,
        pretrained: bool = True,
        seed: int = 0,
        eps: float = 0.01,
        smoothing_sigma: float | None = None,
        device=None,
        batch_size: int = 32,
        chunk_size: int = 1024,
        extractor: FeatureExtractor | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if eps <= 0:
            raise ValueError(f"eps must be > 0 to keep the covariance invertible, got {eps}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        super().__init__(extractor if extractor is not None else backbone, layers, grid_size, input_size,
                         pretrained, smoothing_sigma, device, batch_size)
        total = self.extractor.out_channels
        if n_features is None:
            n_features = total
        if not isinstance(n_features, int) or not 1 <= n_features <= total:
            raise ValueError(
                f"n_features must be an int in [1, {total}] (the backbone's channels) or None, got {n_features!r}"
            )
        generator = torch.Generator().manual_seed(seed)
        # Sorted, so that n_features=None and n_features=total give the same features.
        self.channel_index = torch.randperm(total, generator=generator)[:n_features].sort().values.to(self.device)
        self.n_features = n_features
        self.seed = seed
        self.eps = eps
        self.chunk_size = chunk_size
        self.mean: torch.Tensor | None = None  # (P, C)
        self.inv_covariance: torch.Tensor | None = None  # (P, C, C)
        self.to(dtype=dtype)

    def __repr__(self) -> str:
        fitted = f"fitted on {self.image_size} images, grid {self.grid}" if self.is_fitted else "not fitted"
        return (f"PaDiM(backbone={self.extractor.name!r}, layers={self.extractor.layers}, "
                f"n_features={self.n_features}/{self.extractor.out_channels}, eps={self.eps}, {fitted})")

    # ------------------------------------------------------------------ features
    def _select(self, features: torch.Tensor) -> torch.Tensor:
        return features.index_select(1, self.channel_index)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Selected features (B, n_features, h, w) of images in [0, 1]; differentiable."""
        return self._select(self.extractor(to_diffusion_range(images)))

    # ---------------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> "PaDiM":
        """Estimate the Gaussian at each grid position from normal images (N, 3, H, W) in [0, 1]."""
        images = self._check_fit_input(images)
        if len(images) < 2:
            raise ValueError(f"PaDiM needs at least 2 normal images to estimate a covariance, got {len(images)}")
        count, shift, total, outer, grid = 0, None, None, None, None
        for batch in self._batches(images):
            features = self._select(self.extractor(batch))
            grid = tuple(features.shape[-2:])
            x = features.flatten(2).transpose(1, 2).double()  # (B, P, C)
            if shift is None:  # centre on the first batch: float64 sums without cancellation
                shift = x.mean(dim=0)
                total = torch.zeros_like(shift)
                outer = torch.zeros(shift.shape + shift.shape[-1:], dtype=torch.float64, device=x.device)
            x = x - shift
            total += x.sum(dim=0)
            outer += torch.einsum("bpc,bpd->pcd", x, x)
            count += x.shape[0]
        centred_mean = total / count
        identity = torch.eye(outer.shape[-1], dtype=torch.float64, device=outer.device)
        inverse = torch.empty(outer.shape, dtype=self.dtype, device=outer.device)
        for start in range(0, outer.shape[0], self.chunk_size):  # chunks: no second (P, C, C) float64 array
            m = centred_mean[start:start + self.chunk_size]
            covariance = (outer[start:start + self.chunk_size] - count * m[:, :, None] * m[:, None, :]) / (count - 1)
            covariance = 0.5 * (covariance + covariance.transpose(1, 2)) + self.eps * identity
            inv = torch.linalg.inv(covariance)
            inverse[start:start + self.chunk_size] = (0.5 * (inv + inv.transpose(1, 2))).to(self.dtype)
        self.mean = (shift + centred_mean).to(self.dtype)
        self.inv_covariance = inverse
        self.grid = grid
        self.image_size = tuple(images.shape[-2:])
        return self

    # ------------------------------------------------------------------ scoring
    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (B, h, w) of features (B, C, h, w) to the fitted Gaussians.

        ``features`` are the selected ``n_features`` channels (as :meth:`features` returns)
        or the extractor's full output. Differentiable with respect to ``features``.
        """
        if not self.is_fitted:
            raise ValueError("PaDiM is not fitted: call .fit(normal_training_images) first")
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a (B, C, h, w) tensor, got {shape}")
        if features.shape[1] != self.n_features:
            if features.shape[1] != self.extractor.out_channels:
                raise ValueError(
                    f"features have {features.shape[1]} channels; expected the {self.n_features} selected "
                    f"channels or the extractor's {self.extractor.out_channels}"
                )
            features = self._select(features)
        if tuple(features.shape[-2:]) != self.grid:
            raise ValueError(f"features are on a {tuple(features.shape[-2:])} grid, PaDiM was fitted on {self.grid}")
        batch = features.shape[0]
        delta = features.flatten(2).permute(2, 0, 1).to(self.mean.dtype) - self.mean[:, None]  # (P, B, C)
        squared = []
        for start in range(0, delta.shape[0], self.chunk_size):
            d = delta[start:start + self.chunk_size]  # a batched matmul per position: (p, B, C) @ (p, C, C)
            squared.append((torch.bmm(d, self.inv_covariance[start:start + self.chunk_size]) * d).sum(dim=-1))
        # clamp: rounding can give tiny negatives; it also keeps sqrt's gradient finite at 0
        return torch.cat(squared).clamp_min(1e-12).sqrt().T.reshape(batch, *self.grid)

    def grid_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance on the feature grid (B, h, w) of images (B, 3, H, W) in [0, 1].

        Differentiable with respect to ``images``; no range check, so that an image drifting a
        little outside [0, 1] during gradient denoising is still scored.
        """
        if not self.is_fitted:
            raise ValueError("PaDiM is not fitted: call .fit(normal_training_images) first")
        check_images(images, value_range=None)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} but PaDiM was fitted on {self.image_size} images")
        return self.mahalanobis(self.features(images.to(self.device, self.dtype)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly maps (N, H, W), upsampled and blurred, and image scores (N,) = each map's max."""
        images = self._check_test_input(images)
        grid_maps = torch.cat([self.mahalanobis(self._select(self.extractor(batch))).cpu()
                               for batch in self._batches(images)])
        maps = self._to_maps(grid_maps)
        return Prediction(maps, maps.flatten(1).amax(dim=1))
