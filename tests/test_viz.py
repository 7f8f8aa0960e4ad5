"""Tests of the figure helpers in diffad.studies.viz: what they draw, and clear errors on bad input."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from diffad.studies import viz
from diffad.metrics import threshold_sweep_curve


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_image_table_layout_labels_and_outlines():
    colour = torch.rand(3, 16, 16)
    grey = np.random.default_rng(0).random((16, 16))
    mask = np.zeros((16, 16))
    mask[4:9, 4:9] = 1
    rows = [[colour, grey, None], [colour]]
    masks = [[mask, None, None], [None]]
    fig = viz.image_table(rows, masks=masks, row_labels=["a", "b"], col_labels=["x", "y", "z"])
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["x", "y", "z"]
    assert [axes[r, 0].get_ylabel() for r in range(2)] == ["a", "b"]
    assert len(axes[0, 0].images) == 1 and len(axes[0, 2].images) == 0 and len(axes[1, 1].images) == 0
    assert axes[0, 0].images[0].get_array().shape == (16, 16, 3)  # channels moved last
    assert len(axes[0, 0].collections) > 0  # the outline contour
    assert len(axes[0, 1].collections) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(row_labels=["only one"]), "row labels"),
    (dict(col_labels=["a"]), "column labels"),
    (dict(masks=[[None, None]]), "nesting"),
])
def test_image_table_rejects_mismatched_labels(kwargs, match):
    rows = [[np.zeros((4, 4)), np.zeros((4, 4))], [np.zeros((4, 4)), np.zeros((4, 4))]]
    with pytest.raises(ValueError, match=match):
        viz.image_table(rows, **kwargs)


def test_image_table_rejects_empty():
    with pytest.raises(ValueError, match="at least one"):
        viz.image_table([])


def test_number_grid_writes_every_value_and_marks_the_mask():
    values = np.array([[0.1, 0.9], [0.4, 0.2]])
    mask = np.array([[0, 1], [0, 0]])
    _, ax = plt.subplots()
    viz.number_grid(ax, values, mask=mask, fmt="{:.1f}", title="scores")
    assert sorted(t.get_text() for t in ax.texts) == ["0.1", "0.2", "0.4", "0.9"]
    assert len(ax.patches) == 1  # one defect cell
    assert ax.get_title() == "scores"
    with pytest.raises(ValueError, match="2-D"):
        viz.number_grid(ax, np.zeros(3))
    with pytest.raises(ValueError, match="mask shape"):
        viz.number_grid(ax, values, mask=np.zeros((3, 3)))


def test_pro_sweep_figure_counts_the_kept_points():
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 12, 12), bool)
    masks[0, 2:6, 2:6] = True
    maps = rng.random(masks.shape) + 0.5 * masks
    fig = viz.pro_sweep_figure(masks, {"plain": maps, "skewed": np.exp(10 * maps)}, thresholds=(20, 50))
    assert len(fig.axes) == 2
    assert fig.axes[0].get_xscale() == "log"
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    _, fprs, _ = threshold_sweep_curve(masks, np.exp(10 * maps), 50)
    kept = fprs <= 0.3
    assert f"50 thresholds: {int(kept.sum())} kept, up to FPR {fprs[kept].max():.2g}" in labels
    assert labels[0].startswith("exact (")


def test_variance_curves_plot_cumulative_sums():
    ax = viz.variance_curves({"a": [0.5, 0.3, 0.2], "b": [1.0]}, fractions=(0.9,))
    lines = [line for line in ax.get_lines() if line.get_label() in ("a (3 channels)", "b (1 channels)")]
    np.testing.assert_allclose(lines[0].get_ydata(), [0.5, 0.8, 1.0])
    np.testing.assert_allclose(lines[0].get_xdata(), [1, 2, 3])
    with pytest.raises(ValueError, match="spectrum 'c'"):
        viz.variance_curves({"c": []})


def _toy_category(n=5, size=12):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, size, size)
    masks[1:, 3:7, 3:7] = 1
    return SimpleNamespace(test_images=torch.rand(n, 3, size, size, generator=g), test_masks=masks,
                           test_labels=torch.tensor([0] + [1] * (n - 1)),
                           defect_types=["good", "stain", "shift", "stain", "hole"])


def test_maps_figure_columns_rows_and_shared_scale():
    data = _toy_category()
    kl = torch.arange(5.0)[:, None, None].expand(5, 12, 12).clone()  # image i is i everywhere
    maps = {"KL": kl, "RGB": torch.rand(5, 12, 12)}
    fig = viz.maps_figure(data, maps, indices=[1, 4])
    axes = np.array(fig.axes).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0]] == ["image", "ground truth", "KL", "RGB"]
    assert [axes[r, 0].get_ylabel() for r in range(2)] == ["stain", "hole"]
    # one scale per map over all images: image 1 is drawn dimmer than image 4
    assert axes[0, 2].images[0].get_array()[0, 0] < 0.5 < axes[1, 2].images[0].get_array()[0, 0]
    assert len(axes[0, 2].collections) > 0 and len(axes[0, 0].collections) == 0  # outlines on maps only
    default = viz.maps_figure(data, maps, n=3)
    assert [a.get_ylabel() for a in np.array(default.axes).reshape(3, 4)[:, 0]] == ["stain", "shift", "hole"]


def test_maps_figure_rejects_bad_maps():
    data = _toy_category()
    with pytest.raises(ValueError, match="at least one map"):
        viz.maps_figure(data, {})
    with pytest.raises(ValueError, match="has 2 images"):
        viz.maps_figure(data, {"KL": torch.zeros(2, 12, 12)})


def test_pipeline_diagram_draws_every_box_of_the_one_pass_pipeline():
    fig = viz.pipeline_diagram()
    assert isinstance(fig, matplotlib.figure.Figure)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    boxed = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_bbox_patch() is not None]
    assert sorted(boxed) == sorted(label for _, _, label in viz.PIPELINE_BOXES.values())
    for words in ("$x_0$", "$x_t$", "UNet", r"$\epsilon_\theta$", "$v$", r"$h_\theta$", "KL map",
                  "feature map", "ensemble", "image score"):
        assert any(words in text for text in boxed), words
    assert sum(isinstance(p, matplotlib.patches.FancyArrowPatch) for p in fig.axes[0].patches) \
        == len(viz.PIPELINE_ARROWS) + 1  # and the route of x0 into the KL map
    assert any("true posterior" in text for text in texts)
