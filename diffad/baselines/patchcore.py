"""PatchCore (Roth et al., CVPR 2022): distance to a coreset of normal patch features.

Three steps, none of them trained:

* **locally aware patch features**: each grid position of the backbone's feature map is
  averaged with its 3x3 neighbourhood (stride 1, zero padding, as the reference code and
  anomalib do), so that a patch feature also describes a little of its surroundings;
* **coreset memory bank**: the patch features of all normal training images are thinned
  out by greedy k-center selection (:func:`greedy_coreset`) to ``coreset_ratio`` of them
  (the paper: 10%). Each step adds the patch farthest from those already kept, so the bank
  still covers every kind of normal patch while nearest-neighbour search gets cheaper. The
  search runs in a seeded random projection to ``projection_dim`` dimensions
  (Johnson-Lindenstrauss: distances are nearly preserved, the search is cheaper); the bank
  keeps the full features;
* **scores**: a test patch's anomaly score is the distance to its nearest memory patch. The
  grid of distances is upsampled to the image and blurred (sigma 4 at 256 px, as SPADE and
  PaDiM here). The image score is the paper's Eq. 7 (:func:`reweighted_scores`): the largest
  patch distance s*, weighted by how isolated the memory patch m* it matched is: a test
  patch whose only close match is a rare normal patch keeps its full score, one close to a
  dense region of the bank loses up to 1/b of it.

The paper reads WideResNet-50's layer2 and layer3 on a 28x28 grid at 224 px:
``PatchCore("wide_resnet50_2", grid_size=28)`` (layers default to (2, 3) for ResNet names).
The reference code also averages the channels down to 1024 per layer; here the features
are kept as the extractor stacks them, and the 3x3 average runs on the extractor's one grid,
so that PatchCore reads exactly the features SPADE and PaDiM read.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from diffad.backbones import FeatureExtractor
from diffad.baselines.common import FeatureBaseline, Prediction
from diffad.data import to_diffusion_range

# The paper's mid-level stages of ResNet-like backbones: layer2 and layer3 (timm indices).
PAPER_LAYERS = (2, 3)


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def local_average(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h, w): mean over each position's 3x3 neighbourhood, zeros beyond the border.

    The paper's locally aware features (its Eq. 2-3, patch size 3), computed as the reference
    implementation and anomalib do: ``avg_pool2d(3, stride=1, padding=1)``, which divides by 9
    at the border too. Differentiable.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, C, h, w) tensor, got {shape}")
    return F.avg_pool2d(features, kernel_size=3, stride=1, padding=1)


def greedy_coreset(features: torch.Tensor, count: int, projection_dim: int | None = 128,
                   seed: int = 0) -> torch.Tensor:
    """Indices (count,) of a greedy k-center coreset of the rows of ``features`` (N, D), in selection order.

    The paper's Algorithm 1: start from one seeded random row, then repeatedly add the row
    farthest (Euclidean) from its nearest row already selected. The search runs on
    ``features @ P`` with P a seeded Gaussian (D, projection_dim) matrix scaled by
    1/sqrt(projection_dim), which nearly preserves distances (Johnson-Lindenstrauss) at a
    fraction of the cost; ``projection_dim=None`` (or >= D) searches the features themselves.
    ``count == N`` returns every row, ``arange(N)``. Rows already selected are never picked
    again, so duplicates of a selected row come last.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) == 0:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a non-empty (N, D) tensor, got {shape}")
    n, dim = features.shape
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= n:
        raise ValueError(f"count must be an int in [1, {n}] (the number of rows), got {count!r}")
    if projection_dim is not None:
        _positive_int("projection_dim", projection_dim)
    if count == n:
        return torch.arange(n, device=features.device)
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(n, (1,), generator=generator))
    points = features
    if projection_dim is not None and projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / projection_dim ** 0.5
        points = features @ projection.to(device=features.device, dtype=features.dtype)
    selected = torch.empty(count, dtype=torch.long, device=features.device)
    selected[0] = start
    # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2: one matrix-vector product per step
    norms = (points * points).sum(dim=1)

    def squared_distances(index: torch.Tensor) -> torch.Tensor:  # index: shape (1,)
        return (norms - 2 * (points @ points.index_select(0, index)[0]) + norms.index_select(0, index)).clamp_min(0)

    # squared distance of every row to its nearest selected row; -1 marks the selected rows
    index = selected[:1]
    nearest = squared_distances(index).index_fill_(0, index, -1)
    for i in range(1, count):  # tensor indices, no .item(): on a GPU the loop never waits
        index = torch.argmax(nearest).view(1)
        selected[i:i + 1] = index
        nearest = torch.minimum(nearest, squared_distances(index)).index_fill_(0, index, -1)
    return selected


def nearest_neighbours(query: torch.Tensor, bank: torch.Tensor, k: int = 1,
                       chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices (Q, k) of each query row's ``k`` nearest bank rows, nearest first.

    ``torch.cdist`` over chunks of ``chunk_size`` query rows and bank rows, so that memory
    stays bounded by a chunk_size x chunk_size matrix whatever the sizes of the two sets.
    """
    _positive_int("k", k)
    _positive_int("chunk_size", chunk_size)
    if k > len(bank):
        raise ValueError(f"k={k} exceeds the {len(bank)} rows of the bank")
    distances, indices = [], []
    for q_start in range(0, len(query), chunk_size):
        rows = query[q_start:q_start + chunk_size]
        best_d = best_i = None
        for b_start in range(0, len(bank), chunk_size):
            d = torch.cdist(rows, bank[b_start:b_start + chunk_size])
            i = torch.arange(b_start, b_start + d.shape[1], device=d.device).expand_as(d)
            if best_d is not None:
                d, i = torch.cat([best_d, d], dim=1), torch.cat([best_i, i], dim=1)
            best_d, position = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            best_i = i.gather(1, position)
        distances.append(best_d)
        indices.append(best_i)
    return torch.cat(distances), torch.cat(indices)


def reweighted_scores(patch_features: torch.Tensor, patch_distances: torch.Tensor, nearest_index: torch.Tensor,
                      bank: torch.Tensor, num_neighbors: int | None = 9) -> torch.Tensor:
    """The paper's image score (Eq. 7), (B,), from each image's patches (B, P, C).

    With m_test,* the test patch farthest from the bank, m* its nearest memory patch and
    s* = ||m_test,* - m*|| their distance, the score is w * s* with

        w = 1 - exp(||m_test,* - m*||) / sum_{m in N_b(m*)} exp(||m_test,* - m||),

    N_b(m*) being the b = ``num_neighbors`` nearest memory patches of m*, m* itself
    included (as in anomalib). Since m* is the nearest memory patch, w lies in [1 - 1/b, 1):
    near 1 when m* is isolated in the bank (its neighbours are much farther from the test
    patch than m* is: the test patch matched only a rare normal patch, the paper raises
    its score), near 1 - 1/b when m* sits in a dense region that the test patch is close to
    as a whole. Computed as 1 - softmax, the same quantity without overflow.
    ``num_neighbors=None`` gives the unweighted s* (the reference code's "1 neighbour" setting).

    ``patch_distances`` and ``nearest_index`` (B, P) are each patch's nearest-neighbour
    distance and bank row (:func:`nearest_neighbours` with k = 1).
    """
    rows = torch.arange(len(patch_features), device=patch_features.device)
    worst = patch_distances.argmax(dim=1)
    if num_neighbors is None:
        return patch_distances[rows, worst]
    test = patch_features[rows, worst]  # m_test,*  (B, C)
    matched = nearest_index[rows, worst]  # index of m*  (B,)
    b = min(num_neighbors, len(bank))
    to_matched = torch.cdist(bank[matched], bank)  # (B, M)
    to_matched[rows, matched] = -1.0  # m* first in N_b(m*), whatever the rounding of its distance to itself
    support = to_matched.topk(b, dim=1, largest=False).indices  # N_b(m*), m* at position 0
    distances = (test[:, None, :] - bank[support]).norm(dim=-1)  # ||m_test,* - m||, (B, b)
    weight = 1 - torch.softmax(distances, dim=1)[:, 0]
    return weight * distances[:, 0]


def default_patchcore_layers(backbone: str) -> tuple[int, ...] | None:
    """The paper's layer2 and layer3 for ResNet-like timm names; None (the family default) otherwise."""
    arch = backbone.split(".", 1)[0].lower()
    return PAPER_LAYERS if "resnet" in arch or "resnext" in arch else None


class PatchCore(FeatureBaseline):
    """Nearest-neighbour distance to a greedy coreset of locally averaged normal patch features.

    Args:
        backbone: timm name (the paper: ``wide_resnet50_2``) or a built
            :class:`FeatureExtractor` (then ``layers``, ``grid_size``, ``input_size`` must be None).
        layers: timm stages stacked for the patch features (default: (2, 3) for ResNet-like
            names as in the paper, the family's default stages otherwise).
        coreset_ratio: share of the training patches kept in the memory bank, in (0, 1]
            (the paper: 0.1; 1.0 keeps every patch).
        projection_dim: dimension of the random projection the coreset search runs in
            (the reference code: 128); None searches the full features.
        num_neighbors: b of the image score's reweighting (Eq. 7; anomalib: 9); None: the
            unweighted maximum patch distance.
        grid_size, input_size, pretrained: passed to :class:`FeatureExtractor`.
        seed: seeds the coreset's first patch and the projection.
        smoothing_sigma: Gaussian blur of the maps in pixels; None is 4 at 256 px, scaled
            with the image size; 0 turns it off.
        device: where the backbone and the memory bank live (default CUDA when present).
        batch_size: images per backbone pass.
        chunk_size: rows per side of each ``torch.cdist`` block (memory bound).
        extractor: alternative keyword for a built :class:`FeatureExtractor`.
    """

    def __init__(
        self,
        backbone: str | FeatureExtractor = "wide_resnet50_2",
        layers: Sequence[int] | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        num_neighbors: int | None = 9,
        grid_size: int | None = None,
        input_size: int | None = None,
        pretrained: bool = True,
        seed: int = 0,
        smoothing_sigma: float | None = None,
        device=None,
        batch_size: int = 32,
        chunk_size: int = 4096,
        extractor: FeatureExtractor | None = None,
    ):
        if isinstance(coreset_ratio, bool) or not isinstance(coreset_ratio, (int, float)) \
                or not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be a number in (0, 1] (the paper: 0.1), got {coreset_ratio!r}")
        if projection_dim is not None:
            _positive_int("projection_dim", projection_dim)
        if num_neighbors is not None and (not isinstance(num_neighbors, int) or isinstance(num_neighbors, bool)
                                          or num_neighbors < 2):
            raise ValueError(
                f"num_neighbors must be an int >= 2 (b of the paper's Eq. 7; b = 1 would make every image "
                f"score 0) or None for the unweighted maximum, got {num_neighbors!r}"
            )
        _positive_int("chunk_size", chunk_size)
        backbone = extractor if extractor is not None else backbone
        if isinstance(backbone, str) and layers is None:
            layers = default_patchcore_layers(backbone)
        super().__init__(backbone, layers, grid_size, input_size, pretrained, smoothing_sigma, device, batch_size)
        self.coreset_ratio = float(coreset_ratio)
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.seed = seed
        self.chunk_size = chunk_size
        self.memory_bank: torch.Tensor | None = None  # (M, C)
        self.n_training_patches: int | None = None

    def __repr__(self) -> str:
        fitted = (f"memory bank {len(self.memory_bank)} of {self.n_training_patches} patches, "
                  f"fitted on {self.image_size} images, grid {self.grid}" if self.is_fitted else "not fitted")
        return (f"PatchCore(backbone={self.extractor.name!r}, layers={self.extractor.layers}, "
                f"coreset_ratio={self.coreset_ratio}, num_neighbors={self.num_neighbors}, {fitted})")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (B, C, h, w) of images in [0, 1]; differentiable."""
        return local_average(self.extractor(to_diffusion_range(images)))

    def _patches(self, batch: torch.Tensor) -> torch.Tensor:
        """Patch features (B, P, C) of a [-1, 1] batch."""
        return local_average(self.extractor(batch)).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> "PatchCore":
        """Build the memory bank from normal training images (N, 3, H, W) in [0, 1]."""
        images = self._check_fit_input(images)
        patches = torch.cat([self._patches(batch) for batch in self._batches(images)])
        patches = patches.reshape(-1, patches.shape[-1])
        count = max(1, round(self.coreset_ratio * len(patches)))
        selected = greedy_coreset(patches, count, self.projection_dim, self.seed)
        self.memory_bank = patches[selected].contiguous()
        self.n_training_patches = len(patches)
        self.image_size = tuple(images.shape[-2:])
        self.grid = self.extractor.output_grid(*self.image_size)
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly maps (N, H, W), upsampled and blurred, and image scores (N,) by the paper's Eq. 7."""
        images = self._check_test_input(images)
        grid_maps, scores = [], []
        for batch in self._batches(images):
            patches = self._patches(batch)  # (B, P, C)
            distances, nearest = nearest_neighbours(patches.reshape(-1, patches.shape[-1]), self.memory_bank,
                                                    chunk_size=self.chunk_size)
            distances, nearest = distances.view(patches.shape[:2]), nearest.view(patches.shape[:2])
            grid_maps.append(distances.view(-1, *self.grid).cpu())
            scores.append(reweighted_scores(patches, distances, nearest, self.memory_bank, self.num_neighbors).cpu())
        return Prediction(self._to_maps(torch.cat(grid_maps)), torch.cat(scores))
