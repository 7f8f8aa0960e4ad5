"""Figures the chapters share: image grids, curves, tables of images, the pipeline diagram; the
anomaly-map overlays (the paper's Fig. 4/6) come from :mod:`diffad.overlays`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

# the figures every run writes live in the core (reproduce's overlays.png, predict's overlays); the
# chapters' own figures are below
from diffad.overlays import _rescale, outline, overlay_figure, overlay_image, pick_examples, to_numpy_image  # noqa: F401


def image_grid(images, titles=None, masks=None, ncols=8, size=1.6):
    """A grid of images, with defect outlines when masks are given."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(to_numpy_image(images[i]), cmap="gray", vmin=0, vmax=1)
        if masks is not None:
            outline(ax, masks[i])
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def metric_curves(x, series: dict, xlabel: str, ylabel: str = "score", title: str | None = None, ax=None):
    """Lines of several metrics against one setting (alpha, timestep, ...)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, values in series.items():
        ax.plot(x, values, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def image_table(rows, masks=None, row_labels=None, col_labels=None, size=1.5, cmap="gray", mask_color="lime"):
    """A table of images: ``rows`` is a list of rows, each a list of images (None leaves a cell empty).

    Images may be (3, H, W) / (H, W, 3) colour in [0, 1] or (H, W) maps in [0, 1] (drawn with
    ``cmap``). ``masks``, with the same nesting, draws defect outlines; ``row_labels`` go on the
    left, ``col_labels`` above the first row.
    """
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_table needs at least one row with one image")
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")
    if masks is not None and (len(masks) != n_rows or any(len(m) != len(r) for m, r in zip(masks, rows))):
        raise ValueError("masks must have the same nesting (rows x images) as rows")
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0 and col_labels is not None:
                ax.set_title(col_labels[c], fontsize=8)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
            if c >= len(row) or row[c] is None:
                continue
            image = to_numpy_image(row[c])
            # Small maps (feature grids) keep their cells visible.
            smooth = "antialiased" if min(image.shape[:2]) >= 32 else "nearest"
            ax.imshow(image, cmap=None if image.ndim == 3 else cmap, vmin=0, vmax=1, interpolation=smooth)
            if masks is not None and masks[r][c] is not None:
                outline(ax, masks[r][c], color=mask_color)
    fig.tight_layout()
    return fig


def number_grid(ax, values, mask=None, fmt="{:g}", title=None, cmap="viridis"):
    """A small score map drawn cell by cell with its numbers written in (for worked examples).

    ``mask`` (same shape, nonzero = defect) is drawn as thick red cell borders.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"number_grid draws a 2-D array, got shape {values.shape}")
    ax.imshow(values, cmap=cmap)
    low, high = values.min(), values.max()
    for (y, x), v in np.ndenumerate(values):
        bright = high > low and (v - low) / (high - low) > 0.6
        ax.text(x, y, fmt.format(v), ha="center", va="center", fontsize=8, color="black" if bright else "white")
    if mask is not None:
        mask = np.asarray(mask) != 0
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {mask.shape} differs from values shape {values.shape}")
        for y, x in zip(*np.nonzero(mask)):
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def pro_sweep_figure(masks, maps_by_name: dict, thresholds=(200, 1000), fpr_limit: float = 0.3, log_x: bool = True):
    """The exact PRO curve against the points a threshold sweep sees, one panel per score map.

    ``maps_by_name`` maps a title (e.g. ``"scores"``, ``"exp(scores)"``) to (N, H, W) maps of the
    same ``masks``. Sweep points beyond ``fpr_limit`` are drawn faint; the legend gives, per
    sweep, how many points it keeps below the limit and the largest kept FPR (the sweep
    rescales that FPR to the limit). ``log_x`` spreads out the low false-positive rates, where
    the sweep's points crowd on skewed scores.
    """
    from diffad.metrics import pro_curve, threshold_sweep_curve

    fig, axes = plt.subplots(1, len(maps_by_name), figsize=(4.4 * len(maps_by_name), 3.5), squeeze=False)
    markers = ["o", "x", "s", "^"]
    x_max = min(1.0, 1.5 * fpr_limit)
    for ax, (name, maps) in zip(axes[0], maps_by_name.items()):
        fprs, pros = pro_curve(masks, maps)
        ax.plot(fprs, pros, color="black", linewidth=1.5, label=f"exact ({len(fprs) - 2} thresholds)")
        smallest = fprs[fprs > 0].min()
        for marker, count in zip(markers, thresholds):
            _, sweep_fprs, sweep_pros = threshold_sweep_curve(masks, maps, count)
            kept = sweep_fprs <= fpr_limit
            largest = sweep_fprs[kept].max() if kept.any() else 0.0
            line = ax.plot(sweep_fprs[kept], sweep_pros[kept], marker, markersize=4, linestyle="none",
                           label=f"{count} thresholds: {int(kept.sum())} kept, up to FPR {largest:.2g}")[0]
            ax.plot(sweep_fprs[~kept], sweep_pros[~kept], marker, markersize=3, linestyle="none",
                    color=line.get_color(), alpha=0.2)
            if sweep_fprs[sweep_fprs > 0].size:
                smallest = min(smallest, sweep_fprs[sweep_fprs > 0].min())
        ax.axvline(fpr_limit, color="grey", linestyle="--", linewidth=0.8)
        if log_x:
            ax.set_xscale("log")
            ax.set_xlim(smallest / 2, x_max)
            ax.set_xlabel("false-positive rate (log scale)")
        else:
            ax.set_xlim(0, x_max)
            ax.set_xlabel("false-positive rate")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("per-region overlap")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def variance_curves(spectra: dict, fractions=(0.9, 0.95), ax=None):
    """Cumulative explained variance against the number of principal components, one line each.

    ``spectra`` maps a name to the descending variance ratios of
    :func:`diffad.studies.feature_analysis.explained_variance`; dotted lines mark ``fractions``.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, ratios in spectra.items():
        ratios = np.asarray(ratios, dtype=float)
        if ratios.ndim != 1 or len(ratios) == 0:
            raise ValueError(f"spectrum {name!r} must be a non-empty 1-D array of variance ratios")
        ax.plot(np.arange(1, len(ratios) + 1), np.cumsum(ratios), label=f"{name} ({len(ratios)} channels)")
    for fraction in fractions:
        ax.axhline(fraction, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return ax


def maps_figure(data, maps: dict, indices=None, n: int = 4, cmap: str = "inferno", size: float = 1.6):
    """Test images, their ground truth and several anomaly maps side by side, one row per image.

    ``data`` has ``test_images``, ``test_masks``, ``test_labels`` and ``defect_types``
    (:class:`diffad.evaluate.CategoryData`); ``maps`` maps a column title to (N, H, W) maps.
    Each map is scaled once over all test images (robust 1st-99.5th percentile), so brightness
    compares across rows; the defect is outlined on every map. ``indices`` default: ``n``
    defective images, one per defect type first.
    """
    if not maps:
        raise ValueError("maps_figure needs at least one map")
    count = len(data.test_images)
    for name, values in maps.items():
        if len(values) != count:
            raise ValueError(f"map {name!r} has {len(values)} images, data has {count} test images")
    if indices is None:
        indices = pick_examples(data.test_labels, data.defect_types, n)
    scaled = {name: _rescale(values.numpy() if torch.is_tensor(values) else np.asarray(values))
              for name, values in maps.items()}
    rows, masks = [], []
    for i in indices:
        rows.append([data.test_images[i], np.asarray(data.test_masks[i], dtype=float)] +
                    [scaled[name][i] for name in maps])
        masks.append([None, None] + [data.test_masks[i]] * len(maps))
    fig = image_table(rows, masks=masks, row_labels=[data.defect_types[i] for i in indices],
                      col_labels=["image", "ground truth"] + list(maps), size=size, cmap=cmap, mask_color="cyan")
    return fig


# The boxes of :func:`pipeline_diagram`: name -> (centre x, centre y, label), in axes fractions.
PIPELINE_BOXES = {
    "x0": (0.06, 0.55, "$x_0$\ntest image"),
    "xt": (0.215, 0.55, "noise once to $x_t$\n"
                        r"$\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$"),
    "unet": (0.375, 0.55, "UNet\none pass at $t$"),
    "eps": (0.53, 0.80, r"$\epsilon_\theta$" "\npredicted noise"),
    "v": (0.53, 0.57, "$v$\nvariance interpolation"),
    "features": (0.53, 0.30, r"$h_\theta$" "\npredicted features"),
    "backbone": (0.375, 0.07, r"backbone $\phi(x_0)$" "\nfrozen ImageNet CNN"),
    "kl": (0.72, 0.68, "KL map, per pixel\n" r"$D_\mathrm{KL}(q\,\|\,p_\theta)$"),
    "feature_map": (0.72, 0.30, "feature map\n" r"$\|\phi(x_0) - h_\theta\|^2$"),
    "ensemble": (0.905, 0.49, "ensemble, mean over $t$\n"
                              r"$\alpha\,\hat s_\mathrm{KL} + (1-\alpha)\,s_\mathrm{feature}$"),
    "score": (0.905, 0.15, "image score\nmean of the top-k pixels"),
}
# (from, to, label on the arrow or None, where the label goes)
PIPELINE_ARROWS = (
    ("x0", "xt", None, None), ("xt", "unet", None, None), ("unet", "eps", None, None),
    ("unet", "v", None, None), ("unet", "features", None, None), ("x0", "backbone", None, None),
    ("eps", "kl", r"$\hat x_0 \to$ mean", (0.655, 0.80)),
    ("v", "kl", r"$\Sigma_\theta$", (0.635, 0.595)),
    ("features", "feature_map", None, None),
    ("backbone", "feature_map", "target", (0.60, 0.145)),
    ("kl", "ensemble", "z-score", (0.845, 0.65)),
    ("feature_map", "ensemble", None, None), ("ensemble", "score", None, None),
)


def pipeline_diagram(figsize=(13, 4.6)):
    """The one-pass pipeline as a box-and-arrow figure (a lecture slide); returns the Figure.

    x0 is noised once to x_t; one UNet pass gives the noise prediction, the variance
    interpolation and the feature head's prediction; the first two with x0 give the KL map, the
    third with the backbone's features of x0 the feature map; the maps of every test timestep
    are normalised and ensembled, and the image score reads the final map. The boxes are
    :data:`PIPELINE_BOXES`, the arrows :data:`PIPELINE_ARROWS`.
    """
    from matplotlib.patches import FancyArrowPatch

    fig, ax = plt.subplots(figsize=figsize)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    colours = {"x0": "#e8e8e8", "xt": "#e8e8e8", "unet": "#cfe2f3", "eps": "#cfe2f3", "v": "#cfe2f3",
               "features": "#cfe2f3", "backbone": "#fce5cd", "kl": "#d9ead3", "feature_map": "#d9ead3",
               "ensemble": "#fff2cc", "score": "#fff2cc"}
    # the per-timestep part of the pipeline
    ax.add_patch(plt.Rectangle((0.135, 0.17), 0.675, 0.76, fill=False, linestyle="--",
                               edgecolor="grey", linewidth=0.8))
    ax.text(0.14, 0.92, "for each test timestep $t$: one UNet pass", fontsize=8, color="grey",
            va="top")
    texts = {}
    for name, (x, y, label) in PIPELINE_BOXES.items():
        texts[name] = ax.text(x, y, label, ha="center", va="center", fontsize=8.5, zorder=3,
                              bbox=dict(boxstyle="round,pad=0.45", facecolor=colours[name],
                                        edgecolor="black", linewidth=0.8))
    fig.canvas.draw()  # the text boxes get their sizes: arrows start and end at their edges

    def arrow(start, end, **style):
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, zorder=4,
                                     **{"linewidth": 1.0, "color": "black", **style}))

    for start, end, label, where in PIPELINE_ARROWS:
        arrow(PIPELINE_BOXES[start][:2], PIPELINE_BOXES[end][:2],
              patchA=texts[start].get_bbox_patch(), patchB=texts[end].get_bbox_patch())
        if label:
            ax.text(*where, label, ha="center", va="center", fontsize=7.5, color="dimgrey", zorder=5)
    # x0 (with x_t) also enters the KL map: the true posterior q(x_{t-1} | x_t, x0) needs the
    # clean image. Drawn as a route over the top of the frame.
    x0_x, kl_x, top = PIPELINE_BOXES["x0"][0], PIPELINE_BOXES["kl"][0] + 0.05, 0.97
    ax.plot([x0_x, x0_x, kl_x], [0.62, top, top], color="dimgrey", linestyle="--", linewidth=1.0)
    arrow((kl_x, top), (kl_x, PIPELINE_BOXES["kl"][1]), patchB=texts["kl"].get_bbox_patch(),
          color="dimgrey", linestyle="--")
    ax.text(0.40, top + 0.005, "$x_0$ and $x_t$ give the true posterior $q$", fontsize=7.5,
            color="dimgrey", ha="center", va="bottom")
    return fig


def threshold_tradeoff_figure(normal_scores, defect_scores, threshold: float | None = None, marks: dict | None = None,
                              ax=None, title: str | None = None, log_x: bool = False):
    """False alarms against misses as the threshold moves: the share of normal images above it and of
    defective images at or below it, at every threshold; ``threshold`` and ``marks`` (label -> value)
    drawn as vertical lines; ``log_x`` for positive scores that span decades."""
    normal = np.sort(np.asarray(normal_scores, dtype=np.float64))
    defect = np.sort(np.asarray(defect_scores, dtype=np.float64))
    grid = np.unique(np.concatenate([normal, defect]))
    if log_x and grid[0] > 0:
        grid = np.concatenate([[grid[0] / 1.2], grid, [grid[-1] * 1.2]])
    else:
        log_x, pad = False, 0.05 * max(grid[-1] - grid[0], 1e-12)
        grid = np.concatenate([[grid[0] - pad], grid, [grid[-1] + pad]])
    false_alarms = 1.0 - np.searchsorted(normal, grid, side="right") / max(len(normal), 1)
    misses = np.searchsorted(defect, grid, side="right") / max(len(defect), 1)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.step(grid, 100 * false_alarms, where="post", color="tab:blue", label="false alarms (% of good images)")
    ax.step(grid, 100 * misses, where="post", color="tab:red", label="misses (% of defective images)")
    lines = {} if threshold is None else {"threshold": threshold}
    lines.update(marks or {})
    for (label, value), style in zip(lines.items(), ("-", "--", ":", "-.")):
        ax.axvline(value, color="black", linestyle=style, linewidth=1, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("threshold on the image score" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8, loc="center right")
    if title:
        ax.set_title(title)
    return ax
