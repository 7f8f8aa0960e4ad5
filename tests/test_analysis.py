"""Tests of diffad.studies.analysis: the measurements behind the book's figures.

Expected values are derived by hand (constructed images with known contrast, the schedule's
closed form) or from the metric functions applied directly; a tiny perturbed UNet stands in
for a trained model.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffad.studies import analysis
from diffad.data import to_diffusion_range
from diffad.metrics import pixel_auroc, pro
from diffad.presets import get_preset
from diffad.models.denoiser import TrainedModel, build_unet

SIZE = 32


def tiny_model() -> TrainedModel:
    preset = get_preset("cpu", unet="tiny", image_size=SIZE)
    torch.manual_seed(0)
    unet = build_unet(preset, 8, None).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh ADM UNet ignores its input (zeroed branches): perturb it
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return TrainedModel(preset, ["a"], unet, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def checkerboard_image(size=SIZE, amplitude=0.1):
    """Grey 0.5 +- amplitude in a checkerboard: every channel has mean 0.5, variance amplitude**2."""
    yy, xx = np.indices((size, size))
    board = np.where((yy + xx) % 2 == 0, amplitude, -amplitude)
    return torch.tensor(0.5 + board, dtype=torch.float32).expand(3, size, size).clone()


def square_mask(size=SIZE, lo=12, hi=20):
    mask = torch.zeros(size, size)
    mask[lo:hi, lo:hi] = 1
    return mask


def test_ring_masks_are_the_neighbours_outside_the_defect():
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1
    ring = analysis.ring_masks(mask, 1)
    assert ring.sum() == 8 and not ring[0, 3, 3] and ring[0, 2:5, 2:5].sum() == 8
    assert analysis.ring_masks(mask, 2).sum() == 24


def test_defect_contrast_matches_the_constructed_contrast():
    image = checkerboard_image()
    mask = square_mask()
    image[0][mask > 0] = 0.8  # red channel of the defect moves by 0.3 from the ring's mean 0.5
    width = 2
    ring = analysis.ring_masks(mask[None], width)[0]
    n = int(ring.sum())
    assert n % 2 == 0  # the ring holds as many +a as -a pixels: mean exactly 0.5
    expected = 0.3 / math.sqrt(0.01 * n / (n - 1))  # unbiased variance of the ring
    got = analysis.defect_contrast(image[None], mask[None], ring_width=width)
    assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-5)


def test_defect_contrast_is_nan_without_defect_and_checks_shapes():
    image = checkerboard_image()[None]
    assert torch.isnan(analysis.defect_contrast(image, torch.zeros(1, SIZE, SIZE))).all()
    with pytest.raises(ValueError, match="masks have shape"):
        analysis.defect_contrast(image, torch.zeros(2, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        analysis.defect_contrast(torch.zeros(3, SIZE, SIZE), torch.zeros(1, SIZE, SIZE))


def test_inside_outside_means():
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 3.0
    maps[0, 3, 3] = 1.0
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :2] = 1
    inside, outside = analysis.inside_outside(maps, masks)
    assert inside[0].item() == 3.0 and outside[0].item() == pytest.approx(1.0 / 12)
    assert torch.isnan(inside[1]) and outside[1].item() == 0.0


def test_defect_type_metrics_equal_the_metrics_on_each_subset():
    generator = torch.Generator().manual_seed(0)
    types = ["good", "stain", "good", "scratch", "stain"]
    masks = torch.zeros(5, 8, 8)
    for i in (1, 3, 4):
        masks[i, 2 + i // 2:5 + i // 2, 1:4] = 1
    maps = {"a": torch.rand(5, 8, 8, generator=generator), "b": masks + 0.1 * torch.rand(5, 8, 8, generator=generator)}
    data = SimpleNamespace(test_masks=masks, defect_types=types)
    rows = analysis.defect_type_metrics(data, maps)
    assert [r["defect_type"] for r in rows] == ["stain", "scratch"]
    assert all(type(r["defect_type"]) is str for r in rows)
    assert [r["images"] for r in rows] == [2, 1]
    stain = [0, 1, 2, 4]
    assert rows[0]["a"] == pytest.approx(pixel_auroc(masks[stain], maps["a"][stain]))
    assert rows[0]["b"] == 1.0
    pro_rows = analysis.defect_type_metrics(data, maps, metric="pro")
    assert pro_rows[1]["a"] == pytest.approx(pro(masks[[0, 2, 3]], maps["a"][[0, 2, 3]]))
    with pytest.raises(ValueError, match="metric must be one of"):
        analysis.defect_type_metrics(data, maps, metric="f1")
    with pytest.raises(ValueError, match="map 'c' has shape"):
        analysis.defect_type_metrics(data, {"c": torch.zeros(5, 4, 4)})


def test_markdown_table_shows_a_missing_cell_as_a_dash():
    text = analysis.markdown_table([{"kind": "hole", "carpet": 0.9}, {"kind": "bent", "metal_nut": 0.8}],
                                   ["kind", "carpet", "metal_nut"], digits=1)
    assert text.splitlines()[2:] == ["| hole | 0.9 | - |", "| bent | - | 0.8 |"]


def test_markdown_table():
    text = analysis.markdown_table([{"name": "kl", "value": 0.98765}, {"name": "rgb", "value": 1}], digits=2)
    assert text.splitlines() == ["| name | value |", "|---|---|", "| kl | 0.99 |", "| rgb | 1 |"]
    with pytest.raises(ValueError, match="at least one row"):
        analysis.markdown_table([])


def test_noise_sweep_images_follow_the_forward_process(model):
    image = checkerboard_image(amplitude=0.05)
    mask = square_mask()
    image[:, mask > 0] = 0.95
    timesteps = (1, 100, 999)
    sweep = analysis.noise_sweep(model, image, mask, timesteps, seed=3, draws=2)
    assert sweep.timesteps == timesteps
    assert sweep.noisy.shape == sweep.predicted.shape == (3, 3, SIZE, SIZE)
    assert sweep.kl.shape == (3, SIZE, SIZE) and (sweep.kl > -1e-4).all()  # KL >= 0 up to rounding
    for values in (sweep.contrast, sweep.error_inside, sweep.error_outside, sweep.error_ratio, sweep.kl_ratio):
        assert values.shape == (3,) and torch.isfinite(values).all()
    # with one draw, the curves are those of the displayed estimate
    single = analysis.noise_sweep(model, image, mask, (50,), seed=3, draws=1)
    error = (single.predicted[0] - image).abs().mean(dim=0)
    assert single.error_inside[0].item() == pytest.approx(error[mask > 0].mean().item(), rel=1e-4)
    assert single.error_outside[0].item() == pytest.approx(error[mask == 0].mean().item(), rel=1e-4)
    assert single.error_ratio[0].item() == pytest.approx((single.error_inside / single.error_outside)[0].item(), rel=1e-5)
    # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with the seeded unit noise, shown in [0, 1]
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)[100]
    eps = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3))[0]
    x_t = math.sqrt(abar) * to_diffusion_range(image) + math.sqrt(1 - abar) * eps
    assert torch.allclose(sweep.noisy[1], ((x_t + 1) / 2).clamp(0, 1), atol=1e-5)
    # the defect is plain in x0 and at t = 1, and drowned at t = 999
    assert sweep.clean_contrast > 5 and sweep.contrast[0] > 0.5 * sweep.clean_contrast
    assert sweep.contrast[2] < 0.1 * sweep.clean_contrast


def test_noise_sweep_rejects_bad_input(model):
    image, mask = checkerboard_image(), square_mask()
    with pytest.raises(ValueError, match="mask is empty"):
        analysis.noise_sweep(model, image, torch.zeros(SIZE, SIZE), (10,))
    with pytest.raises(ValueError, match=r"in \[1, 1000\)"):
        analysis.noise_sweep(model, image, mask, (0, 10))
    with pytest.raises(ValueError, match="trained at 32x32"):
        analysis.noise_sweep(model, torch.rand(3, 16, 16), torch.ones(16, 16), (10,))
    with pytest.raises(ValueError, match="one \\(3, H, W\\)"):
        analysis.noise_sweep(model, image[None], mask, (10,))


def test_timestep_profile_variance_interpolates_the_schedule_bounds(model):
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    timesteps = (1, 10, 500)
    profile = analysis.timestep_profile(model, images, timesteps)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior = betas * (1 - abar_prev) / (1 - abar)
    index = list(timesteps)
    assert np.allclose(profile.beta, betas[index])
    assert np.allclose(profile.posterior_variance, posterior[index])
    # the mean log variance is linear in the interpolation fraction
    f = profile.variance_fraction
    expected = np.exp(f * np.log(betas[index]) + (1 - f) * np.log(posterior[index]))
    assert np.allclose(profile.model_variance, expected, rtol=1e-4)
    assert profile.mse.shape == profile.vb.shape == (3,) and (profile.mse > 0).all() and (profile.vb >= 0).all()
    assert (profile.fraction_std >= 0).all()
    with pytest.raises(ValueError, match="timesteps must be"):
        analysis.timestep_profile(model, images, (1000,))


class PooledFeatures(torch.nn.Module):
    """A stand-in backbone: 8 fixed channels on a grid 4 times coarser than the image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(2))

    def forward(self, x):
        return self.conv(torch.nn.functional.avg_pool2d(x, 4))


def test_feature_prediction_compares_the_head_with_the_backbone(model):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    extractor = PooledFeatures()
    model.feature_stats = (torch.full((8,), 0.5), torch.full((8,), 2.0))
    try:
        target, predicted, error = analysis.feature_prediction(model, images, 7, seed=5, extractor=extractor)
        assert target.shape == predicted.shape == (2, 8, SIZE // 4, SIZE // 4) and error.shape == (2, 8, 8)
        with torch.no_grad():
            expected_target = (extractor(to_diffusion_range(images)) - 0.5) / 2.0  # standardised
            betas = np.linspace(1e-4, 0.02, 1000)  # the cpu preset scores on the unspaced schedule
            abar = float(np.cumprod(1 - betas)[7])
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
            x_t = math.sqrt(abar) * to_diffusion_range(images) + math.sqrt(1 - abar) * noise
            _, expected_prediction = model.unet(x_t, torch.full((2,), 7), return_features=True)
        assert torch.allclose(target, expected_target, atol=1e-5)
        assert torch.allclose(predicted, expected_prediction, atol=1e-4)
        assert torch.allclose(error, (expected_prediction - expected_target).pow(2).mean(dim=1), atol=1e-4)
    finally:
        model.feature_stats = None
    wrong = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 5, 1))
    with pytest.raises(ValueError, match="use the model's own backbone"):
        analysis.feature_prediction(model, images, 7, extractor=wrong)


def test_largest_defect_picks_the_biggest_mask_of_the_kind():
    masks = torch.zeros(4, 8, 8)
    masks[1, :2, :2] = 1  # scratch, 4 px
    masks[2, :3, :3] = 1  # scratch, 9 px
    masks[3, :4, :4] = 1  # stain, 16 px
    data = SimpleNamespace(defect_types=["good", "scratch", "scratch", "stain"], test_masks=masks)
    assert analysis.largest_defect(data, "scratch") == 2
    assert analysis.largest_defect(data, "stain") == 3
    with pytest.raises(ValueError, match="'scratch', 'stain'"):
        analysis.largest_defect(data, "hole")
    with pytest.raises(ValueError, match="no test image of defect type 'good'"):
        analysis.largest_defect(data, "good")


def _toy_crack_category(root) -> np.ndarray:
    """An MVTec-layout category at ``root``: one grey image per split, one test image with a thin
    diagonal crack (its 128 px mask, returned)."""
    from PIL import Image
    from skimage.draw import line

    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    image = Image.fromarray(np.full((128, 128, 3), 128, dtype=np.uint8))
    for folder in ("train/good", "test/good", "test/crack"):
        image.save(root / folder / "000.png")
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[line(5, 5, 120, 100)] = 255
    Image.fromarray(mask).save(root / "ground_truth/crack/000_mask.png")
    return mask


def test_mask_fragments_counts_regions_under_each_rule(tmp_path):
    from diffad.studies.analysis import mask_fragments

    _toy_crack_category(tmp_path / "toy")
    (row,) = mask_fragments(tmp_path, "toy", 32)
    assert row["defect_type"] == "crack" and row["images"] == 1
    assert row["full size"] == 1 and row["area (diffad)"] == 1 and row["nearest"] > 1


def test_mask_rule_effect_rescores_saved_maps_under_both_rules(tmp_path):
    from diffad.studies.analysis import mask_rule_effect, masks_by_rule
    from diffad.data.mvtec import downsample_mask

    full = _toy_crack_category(tmp_path / "data" / "toy")
    masks = np.stack(masks_by_rule(tmp_path / "data", "toy", 32)["area (diffad)"])
    assert np.array_equal(masks.any(axis=0), downsample_mask(full > 0, (32, 32)) > 0)
    (tmp_path / "out" / "toy").mkdir(parents=True)
    # a map that is exactly the area mask: perfect under the area rule
    np.savez(tmp_path / "out" / "toy" / "maps.npz", masks=masks, perfect=masks.astype(float))
    (row,) = mask_rule_effect(tmp_path / "data", tmp_path / "out", ["toy"], ["perfect"])
    assert row["PRO, area"] == pytest.approx(100) and row["pixel AUROC, area"] == pytest.approx(100)
    assert row["PRO change"] == pytest.approx(row["PRO, area"] - row["PRO, nearest"])
    with pytest.raises(ValueError, match="not among the maps"):
        mask_rule_effect(tmp_path / "data", tmp_path / "out", ["toy"], ["padim"])
    np.savez(tmp_path / "out" / "toy" / "maps.npz", masks=~masks, perfect=masks.astype(float))
    with pytest.raises(ValueError, match="other data"):
        mask_rule_effect(tmp_path / "data", tmp_path / "out", ["toy"], ["perfect"])


def test_head_against_template_compares_two_predictions_of_the_same_targets(model):
    generator = torch.Generator().manual_seed(6)
    train = torch.rand(5, 3, SIZE, SIZE, generator=generator)
    test = torch.rand(3, 3, SIZE, SIZE, generator=generator)
    extractor = PooledFeatures()
    rows = analysis.head_against_template(model, train, {"train": train, "test": test}, 7, seed=2,
                                          extractor=extractor)
    assert [r["images"] for r in rows] == ["train", "test"] and [r["count"] for r in rows] == [5, 3]
    train_target, train_predicted, _ = analysis.feature_prediction(model, train, 7, seed=2, extractor=extractor)
    template = train_target.mean(dim=0, keepdim=True)
    # on the training images the template's error is the targets' spread around their mean
    assert rows[0]["template"] == pytest.approx(float(train_target.var(dim=0, unbiased=False).mean()), rel=1e-5)
    assert rows[0]["head"] == pytest.approx(float((train_predicted - train_target).pow(2).mean()), rel=1e-5)
    test_target, _, _ = analysis.feature_prediction(model, test, 7, seed=2, extractor=extractor)
    assert rows[1]["template"] == pytest.approx(float((template - test_target).pow(2).mean()), rel=1e-5)
    for row in rows:
        assert row["head / template"] == pytest.approx(row["head"] / row["template"])


def test_timestep_correlation_is_one_for_a_map_that_ignores_the_noise_level():
    from diffad.scoring import RawMaps

    generator = torch.Generator().manual_seed(0)
    same = torch.rand(4, 1, 8, 8, generator=generator).expand(4, 3, 8, 8).clone()
    independent = torch.rand(4, 3, 8, 8, generator=generator)
    raw = RawMaps((5, 10, 20), independent, independent, same)
    assert np.allclose(analysis.timestep_correlation(raw, "feature"), 1.0)
    kl = analysis.timestep_correlation(raw, "kl")
    assert kl.shape == (3, 3) and np.allclose(np.diag(kl), 1.0) and abs(kl[0, 2]) < 0.3
