"""Tests for diffad.baselines.patchcore: each step against a brute-force numpy reference.

Local averaging, nearest-neighbour search and the reweighted image score (the paper's
Eq. 7) are recomputed here with plain numpy loops; the greedy coreset is compared with an
exhaustive farthest-point search. The backbone is the offline EfficientNet-Lite0 on small
images, so that everything runs in seconds.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffad.backbones import FeatureExtractor
from diffad.baselines import PatchCore, Prediction
from diffad.baselines.patchcore import greedy_coreset, local_average, nearest_neighbours, reweighted_scores
from diffad.metrics import pixel_auroc
from diffad.scoring import smooth

SIZE = 64


def smooth_noise(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Normal images: low-frequency colour noise in [0.25, 0.75]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 0.5 + 0.25


def stripes(n: int, seed: int, vertical: bool = False, size: int = SIZE) -> torch.Tensor:
    """A texture: diagonal stripes of period 8 px with a random phase, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi
    angle = x if vertical else x + y
    wave = 0.5 + 0.3 * torch.sin(2 * torch.pi * angle / 8 + phase)
    images = wave[:, None].expand(n, 3, size, size) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    return (images + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor("tf_efficientnet_lite0", pretrained=True, input_size=128)  # online: checked, lite0 loads from the installed wheel


@pytest.fixture(scope="module")
def data():
    train = smooth_noise(12, seed=0)
    test = smooth_noise(3, seed=1)
    test[0, :, 8:20, 30:42] = 1.0  # a bright square in the first test image
    return train, test


@pytest.fixture(scope="module")
def patchcore(extractor, data):
    return PatchCore(extractor, device="cpu").fit(data[0])


# ----------------------------------------------------------- building blocks vs numpy


def test_local_average_matches_numpy():
    features = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = features.numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))  # zeros beyond the border
    expected = np.zeros_like(x)
    for i in range(6):
        for j in range(7):
            expected[:, :, i, j] = padded[:, :, i:i + 3, j:j + 3].sum(axis=(2, 3)) / 9
    assert np.allclose(local_average(features).numpy(), expected)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        local_average(features[0])


def test_nearest_neighbours_match_brute_force():
    g = torch.Generator().manual_seed(1)
    query, bank = torch.randn(50, 8, generator=g), torch.randn(37, 8, generator=g)
    distances, indices = nearest_neighbours(query, bank, k=3, chunk_size=7)  # chunked on both sides
    pairwise = np.linalg.norm(query.double().numpy()[:, None] - bank.double().numpy()[None], axis=-1)
    order = np.argsort(pairwise, axis=1)[:, :3]
    assert np.array_equal(indices.numpy(), order)
    assert np.allclose(distances.numpy(), np.take_along_axis(pairwise, order, axis=1), rtol=1e-4, atol=1e-4)
    one_d, one_i = nearest_neighbours(query, bank)
    assert one_d.shape == (50, 1) and torch.equal(one_i[:, 0], indices[:, 0])
    with pytest.raises(ValueError, match="exceeds"):
        nearest_neighbours(query, bank, k=38)


def exhaustive_farthest_points(points: np.ndarray, count: int, start: int) -> list[int]:
    """Farthest-point (k-center greedy) selection by brute force: every pairwise distance, every step."""
    pairwise = np.linalg.norm(points[:, None] - points[None], axis=-1)
    selected = [start]
    while len(selected) < count:
        to_coreset = pairwise[:, selected].min(axis=1)
        to_coreset[selected] = -np.inf
        selected.append(int(np.argmax(to_coreset)))
    return selected


def test_greedy_coreset_matches_exhaustive_search():
    points = torch.randn(60, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for seed in (0, 3):
        selected = greedy_coreset(points, 15, projection_dim=None, seed=seed)
        assert selected.tolist() == exhaustive_farthest_points(points.numpy(), 15, int(selected[0]))
        # a projection to as many dimensions as the points have is no projection: same search
        assert torch.equal(greedy_coreset(points, 15, projection_dim=5, seed=seed), selected)
    starts = {int(greedy_coreset(points, 2, projection_dim=None, seed=s)[0]) for s in range(6)}
    assert len(starts) > 1  # the first point is drawn from the seed


def test_projected_coreset_covers_like_the_exact_one():
    g = torch.Generator().manual_seed(3)
    # a dense cluster and a few rare, spread-out points, in 256 dimensions
    latent = torch.cat([torch.rand(1950, 3, generator=g) * 0.2, torch.rand(50, 3, generator=g) * 4])
    points = latent @ torch.randn(3, 256, generator=g)

    def covering_radius(index):
        return torch.cdist(points, points[index]).min(dim=1).values.max().item()

    exact = covering_radius(greedy_coreset(points, 100, projection_dim=None))
    projected = covering_radius(greedy_coreset(points, 100, projection_dim=128))
    random = covering_radius(torch.randperm(len(points), generator=g)[:100])
    assert projected <= 1.5 * exact and projected < 0.1 * random  # the rare points are kept


def test_greedy_coreset_is_seeded_and_complete_at_ratio_one():
    points = torch.randn(200, 64, generator=torch.Generator().manual_seed(4))
    first = greedy_coreset(points, 20, projection_dim=16, seed=7)
    assert torch.equal(first, greedy_coreset(points, 20, projection_dim=16, seed=7))
    assert not torch.equal(first, greedy_coreset(points, 20, projection_dim=16, seed=8))
    assert torch.equal(greedy_coreset(points, 200), torch.arange(200))
    # never the same row twice, even when the rest are exact duplicates (integers: distances exactly 0)
    distinct = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]])
    duplicated = torch.cat([distinct, distinct])
    for seed in range(3):
        selected = greedy_coreset(duplicated, 8, projection_dim=None, seed=seed).tolist()
        assert len(set(selected)) == 8 and {i % 5 for i in selected[:5]} == set(range(5))  # distinct rows first
    with pytest.raises(ValueError, match="count"):
        greedy_coreset(points, 0)
    with pytest.raises(ValueError, match="count"):
        greedy_coreset(points, 201)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        greedy_coreset(points[0], 1)
    with pytest.raises(ValueError, match="projection_dim"):
        greedy_coreset(points, 5, projection_dim=0)


def eq7_numpy(patches: np.ndarray, bank: np.ndarray, b: int) -> np.ndarray:
    """The paper's Eq. 7 written out: s = (1 - exp|m_test* - m*| / sum_{N_b(m*)} exp|m_test* - m|) s*."""
    scores = []
    for image in patches:
        pairwise = np.linalg.norm(image[:, None] - bank[None], axis=-1)  # (P, M)
        worst = np.argmax(pairwise.min(axis=1))  # m_test,*
        star = np.argmin(pairwise[worst])  # m*
        s_star = pairwise[worst, star]
        neighbourhood = np.argsort(np.linalg.norm(bank - bank[star], axis=1))[:b]  # N_b(m*), m* first
        assert neighbourhood[0] == star
        weight = 1 - np.exp(s_star) / np.exp(pairwise[worst, neighbourhood]).sum()
        scores.append(weight * s_star)
    return np.array(scores)


def test_reweighted_scores_match_eq7():
    g = torch.Generator().manual_seed(5)
    bank, patches = torch.randn(40, 6, generator=g), torch.randn(3, 20, 6, generator=g) * 1.5
    distances, nearest = nearest_neighbours(patches.reshape(-1, 6), bank, chunk_size=16)
    distances, nearest = distances.view(3, 20), nearest.view(3, 20)
    for b in (2, 9):
        scores = reweighted_scores(patches, distances, nearest, bank, b)
        assert np.allclose(scores.numpy(), eq7_numpy(patches.double().numpy(), bank.double().numpy(), b), rtol=1e-4)
        s_star = distances.max(dim=1).values
        assert ((scores >= (1 - 1 / b) * s_star - 1e-4) & (scores < s_star)).all()  # w in [1 - 1/b, 1)
    assert torch.equal(reweighted_scores(patches, distances, nearest, bank, None), distances.max(dim=1).values)
    # large distances do not overflow exp()
    far = reweighted_scores(patches * 100, distances * 100, nearest, bank * 100, 9)
    assert torch.isfinite(far).all()


# ------------------------------------------------------------------ the model end to end


def test_patchcore_matches_numpy_reference(extractor, data):
    train, test = data
    model = PatchCore(extractor, coreset_ratio=0.25, smoothing_sigma=0, device="cpu", chunk_size=100,
                      batch_size=5).fit(train)
    with torch.no_grad():
        train_patches = model.features(train).flatten(2).transpose(1, 2).reshape(-1, extractor.out_channels)
        test_patches = model.features(test).flatten(2).transpose(1, 2).double().numpy()  # (N, P, C)
    assert model.n_training_patches == len(train_patches) == 12 * 16 * 16
    assert len(model.memory_bank) == round(0.25 * len(train_patches))
    expected_bank = train_patches[greedy_coreset(train_patches, len(model.memory_bank), 128, seed=0)]
    assert torch.allclose(model.memory_bank, expected_bank)
    prediction = model.predict(test)
    assert isinstance(prediction, Prediction)
    assert prediction.maps.shape == (3, SIZE, SIZE) and prediction.scores.shape == (3,)
    bank = model.memory_bank.double().numpy()
    grid = np.stack([np.linalg.norm(image[:, None] - bank[None], axis=-1).min(axis=1) for image in test_patches])
    expected_maps = F.interpolate(torch.from_numpy(grid).float().view(3, 1, *model.grid), size=(SIZE, SIZE),
                                  mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(prediction.maps, expected_maps, rtol=1e-3, atol=1e-3)
    assert np.allclose(prediction.scores.numpy(), eq7_numpy(test_patches, bank, 9), rtol=1e-3)


def test_smoothing_default_is_sigma_4_at_256_px(extractor, data, patchcore):
    raw = PatchCore(extractor, smoothing_sigma=0, device="cpu").fit(data[0]).predict(data[1])
    smoothed = patchcore.predict(data[1])
    assert torch.allclose(smoothed.maps, smooth(raw.maps, 4.0 * SIZE / 256), rtol=1e-5)
    assert torch.equal(smoothed.scores, raw.scores)  # the image score reads the raw patch distances


def test_coreset_ratio_one_keeps_every_patch(extractor, data):
    model = PatchCore(extractor, coreset_ratio=1.0, device="cpu").fit(data[0][:4])
    with torch.no_grad():
        patches = model.features(data[0][:4]).flatten(2).transpose(1, 2).reshape(-1, extractor.out_channels)
    assert torch.equal(model.memory_bank, patches)
    # a training image's own patches are in the bank: its distances are (nearly) zero
    assert model.predict(data[0][:1]).scores.item() < 0.05 * model.predict(data[1][:1]).scores.item()


def test_patchcore_is_deterministic_and_batching_does_not_matter(extractor, data, patchcore):
    again = PatchCore(extractor, device="cpu", batch_size=5, chunk_size=64).fit(data[0])
    assert torch.equal(again.memory_bank, patchcore.memory_bank)
    first, second = patchcore.predict(data[1]), again.predict(data[1])
    assert torch.allclose(first.maps, second.maps, rtol=1e-4, atol=1e-4)
    assert torch.allclose(first.scores, second.scores, rtol=1e-4)
    other = PatchCore(extractor, device="cpu", seed=1).fit(data[0])
    assert not torch.equal(other.memory_bank, patchcore.memory_bank)


def test_pasted_defect_scores_higher():
    """A patch of another texture pasted into a striped texture: found by the map and the image score."""
    extractor = FeatureExtractor("tf_efficientnet_lite0", pretrained=True, input_size=128)  # online: checked, lite0 loads from the installed wheel
    train, normal = stripes(10, seed=0), stripes(4, seed=1)
    defective, other = stripes(4, seed=2), stripes(4, seed=3, vertical=True)
    masks = torch.zeros(4, SIZE, SIZE)
    for i in range(4):
        y, x = 6 + 12 * i, 40 - 10 * i
        defective[i, :, y:y + 14, x:x + 14] = other[i, :, y:y + 14, x:x + 14]
        masks[i, y:y + 14, x:x + 14] = 1
    model = PatchCore(extractor, device="cpu").fit(train)
    maps, scores = model.predict(defective)
    assert scores.min() > model.predict(normal).scores.max()
    assert pixel_auroc(masks.numpy(), maps.numpy()) > 0.9


# ---------------------------------------------------------------------------- errors


# Unfitted use and bad images: tests/test_baselines.py, shared with PaDiM and SPADE.


@pytest.mark.parametrize("kwargs, match", [
    (dict(coreset_ratio=0), "coreset_ratio"),
    (dict(coreset_ratio=1.5), "coreset_ratio"),
    (dict(coreset_ratio=True), "coreset_ratio"),
    (dict(num_neighbors=1), "num_neighbors"),
    (dict(num_neighbors=2.5), "num_neighbors"),
    (dict(projection_dim=0), "projection_dim"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(smoothing_sigma=-1), "smoothing_sigma"),
    (dict(layers=(1, 2)), "apply only when backbone is a name"),
])
def test_constructor_errors(extractor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatchCore(extractor, device="cpu", **kwargs)


def test_backbone_by_name():
    with pytest.raises(ValueError, match="backbone must be"):
        PatchCore(42, device="cpu")
    resnet = PatchCore("resnet18", pretrained=False, device="cpu")  # random weights: built offline
    assert resnet.extractor.layers == (2, 3)  # the paper's layer2 and layer3
    lite = PatchCore("tf_efficientnet_lite0", layers=(1, 2), pretrained=False, input_size=64, device="cpu")
    assert lite.extractor.layers == (1, 2) and lite.extractor.out_channels == 24 + 40
    lite.fit(smooth_noise(2, seed=6, size=32))
    assert lite.memory_bank.shape == (round(0.1 * 2 * 8 * 8), 64)
    assert "memory bank 13 of 128 patches" in repr(lite)
