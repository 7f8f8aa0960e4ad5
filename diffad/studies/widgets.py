"""Interactive widgets for the book (ipywidgets, the ``book`` extra).

:func:`alpha_explorer` re-weights the ensemble A = alpha * pixel + (1 - alpha) * feature live:
moving its slider (or switching a normalisation) recomputes the final maps and their metrics
from cached raw maps with :func:`diffad.evaluate.diffusion_rows`, without running the UNet again.
"""

from __future__ import annotations

import io

from diffad.evaluate import diffusion_rows
from diffad.scoring import NORMALIZATIONS, RawMaps
from diffad.tables import html_table

EXPLORER_METHODS = ("ensemble", "kl", "feature")
# The dropdowns' choices: "none" (the authors' raw maps, summed 1:1) is offered only where the preset
# itself scores so (the authors preset); on raw maps alpha weighs scales, not evidence.
MAP_NORMALIZATIONS = tuple(n for n in NORMALIZATIONS if n != "none")


def _ipywidgets():
    try:
        import ipywidgets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the widgets need ipywidgets: pip install 'diffad[book]' (or ipywidgets)") from exc
    return ipywidgets


def explorer_metrics(data, raw_test: RawMaps, raw_val: RawMaps, preset, alpha: float, normalization: str,
                     image_normalization: str | None) -> tuple[list[dict], dict]:
    """Metric rows of the ensemble, KL and feature maps at one setting, and the final maps.

    ``normalization`` is that of the maps, ``image_normalization`` that of the maps the image
    score reads (None: the same), as in :class:`diffad.presets.Preset`.
    """
    settings = preset.replace(alpha=alpha, normalization=normalization, image_normalization=image_normalization)
    rows, maps, _ = diffusion_rows(data, raw_test, raw_val, settings, methods=EXPLORER_METHODS)
    return rows, maps


def metrics_html(rows: list[dict], alpha: float, normalization: str, image_normalization: str | None = None) -> str:
    """An HTML table of metric rows (the widget's label)."""
    body = [[r["method"], f"{r['pixel_auroc']:.3f}", f"{r['pro']:.3f}", f"{r['image_auroc']:.3f}"] for r in rows]
    caption = f"alpha = {alpha:.2f}, maps: {normalization}, image score: {image_normalization or normalization}"
    return html_table(["map", "pixel AUROC", "PRO", "image AUROC"], body, caption)


def _figure_png(data, maps: dict, indices) -> bytes:
    import matplotlib.pyplot as plt

    from diffad.overlays import overlay_figure

    fig = overlay_figure(data, maps, indices=indices)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=70, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def alpha_explorer(data, raw_test: RawMaps, raw_val: RawMaps, preset, indices=None, alpha: float | None = None,
                   normalization: str | None = None, image_normalization: str | None = "preset",
                   show_maps: bool = True):
    """A widget: an alpha slider and normalisation dropdowns over the ensemble's maps and metrics.

    ``data`` is a :class:`diffad.evaluate.CategoryData`; ``raw_test`` / ``raw_val`` the cached raw
    maps of its test and validation images (:func:`diffad.studies.book.scored`); ``preset`` gives the
    starting alpha and normalisations, the smoothing and top-k. ``indices`` picks the test images
    drawn (default: one per defect type, 3). Returns an ``ipywidgets.VBox`` with its parts as
    attributes: ``slider``, ``dropdown`` (the maps' normalisation), ``image_dropdown`` (the
    image score's; None: as the maps), ``metrics`` (an HTML label), ``image`` (the figure, PNG)
    and ``update()`` (recompute now).
    """
    widgets = _ipywidgets()
    if len(raw_test) != len(data.test_images):
        raise ValueError(f"raw_test has {len(raw_test)} images but data has {len(data.test_images)} test images")
    alpha = preset.alpha if alpha is None else alpha
    normalization = normalization or preset.normalization
    if image_normalization == "preset":
        image_normalization = preset.image_normalization
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    for name, value in (("normalization", normalization), ("image_normalization", image_normalization)):
        if value not in NORMALIZATIONS and not (name == "image_normalization" and value is None):
            raise ValueError(f"{name} must be one of {NORMALIZATIONS}; got {value!r}")
    choices = MAP_NORMALIZATIONS + tuple(n for n in NORMALIZATIONS if n not in MAP_NORMALIZATIONS
                                         and n in (normalization, image_normalization))
    if indices is None:
        from diffad.overlays import pick_examples

        indices = pick_examples(data.test_labels, data.defect_types, 3)

    slider = widgets.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="alpha",
                                 continuous_update=False, readout_format=".2f")
    dropdown = widgets.Dropdown(options=list(choices), value=normalization, description="maps")
    image_dropdown = widgets.Dropdown(options=[("as the maps", None)] + [(n, n) for n in choices],
                                      value=image_normalization, description="image score")
    metrics = widgets.HTML()
    image = widgets.Image(format="png")

    def update(*_):
        rows, maps = explorer_metrics(data, raw_test, raw_val, preset, slider.value, dropdown.value,
                                      image_dropdown.value)
        metrics.value = metrics_html(rows, slider.value, dropdown.value, image_dropdown.value)
        if show_maps:
            image.value = _figure_png(data, maps, indices)

    for control in (slider, dropdown, image_dropdown):
        control.observe(update, names="value")
    update()
    children = [widgets.HBox([slider, dropdown, image_dropdown]), metrics] + ([image] if show_maps else [])
    box = widgets.VBox(children)
    box.slider, box.dropdown, box.image_dropdown = slider, dropdown, image_dropdown
    box.metrics, box.image, box.update = metrics, image, update
    return box


# ------------------------------------------------- what the widgets show, for the static page
# A widget needs a running kernel; the published book shows its first state at best. These draw
# what moving it shows, with the same library calls, as a figure or a table under the widget.

PAPER_ALPHA = 0.5
PAD = ' style="padding: 0.15em 0.8em"'  # table cells, in pages without a table style
METRIC_COLUMNS = {"pixel_auroc": "pixel AUROC", "pro": "PRO", "image_auroc": "image AUROC"}


def alpha_sweep(data, raw_test: RawMaps, raw_val: RawMaps, preset, alphas, normalization: str | None = None,
                image_normalization: str | None = "preset") -> list[dict]:
    """The ensemble's metric row at each alpha, as :func:`alpha_explorer` computes it at that slider
    position (:func:`explorer_metrics`); the normalisations default to the preset's."""
    normalization = normalization or preset.normalization
    if image_normalization == "preset":
        image_normalization = preset.image_normalization
    rows = []
    for alpha in alphas:
        metric_rows, _ = explorer_metrics(data, raw_test, raw_val, preset, float(alpha), normalization,
                                          image_normalization)
        rows.append({"alpha": float(alpha), **next(r for r in metric_rows if r["method"] == "ensemble")})
    return rows


def alpha_figure(data, raw_test: RawMaps, raw_val: RawMaps, preset, alphas=None,
                 normalizations=MAP_NORMALIZATIONS):
    """The alpha explorer's metrics over the whole slider: one panel per normalisation of the maps
    (the image score's as in the preset), the paper's alpha = 0.5 and the preset's alpha marked.
    Returns the figure; its ``rows`` attribute maps each normalisation to :func:`alpha_sweep`'s rows."""
    import matplotlib.pyplot as plt

    alphas = [round(0.05 * i, 2) for i in range(21)] if alphas is None else list(alphas)
    fig, axes = plt.subplots(1, len(normalizations), figsize=(4.6 * len(normalizations), 3.3), sharey=True,
                             squeeze=False)
    fig.rows = {}
    for ax, normalization in zip(axes[0], normalizations):
        rows = fig.rows[normalization] = alpha_sweep(data, raw_test, raw_val, preset, alphas, normalization)
        for key, label in METRIC_COLUMNS.items():
            ax.plot(alphas, [r[key] for r in rows], marker="o", markersize=3, label=label)
        ax.axvline(PAPER_ALPHA, color="gray", linestyle="--", linewidth=1, label="paper (0.5)")
        ax.axvline(preset.alpha, color="gray", linestyle=":", linewidth=1, label=f"preset ({preset.alpha:g})")
        ax.set(xlabel=r"$\alpha$ (0: feature only, 1: KL only)", title=f"maps: {normalization}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ensemble")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def timestep_figure(data, raw_test: RawMaps, raw_val: RawMaps, preset, subsets):
    """The ensemble's metrics for each subset of timesteps, as the timesteps widget computes them
    (:func:`diffad.evaluate.settings_sweep` over ``test_timesteps``): one group of bars per subset.
    Returns the figure; its ``rows`` attribute holds the metric rows."""
    import matplotlib.pyplot as plt
    import numpy as np

    from diffad.evaluate import settings_sweep

    subsets = [tuple(sorted(s)) for s in subsets]
    rows = settings_sweep(data, raw_test, raw_val, preset, methods=("ensemble",), test_timesteps=subsets)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(subsets) + 2), 3.3))
    x = np.arange(len(subsets))
    width = 0.8 / len(METRIC_COLUMNS)
    for i, (key, label) in enumerate(METRIC_COLUMNS.items()):
        ax.bar(x + (i - 1) * width, [r[key] for r in rows], width, label=label)
    low = min(r[k] for r in rows for k in METRIC_COLUMNS)
    ax.set(xticks=x, ylim=(max(0.0, low - 0.05), 1.0), ylabel="ensemble", xlabel="timesteps averaged")
    ax.set_xticklabels([", ".join(map(str, s)) for s in subsets], rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.rows = rows
    return fig


def table_html(rows: list[dict], columns: dict[str, str], caption: str | None = None) -> str:
    """An HTML table of ``rows`` (dicts): ``columns`` maps a key to its header; floats in [0, 1]
    print as percentages with one decimal, like the widgets' printed metrics."""
    def cell(value):
        return f"{100 * value:.1f}" if isinstance(value, float) and 0.0 <= value <= 1.0 else value

    body = [[cell(r.get(key, "")) for key in columns] for r in rows]
    return html_table(list(columns.values()), body, caption, cell_attributes=PAD)
