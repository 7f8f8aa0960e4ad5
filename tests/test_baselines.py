"""Tests for diffad.baselines: PaDiM and SPADE on synthetic images with a bright square.

The backbone is the offline, pretrained EfficientNet-Lite0; reference values are computed
here independently with numpy (np.cov, np.linalg.inv, brute-force nearest neighbours).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffad.backbones import FeatureExtractor
from diffad.baselines import SPADE, PaDiM, PatchCore, Prediction
from diffad.metrics import image_auroc, pixel_auroc
from diffad.scoring import smooth

SIZE = 64


def smooth_noise(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Normal images: low-frequency colour noise in [0.25, 0.75]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 0.5 + 0.25


def with_squares(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a bright 12x12 square at a different place in each image; return images and masks."""
    images = images.clone()
    masks = torch.zeros(images.shape[0], *images.shape[-2:])
    for i in range(images.shape[0]):
        y, x = 8 + 9 * i, 36 - 7 * i
        images[i, :, y:y + 12, x:x + 12] = 1.0
        masks[i, y:y + 12, x:x + 12] = 1
    return images, masks


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor("tf_efficientnet_lite0", pretrained=True, input_size=128)  # online: checked, lite0 loads from the installed wheel


@pytest.fixture(scope="module")
def data():
    train = smooth_noise(16, seed=0)
    defective, masks = with_squares(smooth_noise(4, seed=1))
    normal = smooth_noise(4, seed=2)
    return train, defective, masks, normal


@pytest.fixture(scope="module")
def padim(extractor, data):
    return PaDiM(extractor, n_features=100, device="cpu").fit(data[0])


@pytest.fixture(scope="module")
def spade(extractor, data):
    return SPADE(extractor, k=5, device="cpu").fit(data[0])


@pytest.fixture(scope="module")
def patchcore(extractor, data):
    return PatchCore(extractor, device="cpu").fit(data[0])


# ---------------------------------------------------------------------- PaDiM


def test_padim_localises_the_square(padim, data):
    _, defective, masks, normal = data
    maps, scores = padim.predict(defective)
    assert maps.shape == (4, SIZE, SIZE) and scores.shape == (4,)
    assert torch.allclose(scores, maps.flatten(1).max(dim=1).values)
    assert pixel_auroc(masks.numpy(), maps.numpy()) > 0.9
    normal_scores = padim.predict(normal).scores
    labels = np.r_[np.ones(4), np.zeros(4)]
    assert image_auroc(labels, torch.cat([scores, normal_scores]).numpy()) == 1.0


def test_padim_matches_numpy_reference(extractor, data):
    train, defective, _, _ = data
    model = PaDiM(extractor, n_features=12, eps=0.01, seed=3, device="cpu", chunk_size=7).fit(train)
    with torch.no_grad():
        train_features = model.features(train).flatten(2).numpy().astype(np.float64)  # (N, C, P)
        test_features = model.features(defective[:1])
        distances = model.mahalanobis(test_features).flatten().numpy()
    test_features = test_features.flatten(2)[0].numpy().astype(np.float64)  # (C, P)
    for position in (0, 37, 100, train_features.shape[-1] - 1):
        samples = train_features[:, :, position]
        covariance = np.cov(samples, rowvar=False) + 0.01 * np.eye(12)
        delta = test_features[:, position] - samples.mean(axis=0)
        expected = np.sqrt(delta @ np.linalg.inv(covariance) @ delta)
        assert distances[position] == pytest.approx(expected, rel=1e-3)


def test_mahalanobis_of_training_mean_is_zero_and_positive_elsewhere(padim, data):
    grid = padim.grid
    mean_features = padim.mean.T.reshape(1, padim.n_features, *grid)
    assert padim.mahalanobis(mean_features).abs().max() < 1e-3
    shifted = mean_features + 0.1 * torch.randn(mean_features.shape, generator=torch.Generator().manual_seed(0))
    assert (padim.mahalanobis(shifted) > 0.1).all()
    # the extractor's full output is accepted too and gives the same distances
    with torch.no_grad():
        full = padim.extractor(data[1][:2] * 2 - 1)
        assert torch.allclose(padim.mahalanobis(full), padim.mahalanobis(padim.features(data[1][:2])))


def test_mahalanobis_is_differentiable_wrt_the_image(padim, data):
    image = data[1][:1].clone().requires_grad_(True)
    padim.grid_scores(image).mean().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_regularisation_keeps_inverse_finite_with_few_images(extractor, data):
    train = data[0][:3]  # 3 images, 100 channels: the sample covariance has rank 2
    model = PaDiM(extractor, n_features=100, eps=0.01, device="cpu").fit(train)
    assert torch.isfinite(model.inv_covariance).all()
    with torch.no_grad():
        samples = model.features(train).flatten(2)[:, :, 5].double().numpy()
    covariance = np.cov(samples, rowvar=False) + 0.01 * np.eye(100)
    product = covariance @ model.inv_covariance[5].double().numpy()
    assert np.allclose(product, np.eye(100), atol=1e-3)
    assert torch.isfinite(model.predict(data[1]).maps).all()


def test_padim_is_deterministic_and_seeded(extractor, data, padim):
    again = PaDiM(extractor, n_features=100, device="cpu").fit(data[0])
    assert torch.equal(again.channel_index, padim.channel_index)
    assert torch.equal(again.predict(data[1]).maps, padim.predict(data[1]).maps)
    other = PaDiM(extractor, n_features=100, seed=1, device="cpu")
    assert not torch.equal(other.channel_index, padim.channel_index)
    assert len(torch.unique(padim.channel_index)) == 100


def test_padim_chunking_does_not_change_results(extractor, data, padim):
    chunked = PaDiM(extractor, n_features=100, device="cpu", chunk_size=5, batch_size=3).fit(data[0])
    assert torch.allclose(chunked.inv_covariance, padim.inv_covariance, rtol=1e-4, atol=1e-4)
    assert torch.allclose(chunked.predict(data[1]).maps, padim.predict(data[1]).maps, rtol=1e-4)


def test_smoothing_default_is_sigma_4_at_256_px(extractor, data, padim):
    raw = PaDiM(extractor, n_features=100, device="cpu", smoothing_sigma=0).fit(data[0])
    with torch.no_grad():
        grid = raw.grid_scores(data[1])
    upsampled = F.interpolate(grid[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(raw.predict(data[1]).maps, upsampled, rtol=1e-5)
    assert torch.allclose(padim.predict(data[1]).maps, smooth(upsampled, 4.0 * SIZE / 256), rtol=1e-5)


# ---------------------------------------------------------------------- SPADE


def test_spade_localises_the_square(spade, data):
    _, defective, masks, normal = data
    prediction = spade.predict(defective)
    assert isinstance(prediction, Prediction)
    assert prediction.maps.shape == (4, SIZE, SIZE) and prediction.scores.shape == (4,)
    assert pixel_auroc(masks.numpy(), prediction.maps.numpy()) > 0.9
    normal_scores = spade.predict(normal).scores
    assert prediction.scores.min() > normal_scores.max()


def test_spade_matches_brute_force_nearest_neighbours(extractor, data):
    train, defective, _, _ = data
    k = 4
    model = SPADE(extractor, k=k, pixel_k=2, smoothing_sigma=0, device="cpu", chunk_size=300).fit(train)
    prediction = model.predict(defective[:2])
    with torch.no_grad():
        def pooled(x):
            return extractor.stage_features(x * 2 - 1)[-1].mean(dim=(2, 3)).double().numpy()

        def grid(x):
            return extractor(x * 2 - 1).flatten(2).transpose(1, 2).double().numpy()  # (N, P, C)

        train_pooled, test_pooled = pooled(train), pooled(defective[:2])
        train_grid, test_grid = grid(train), grid(defective[:2])
    for i in range(2):
        image_distances = np.linalg.norm(train_pooled - test_pooled[i], axis=1)
        neighbours = np.argsort(image_distances)[:k]
        assert prediction.scores[i].item() == pytest.approx(np.sort(image_distances)[:k].mean(), rel=1e-3)
        gallery = train_grid[neighbours].reshape(-1, train_grid.shape[-1])
        pairwise = np.linalg.norm(test_grid[i][:, None, :] - gallery[None], axis=-1)  # (P, k * P)
        expected = np.sort(pairwise, axis=1)[:, :2].mean(axis=1).reshape(1, 1, *model.grid)
        expected = F.interpolate(torch.from_numpy(expected).float(), size=(SIZE, SIZE), mode="bilinear",
                                 align_corners=False)[0, 0]
        assert torch.allclose(prediction.maps[i], expected, rtol=1e-3, atol=1e-3)


def test_spade_is_deterministic(spade, data):
    first, second = spade.predict(data[1]), spade.predict(data[1])
    assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)


def test_spade_k_larger_than_training_set_uses_all_images(extractor, data):
    model = SPADE(extractor, k=50, device="cpu").fit(data[0][:3])
    assert model.predict(data[1][:1]).scores.shape == (1,)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [PaDiM, SPADE, PatchCore])
def test_predict_before_fit_raises(cls, extractor, data):
    with pytest.raises(ValueError, match="not fitted"):
        cls(extractor, device="cpu").predict(data[1])


@pytest.mark.parametrize("name", ["padim", "spade", "patchcore"])
def test_bad_images_raise(name, request, data):
    model = request.getfixturevalue(name)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.predict(data[1][:, :1])
    with pytest.raises(ValueError, match="fitted on"):
        model.predict(smooth_noise(1, seed=5, size=32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict(data[1] * 255)
    with pytest.raises(ValueError, match="floating point"):
        model.predict((data[1] * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="torch.Tensor"):
        model.predict(data[1].numpy())
    with pytest.raises(ValueError, match="empty"):
        type(model)(model.extractor, device="cpu").fit(data[0][:0])


def test_constructor_errors(extractor, data):
    with pytest.raises(ValueError, match="apply only when backbone is a name"):
        PaDiM(extractor, layers=(1, 2), device="cpu")
    with pytest.raises(ValueError, match="n_features"):
        PaDiM(extractor, n_features=extractor.out_channels + 1, device="cpu")
    with pytest.raises(ValueError, match="eps"):
        PaDiM(extractor, eps=0, device="cpu")
    with pytest.raises(ValueError, match="at least 2"):
        PaDiM(extractor, device="cpu").fit(data[0][:1])
    with pytest.raises(ValueError, match="image_layer"):
        SPADE(extractor, image_layer=7, device="cpu")
    with pytest.raises(ValueError, match="pixel_k"):
        SPADE(extractor, pixel_k=0, device="cpu")
    with pytest.raises(ValueError, match="backbone must be"):
        SPADE(42, device="cpu")


def test_mahalanobis_rejects_wrong_features(padim):
    with pytest.raises(ValueError, match="channels"):
        padim.mahalanobis(torch.zeros(1, 7, *padim.grid))
    with pytest.raises(ValueError, match="grid"):
        padim.mahalanobis(torch.zeros(1, padim.n_features, 3, 3))


def test_backbone_by_name_with_layers(data):
    model = PaDiM("tf_efficientnet_lite0", layers=(1, 2), n_features=None, input_size=128, device="cpu")
    assert model.extractor.layers == (1, 2) and model.n_features == 24 + 40
    spade = SPADE("tf_efficientnet_lite0", layers=(1, 2), image_layer=3, input_size=128, k=3, device="cpu")
    assert spade.extractor.layers == (1, 2, 3) and spade.pixel_positions == [0, 1]
    spade.fit(data[0][:4])
    assert spade.train_grid.shape[-1] == 24 + 40 and spade.train_pooled.shape[-1] == 112
