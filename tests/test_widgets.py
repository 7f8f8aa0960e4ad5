"""Tests of diffad.studies.widgets: the alpha explorer recomputes maps and metrics when driven programmatically."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

pytest.importorskip("ipywidgets")

from diffad.studies import widgets
from diffad.evaluate import CategoryData
from diffad.metrics import image_auroc, pixel_auroc, pro
from diffad.presets import get_preset
from diffad.scoring import Normalizer, RawMaps, anomaly_maps, image_scores

N, K, H = 8, 2, 16


@pytest.fixture(scope="module")
def setting():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    masks = torch.zeros(N, H, H)
    for i in range(3, N):
        masks[i, i:i + 4, 2:7] = 1
    types = ["good"] * 3 + ["stain", "shift", "stain", "shift", "stain"]
    data = CategoryData("toy", torch.rand(4, 3, H, H, generator=g), torch.rand(3, 3, H, H, generator=g),
                        torch.rand(N, 3, H, H, generator=g), masks, labels, types)
    # KL sees the defects weakly, features strongly but noisily: alpha matters
    kl = torch.rand(N, K, H, H, generator=g) + 0.5 * masks[:, None]
    feature = 2 * torch.rand(N, K, H, H, generator=g) + 1.5 * masks[:, None]
    raw_test = RawMaps((5, 10), kl, torch.rand(N, K, H, H, generator=g), feature)
    raw_val = RawMaps((5, 10), torch.rand(4, K, H, H, generator=g), torch.rand(4, K, H, H, generator=g),
                      2 * torch.rand(4, K, H, H, generator=g))
    preset = get_preset("cpu", smoothing_sigma=0.0, top_k=64, normalization="per_image",
                        image_normalization="validation")
    return data, raw_test, raw_val, preset


def expected_cells(setting, alpha, normalization, method="ensemble", image_normalization=None):
    data, raw_test, raw_val, preset = setting
    maps = anomaly_maps(raw_test, alpha, normalization, Normalizer.fit(raw_val), 0.0)[method]
    image_maps = anomaly_maps(raw_test, alpha, image_normalization or normalization, Normalizer.fit(raw_val), 0.0)
    scores = image_scores(image_maps[method], preset.top_k)
    return [f"{pixel_auroc(data.test_masks, maps):.3f}", f"{pro(data.test_masks, maps):.3f}",
            f"{image_auroc(data.test_labels, scores):.3f}"]


def row_cells(html_text, method):
    row = html_text.split(f"<tr><td>{method}</td>")[1].split("</tr>")[0]
    return [cell.replace("</td>", "") for cell in row.split("<td>")[1:]]


def test_slider_and_dropdown_update_the_metrics_and_the_figure(setting):
    data, raw_test, raw_val, preset = setting
    explorer = widgets.alpha_explorer(data, raw_test, raw_val, preset, alpha=0.5, normalization="validation",
                                      image_normalization=None)
    assert explorer.slider.value == 0.5 and explorer.dropdown.value == "validation"
    assert explorer.image_dropdown.value is None
    assert row_cells(explorer.metrics.value, "ensemble") == expected_cells(setting, 0.5, "validation")
    first_png = explorer.image.value
    assert first_png[:4] == b"\x89PNG"

    explorer.slider.value = 1.0  # all KL: the ensemble row equals the KL row
    assert "alpha = 1.00" in explorer.metrics.value
    assert row_cells(explorer.metrics.value, "ensemble") == expected_cells(setting, 1.0, "validation")
    assert row_cells(explorer.metrics.value, "ensemble") == row_cells(explorer.metrics.value, "kl")
    assert explorer.image.value != first_png

    explorer.slider.value = 0.0  # all feature
    assert row_cells(explorer.metrics.value, "ensemble") == row_cells(explorer.metrics.value, "feature")

    explorer.slider.value = 0.3
    explorer.dropdown.value = "per_image"
    assert "maps: per_image, image score: per_image" in explorer.metrics.value
    assert row_cells(explorer.metrics.value, "ensemble") == expected_cells(setting, 0.3, "per_image")
    assert row_cells(explorer.metrics.value, "kl") == expected_cells(setting, 0.3, "per_image", "kl")

    explorer.image_dropdown.value = "validation"  # image scores from validation-normalised maps
    assert "maps: per_image, image score: validation" in explorer.metrics.value
    assert row_cells(explorer.metrics.value, "ensemble") == expected_cells(setting, 0.3, "per_image",
                                                                            image_normalization="validation")


def test_raw_maps_are_offered_only_where_the_preset_scores_so(setting):
    """The authors preset sums raw maps (normalization "none"): its explorer starts there and offers it."""
    data, raw_test, raw_val, preset = setting
    assert "none" not in widgets.alpha_explorer(data, raw_test, raw_val, preset, show_maps=False).dropdown.options
    authors_like = preset.replace(normalization="none")
    explorer = widgets.alpha_explorer(data, raw_test, raw_val, authors_like, show_maps=False)
    assert explorer.dropdown.value == "none" and "none" in explorer.dropdown.options
    assert row_cells(explorer.metrics.value, "ensemble") == expected_cells(setting, preset.alpha, "none")


def test_without_maps_and_bad_input(setting):
    data, raw_test, raw_val, preset = setting
    explorer = widgets.alpha_explorer(data, raw_test, raw_val, preset, show_maps=False)
    assert explorer.slider.value == preset.alpha and explorer.dropdown.value == preset.normalization
    assert explorer.image_dropdown.value == preset.image_normalization
    assert len(explorer.children) == 2 and explorer.image.value == b""
    with pytest.raises(ValueError, match="alpha must be in"):
        widgets.alpha_explorer(data, raw_test, raw_val, preset, alpha=1.5)
    with pytest.raises(ValueError, match="normalization must be one of"):
        widgets.alpha_explorer(data, raw_test, raw_val, preset, normalization="zscore")
    with pytest.raises(ValueError, match="image_normalization must be one of"):
        widgets.alpha_explorer(data, raw_test, raw_val, preset, image_normalization="zscore")
    short = RawMaps((5, 10), raw_test.kl[:3], raw_test.rgb[:3], raw_test.feature[:3])
    with pytest.raises(ValueError, match="raw_test has 3 images"):
        widgets.alpha_explorer(data, short, raw_val, preset)
