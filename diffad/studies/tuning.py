"""Choosing scoring settings on the development set, by a rule fixed before looking.

The protocol (chapter 7b): the cpu preset's scoring settings (``SCORING_GRID``'s fields) are
chosen on :func:`diffad.data.make_development_dataset`'s categories, which share neither the
source photographs nor the seed with any reported category, and whose defects come from the
built-in painter. The cross-check data (a second, independent painter) is never looked at while
choosing. The choice is the grid point with the highest :func:`selection_score`: the ensemble's
pixel AUROC, PRO and image AUROC, averaged over the three metrics and the development categories.

Everything here re-weights cached raw maps (the computations of :func:`diffad.scoring.final_maps`,
shared across the grid): the grid costs no UNet pass beyond the one scoring run per category.
"""

from __future__ import annotations

import itertools

import numpy as np

from diffad.evaluate import RESULT_COLUMNS, CategoryData
from diffad.metrics import image_auroc, pixel_auroc, pro
from diffad.presets import Preset
from diffad.scoring import Normalizer, RawMaps, image_scores, normalized
from diffad.scoring import ensemble as ensemble_of

# The settings searched, each with the values tried (the preset's own value must be among them).
SCORING_GRID: dict[str, tuple] = {
    "alpha": tuple(round(0.1 * i, 1) for i in range(11)),
    "normalization": ("per_image", "validation"),
    "image_normalization": ("per_image", "validation"),
    "smoothing_sigma": (0.0, 1.0, 2.0, 4.0),
    "top_k": (64, 256, 1024, 4096),
}
SELECTION_METHOD = "ensemble"
SELECTION_METRICS = RESULT_COLUMNS[2:]  # pixel AUROC, PRO, image AUROC, weighted equally


def selection_score(rows: list[dict]) -> float:
    """The number a choice maximises: the mean of ``SELECTION_METRICS`` over ``rows`` (one setting,
    one method, one row per development category)."""
    return float(np.mean([[row[m] for m in SELECTION_METRICS] for row in rows]))


def _metric_rows(data: CategoryData, raw_test: RawMaps, raw_val: RawMaps, grid: dict[str, tuple],
                 methods: tuple[str, ...]) -> list[dict]:
    """One category's rows: pixel metrics once per (normalization, smoothing, alpha) and image
    AUROC per (image normalization, top_k), since the pixel maps do not depend on the latter."""
    masks, labels = data.test_masks, data.test_labels
    rows = []
    for sigma in grid["smoothing_sigma"]:
        normalizer = Normalizer.fit(raw_val, sigma)
        maps = {n: {kind: normalized(raw_test, kind, n, normalizer, sigma) for kind in ("kl", "feature")}
                for n in set(grid["normalization"]) | set(grid["image_normalization"])}
        image_points = list(itertools.product(grid["image_normalization"], grid["top_k"]))
        # the branches alone do not depend on alpha: their image AUROC once per (normalization, top_k)
        alone_image = {(n, k): {m: image_auroc(labels, image_scores(maps[n][m], k)) for m in methods if m != "ensemble"}
                       for n, k in image_points}
        for normalization in grid["normalization"]:
            branch = maps[normalization]
            alone = {m: (pixel_auroc(masks, branch[m]), pro(masks, branch[m])) for m in methods if m != "ensemble"}
            for alpha in grid["alpha"]:
                ensemble = ensemble_of(branch["kl"], branch["feature"], alpha)
                pixel = {**alone, "ensemble": (pixel_auroc(masks, ensemble), pro(masks, ensemble))}
                for image_normalization, top_k in image_points:
                    image = dict(alone_image[image_normalization, top_k])
                    if "ensemble" in methods:
                        both = maps[image_normalization]
                        image["ensemble"] = image_auroc(
                            labels, image_scores(ensemble_of(both["kl"], both["feature"], alpha), top_k))
                    for method in methods:
                        rows.append({"alpha": alpha, "normalization": normalization,
                                     "image_normalization": image_normalization, "smoothing_sigma": sigma,
                                     "top_k": top_k, "category": data.category, "method": method,
                                     "pixel_auroc": pixel[method][0], "pro": pixel[method][1],
                                     "image_auroc": image[method]})
    return rows


def sweep(datasets: list[tuple[CategoryData, RawMaps, RawMaps]], grid: dict[str, tuple] | None = None,
          methods: tuple[str, ...] = ("ensemble", "kl", "feature")) -> list[dict]:
    """Rows of every grid point on every ``(data, raw_test, raw_val)`` category: the settings
    (every field of ``SCORING_GRID``), the category, the method and its three metrics (exact PRO).

    ``grid`` may narrow a field's values; fields it leaves out take all of ``SCORING_GRID``'s.
    """
    grid = {**SCORING_GRID, **(grid or {})}
    unknown = [name for name in grid if name not in SCORING_GRID]
    if unknown:
        raise ValueError(f"cannot sweep {unknown}: the development sweep covers {list(SCORING_GRID)}")
    bad = [m for m in methods if m not in ("ensemble", "kl", "feature")]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; the sweep scores ensemble, kl and feature")
    rows = []
    for data, raw_test, raw_val in datasets:
        rows += _metric_rows(data, raw_test, raw_val, grid, tuple(methods))
    return rows


def ranked(rows: list[dict], method: str = SELECTION_METHOD) -> list[dict]:
    """Each grid point of ``rows`` once, best first by :func:`selection_score` of ``method``: the
    settings, ``score`` and the metrics averaged over the categories."""
    settings = [k for k in rows[0] if k in SCORING_GRID]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["method"] == method:
            groups.setdefault(tuple(row[k] for k in settings), []).append(row)
    if not groups:
        raise ValueError(f"no rows of method {method!r}")
    sizes = {len(group) for group in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"grid points cover different numbers of categories: {sorted(sizes)}")
    out = [{**dict(zip(settings, key)), "score": selection_score(group),
            **{m: float(np.mean([r[m] for r in group])) for m in SELECTION_METRICS}}
           for key, group in groups.items()]
    return sorted(out, key=lambda r: r["score"], reverse=True)


def _settings(point: dict) -> dict:
    """The ``SCORING_GRID`` fields of a grid point (a row of :func:`ranked`)."""
    return {k: v for k, v in point.items() if k in SCORING_GRID}


def choose(rows: list[dict], method: str = SELECTION_METHOD) -> dict:
    """The settings of the best grid point (ties: the first in grid order)."""
    return _settings(ranked(rows, method)[0])


def setting_effects(rows: list[dict], chosen: dict, method: str = SELECTION_METHOD) -> list[dict]:
    """Each setting moved alone from ``chosen`` over its grid values, the others held: one row per
    (setting, value) with the metrics averaged over the categories and the selection score."""
    out, points = [], ranked(rows, method)
    for name in chosen:
        moved = [row for row in points if all(row[k] == v for k, v in chosen.items() if k != name)]
        for row in sorted(moved, key=lambda r: SCORING_GRID[name].index(r[name])):
            out.append({"setting": name, "value": row[name], "score": row["score"],
                        **{m: row[m] for m in SELECTION_METRICS}})
    return out


def preset_point(preset: Preset) -> dict:
    """The grid point a preset scores at (``image_normalization`` None means the maps' own)."""
    point = {name: getattr(preset, name) for name in SCORING_GRID}
    point["image_normalization"] = preset.image_normalization or preset.normalization
    return point


def tune(data_root, out, preset: str | Preset = "cpu", categories: list[str] | None = None, device=None,
         grid: dict[str, tuple] | None = None, **overrides) -> tuple[dict, list[dict]]:
    """The whole protocol on a development set: train (or load, or resume) one model per category
    under ``out``, score each once, sweep the grid and choose. Writes ``out/sweep.csv`` (every
    row) and ``out/chosen.json`` (the choice and the preset's own point); returns (choice, rows)."""
    import csv
    import json
    from pathlib import Path

    from diffad.data import list_categories
    from diffad.evaluate import score_category
    from diffad.presets import get_preset
    from diffad.train import fit

    out = Path(out)
    categories = categories or list_categories(data_root)
    base = get_preset(preset, **overrides)
    datasets = []
    for category in categories:
        model = fit(data_root, [category], out / category, base, device=device)
        data = CategoryData.load(data_root, category, model.preset)
        datasets.append((data, *score_category(model, data, device=device)))
    rows = sweep(datasets, grid)
    best = ranked(rows)[0]
    chosen = _settings(best)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "chosen.json").write_text(json.dumps(
        {"chosen": chosen, "preset": base.name, "preset_point": preset_point(base),
         "score": best["score"], "metrics": {m: best[m] for m in SELECTION_METRICS}, "categories": categories},
        indent=1))
    return chosen, rows
