"""Tests of diffad.studies.feature_analysis: PCA measurements against features with known covariance,
and the predictability measurement against a learnable and an unlearnable target."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffad.studies import feature_analysis as fa


def known_covariance_features(variances, n=4, size=8, seed=0):
    """(n, C, size, size) features whose positions have exactly the covariance Q diag(variances) Q^T."""
    generator = torch.Generator().manual_seed(seed)
    channels = len(variances)
    count = n * size * size
    z = torch.randn(count, channels, generator=generator, dtype=torch.float64)
    z -= z.mean(0)
    q_z, _ = torch.linalg.qr(z)  # orthonormal, centred columns
    z = q_z * np.sqrt(count - 1)  # unit sample variance, zero correlation
    rotation, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    rows = z * torch.tensor(variances, dtype=torch.float64).sqrt() @ rotation.T + 3.0
    features = rows.reshape(n, size, size, channels).permute(0, 3, 1, 2).contiguous()
    return features, rotation


def test_positions_layout_and_sampling():
    features = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    rows = fa.positions(features)
    assert rows.shape == (8, 3) and rows.dtype == torch.float64
    # Row of image 1, position (0, 1) holds that position's three channel values.
    assert rows[4 + 1].tolist() == features[1, :, 0, 1].tolist()
    sampled = fa.positions(features, max_positions=5, seed=3)
    assert sampled.shape == (5, 3)
    full = {tuple(r) for r in rows.tolist()}
    assert all(tuple(r) in full for r in sampled.tolist())
    assert len({tuple(r) for r in sampled.tolist()}) == 5  # without replacement
    assert torch.equal(sampled, fa.positions(features, max_positions=5, seed=3))


@pytest.mark.parametrize("bad", [torch.zeros(3, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.int64), np.zeros((1, 2, 3, 3))])
def test_positions_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        fa.positions(bad)


def test_positions_rejects_nan_and_bad_max():
    with pytest.raises(ValueError, match="NaN"):
        fa.positions(torch.full((1, 2, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="max_positions"):
        fa.positions(torch.zeros(1, 2, 2, 2), max_positions=1)


def test_explained_variance_matches_known_spectrum():
    features, _ = known_covariance_features([5.0, 3.0, 1.0, 1.0])
    ratios = fa.explained_variance(features)
    np.testing.assert_allclose(ratios, [0.5, 0.3, 0.1, 0.1], atol=1e-9)


@pytest.mark.parametrize("fraction, expected", [(0.5, 1), (0.8, 2), (0.85, 3), (0.9, 3), (0.95, 4), (1.0, 4)])
def test_components_for_variance(fraction, expected):
    features, _ = known_covariance_features([5.0, 3.0, 1.0, 1.0])
    assert fa.components_for_variance(features, fraction) == expected


def test_components_for_variance_rejects_bad_fraction():
    features, _ = known_covariance_features([2.0, 1.0])
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            fa.components_for_variance(features, fraction)


def test_explained_variance_of_constant_features_raises():
    with pytest.raises(ValueError, match="zero variance"):
        fa.explained_variance(torch.ones(2, 3, 4, 4))


@pytest.mark.parametrize("rank, expected", [(0, 1.0), (1, 0.5), (2, 0.2), (3, 0.1), (4, 0.0)])
def test_low_rank_error_on_the_training_features(rank, expected):
    features, _ = known_covariance_features([5.0, 3.0, 1.0, 1.0])
    assert fa.low_rank_error(features, features, rank) == pytest.approx(expected, abs=1e-9)


def test_low_rank_error_is_zero_for_test_features_on_the_top_axis():
    train, rotation = known_covariance_features([5.0, 3.0, 1.0, 1.0])
    mean = fa.positions(train).mean(0)
    along = torch.linspace(-2, 2, 16, dtype=torch.float64)[:, None] * rotation[:, 0] + mean
    test = along.reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
    assert fa.low_rank_error(train, test, 1) == pytest.approx(0.0, abs=1e-9)
    assert fa.low_rank_error(train, test, 0) == pytest.approx(1.0, abs=1e-9)


def test_low_rank_error_rejects_mismatch_and_bad_rank():
    features, _ = known_covariance_features([2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="channels"):
        fa.low_rank_error(features, features[:, :2], 1)
    with pytest.raises(ValueError, match="rank"):
        fa.low_rank_error(features, features, 4)


def test_pca_rgb_follows_the_dominant_direction():
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    features = torch.cat([torch.stack([10 * xs, 3 * ys]).expand(2, -1, -1, -1), noise], dim=1)
    rgb = fa.pca_rgb(features)
    assert rgb.shape == (2, 8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[..., 0].ravel()
    x = xs.expand(2, -1, -1).numpy().ravel()
    assert abs(np.corrcoef(red, x)[0, 1]) > 0.98
    # A reference fixes the colouring: a slice coloured with the whole as reference matches.
    np.testing.assert_allclose(fa.pca_rgb(features[:1], reference=features), rgb[:1], atol=1e-6)


def test_pca_rgb_needs_three_channels():
    with pytest.raises(ValueError, match="3 channels"):
        fa.pca_rgb(torch.randn(1, 2, 4, 4))


class PatchColour(nn.Module):
    """Learnable target: each 4x4 patch's mean colour (3 channels)."""

    def forward(self, images):
        return F.avg_pool2d(images, 4)


class ScrambledPatch(nn.Module):
    """Deterministic but unlearnable target: a high-frequency hash of each patch."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)),
                                   requires_grad=False)

    def forward(self, images):
        return torch.sin(500.0 * F.conv2d(images, self.weight, stride=4))


class Both(nn.Module):
    def __init__(self):
        super().__init__()
        self.easy, self.hard = PatchColour(), ScrambledPatch()

    def forward(self, images):
        return torch.cat([self.easy(images), self.hard(images)], dim=1)


@pytest.fixture(scope="module")
def smooth_images():
    """Random smooth colour images in [-1, 1] (16 px)."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(48, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


def test_prediction_error_separates_learnable_from_unlearnable(smooth_images):
    train, test = smooth_images[:40], smooth_images[40:]
    result = fa.prediction_error(Both(), train, test, steps=60, batch_size=16, max_timestep=50, width=16,
                                 lr=5e-3, groups=[3, 3])
    assert result.channels == 6
    assert len(result.losses) == 60
    easy, hard = result.fvu_per_group
    assert easy < 0.45
    assert hard > 0.8
    assert min(easy, hard) <= result.fvu <= max(easy, hard)


def test_prediction_error_is_seeded(smooth_images):
    train, test = smooth_images[:40], smooth_images[40:]
    runs = [fa.prediction_error(PatchColour(), train, test, steps=5, width=8) for _ in range(2)]
    assert runs[0].fvu == runs[1].fvu and runs[0].losses == runs[1].losses


def test_prediction_error_rejects_bad_input(smooth_images):
    with pytest.raises(ValueError, match="train_images"):
        fa.prediction_error(PatchColour(), smooth_images[:, :1], smooth_images, steps=2)
    with pytest.raises(ValueError, match="groups"):
        fa.prediction_error(PatchColour(), smooth_images, smooth_images, steps=2, groups=[2, 2])
    with pytest.raises(ValueError, match="steps"):
        fa.prediction_error(PatchColour(), smooth_images, smooth_images, steps=0)
