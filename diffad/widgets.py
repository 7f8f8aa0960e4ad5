"""Interactive widgets for the book (ipywidgets, the ``book`` extra).

:func:`alpha_explorer` re-weights the ensemble A = alpha * pixel + (1 - alpha) * feature live:
moving its slider (or switching a normalisation) recomputes the final maps and their metrics
from cached raw maps with :func:`diffad.evaluate.diffusion_rows`, without running the UNet again.
"""

from __future__ import annotations

import html
import io

from diffad.evaluate import diffusion_rows
from diffad.scoring import NORMALIZATIONS, RawMaps

EXPLORER_METHODS = ("ensemble", "kl", "feature")
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
    rows, maps, _ = diffusion_rows(data, raw_test, raw_val, settings)
    return [r for r in rows if r["method"] in EXPLORER_METHODS], maps


def metrics_html(rows: list[dict], alpha: float, normalization: str, image_normalization: str | None = None) -> str:
    """An HTML table of metric rows (the widget's label)."""
    head = "<tr><th>map</th><th>pixel AUROC</th><th>PRO</th><th>image AUROC</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{r['pixel_auroc']:.3f}</td><td>{r['pro']:.3f}</td>"
        f"<td>{r['image_auroc']:.3f}</td></tr>" for r in rows)
    image = html.escape(image_normalization or normalization)
    caption = f"alpha = {alpha:.2f}, maps: {html.escape(normalization)}, image score: {image}"
    return f"<table><caption>{caption}</caption>{head}{body}</table>"


def _figure_png(data, maps: dict, indices) -> bytes:
    import matplotlib.pyplot as plt

    from diffad.viz import overlay_figure

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
    maps of its test and validation images (:func:`diffad.book.scored`); ``preset`` gives the
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
        if value not in MAP_NORMALIZATIONS and not (name == "image_normalization" and value is None):
            raise ValueError(f"{name} must be one of {MAP_NORMALIZATIONS}; got {value!r}")
    if indices is None:
        from diffad.viz import pick_examples

        indices = pick_examples(data.test_labels, data.defect_types, 3)

    slider = widgets.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="alpha",
                                 continuous_update=False, readout_format=".2f")
    dropdown = widgets.Dropdown(options=list(MAP_NORMALIZATIONS), value=normalization, description="maps")
    image_dropdown = widgets.Dropdown(options=[("as the maps", None)] + [(n, n) for n in MAP_NORMALIZATIONS],
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
