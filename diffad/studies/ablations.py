"""Ablations: what each choice of the method is worth, measured on the same data.

The ablation chapter changes one thing at a time and keeps the rest. Most ablations need no
new UNet pass: :func:`diffad.evaluate.settings_sweep` re-weights the cached raw maps (alpha,
normalisation, smoothing, a subset of the scored timesteps). What this module adds:

* :func:`rescored` -- the same trained model with other *scoring* settings (timesteps, the
  respacing, the authors' timestep mode), refusing any field that would need retraining;
* :func:`timestep_ranges` -- which original diffusion step a scoring timestep is, and
  whether the model ever saw noise that strong in training;
* :func:`padim_row`, :func:`backbone_ablation`, :func:`unified_padim_rows` -- the backbone
  and unified-model ablations on the feature side, with PaDiM on the preset's images: a
  new backbone for the diffusion model means retraining it, which is the GPU version;
* :func:`backbone_options` -- timm CNNs the feature extractor can use, marked when their
  weights load offline;
* :func:`comparison_markdown` -- two sets of results side by side with the change (Table 2);
  :func:`sweep_markdown` -- a settings sweep as a table, averaged over categories;
* :func:`rank_timestep_subsets` -- every subset of the scored timesteps, best first;
* :func:`error_maps`, :func:`error_map_rows` -- KL against RGB errors from one pass: the
  learned or a fixed variance, squared or absolute error, with and without smoothing;
* :func:`authors_difference_rows` -- the authors' departures from the paper, one at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import timm
import torch

from diffad.backbones import FeatureExtractor, available_offline, default_layers
from diffad.baselines import PaDiM
from diffad.evaluate import METRIC_LABELS, CategoryData, diffusion_rows, metric_row
from diffad.presets import SCORING_FIELDS, Preset, get_preset
from diffad.tables import markdown_table
from diffad.device import pick_device
from diffad.models.denoiser import TrainedModel, build_diffusion, build_feature_extractor

# One model for every category. [paper] The unified model trains 20k steps (twice the
# per-category 10k); [note] the cpu preset doubles its 600 steps the same way. A unified
# model needs the category label, so it is class-conditional.
UNIFIED_TRAINING: dict[str, dict] = {
    "cpu": {"class_cond": True, "train_steps": 1200, "lr_anneal_steps": 1200},
    "paper": {"class_cond": True, "train_steps": 20_000, "lr_anneal_steps": 20_000},
}  # any other preset (authors, one made by hand): twice its own steps

# The variant studies need one model per variant and category: chapter 13's authors' training
# choices, 8 models on the cpu preset with their base. [note] There they train 200 steps, a third
# of the preset's 600, so that all of them ship (about 3 minutes each instead of 8) and each is
# compared with a base model trained the same 200 steps: they measure what a training choice does
# to a short run, not to the shipped models. Chapter 10b's training seeds train the preset's own
# 600 steps (seed 0 is the shipped model). Other presets study their own schedule.
VARIANT_STUDY_TRAINING: dict[str, dict] = {"cpu": {"train_steps": 200, "lr_anneal_steps": 200}}


def variant_study_preset(preset: Preset) -> Preset:
    """``preset`` with the training schedule its variant studies use (``VARIANT_STUDY_TRAINING``)."""
    return preset.replace(**VARIANT_STUDY_TRAINING.get(preset.name, {}))


# timm families the feature extractor has default stages for (see diffad.backbones).
BACKBONE_PATTERNS = ("tf_efficientnet_*", "efficientnet_*", "mobilenetv2_*", "mobilenetv3_*", "resnet*",
                     "wide_resnet*", "resnext*")


def unified_overrides(preset: str | Preset) -> dict:
    """The preset overrides a unified (all-category) model is trained with."""
    name = preset.name if isinstance(preset, Preset) else preset
    if name in UNIFIED_TRAINING:
        return dict(UNIFIED_TRAINING[name])
    preset = get_preset(preset)  # a name or a Preset; an unknown name is an error naming the presets
    steps = 2 * preset.train_steps  # [paper] twice the per-category steps, as for paper and cpu
    return {"class_cond": True, "train_steps": steps, "lr_anneal_steps": steps}


def matched_unified_overrides(preset: str | Preset, categories: list[str]) -> dict:
    """Overrides for a unified model of ``categories`` trained with as many steps as their
    single-category models together (each category's own steps, ``for_categories``, so a
    lengthened category brings its longer budget): the compute-matched counterpart of
    :func:`unified_overrides`, trained on every category it is compared on (chapter 11b)."""
    preset = get_preset(preset)
    steps = sum(preset.for_categories(c).train_steps for c in categories)
    return {"class_cond": True, "train_steps": steps, "lr_anneal_steps": steps}


def rescored(model: TrainedModel, **scoring_fields) -> TrainedModel:
    """The same trained weights with other scoring settings (``test_timesteps``, ``timestep_mode``, ...).

    Only fields that leave training unchanged are allowed (``diffad.presets.SCORING_FIELDS``);
    the UNet is shared with ``model``, not copied.
    """
    training = sorted(set(scoring_fields) - SCORING_FIELDS)
    if training:
        raise ValueError(f"{training} change what training produces; retrain instead "
                         f"(scoring fields are {sorted(SCORING_FIELDS - {'name'})})")
    return dataclasses.replace(model, preset=model.preset.replace(**scoring_fields))


def timestep_ranges(preset: Preset, timesteps: tuple[int, ...] | None = None) -> list[dict]:
    """For each scoring timestep: its original step of T and whether training sampled that step.

    Timesteps index the preset's scoring schedule (``timestep_respacing``); training samples
    original steps below ``max_train_timestep`` (all T when None).
    """
    timesteps = tuple(preset.test_timesteps if timesteps is None else timesteps)
    diffusion = build_diffusion(preset, preset.timestep_respacing)
    bad = [t for t in timesteps if not 0 <= t < diffusion.num_timesteps]
    if bad:
        raise ValueError(f"timesteps {bad} outside the {diffusion.num_timesteps}-step scoring schedule")
    original = diffusion.model_timesteps(torch.tensor(timesteps, dtype=torch.long)).tolist()
    limit = preset.max_train_timestep or preset.diffusion_steps
    return [{"timestep": t, "original_step": o, "trained_on": o < limit, "train_limit": limit}
            for t, o in zip(timesteps, original)]


def backbone_extractor(preset: Preset, backbone: str | None = None, device=None) -> FeatureExtractor:
    """The preset's feature extractor (grid, input size) with another backbone and its default stages."""
    if backbone is not None and backbone != preset.backbone:
        preset = preset.replace(backbone=backbone, backbone_layers=None)
    return build_feature_extractor(preset, device)


def padim_row(data: CategoryData, extractor: FeatureExtractor, train_images: torch.Tensor | None = None,
              method: str = "padim", device=None) -> tuple[dict, torch.Tensor]:
    """PaDiM on ``data``'s test split with this extractor: a metrics row (with the backbone) and the maps.

    It is fitted on ``train_images`` (default: the category's own normal training images).
    """
    padim = PaDiM(extractor=extractor, device=device or extractor.mean.device)
    padim.fit(data.train_images if train_images is None else train_images)
    maps, scores = padim.predict(data.test_images)
    row = metric_row(data.category, method, data.test_masks, maps, data.test_labels, scores)
    return {"backbone": extractor.name, "channels": extractor.out_channels, **row}, maps


# A cache for results that several chapters compute: ``cache(kind, parts, compute)`` returns
# ``compute()``, computed once per kind and parts (:func:`diffad.studies.book.result_cache`).
ResultCache = Callable[[str, tuple, Callable[[], Any]], Any]


def _cached(cache: ResultCache | None, kind: str, parts: tuple, compute: Callable[[], Any]) -> Any:
    return compute() if cache is None else cache(kind, parts, compute)


def backbone_ablation(datasets: list[CategoryData], backbones: list[str], preset: Preset,
                      device=None, cache: ResultCache | None = None) -> list[dict]:
    """PaDiM's metrics with each backbone on each category (one extractor per backbone).

    ``cache``: each (category, backbone) row is computed once and read from it after, so a
    chapter that shows a subset of another's rows (one backbone, one category) fits nothing."""
    if not datasets or not backbones:
        raise ValueError("backbone_ablation needs at least one category and one backbone")
    device = pick_device(device)
    rows = []
    for backbone in backbones:
        extractors: list[FeatureExtractor] = []  # built on the first row not in the cache

        def row(data: CategoryData) -> dict:
            if not extractors:
                extractors.append(backbone_extractor(preset, backbone, device))
            return padim_row(data, extractors[0], device=device)[0]

        rows += [_cached(cache, "padim-row", (data, backbone, preset), lambda: row(data)) for data in datasets]
    return rows


def unified_padim_rows(datasets: list[CategoryData], preset: Preset, device=None,
                       cache: ResultCache | None = None) -> list[dict]:
    """PaDiM fitted once on every category's normal images pooled, evaluated per category
    (computed once per set of categories where a ``cache`` is given)."""
    if not datasets:
        raise ValueError("unified_padim_rows needs at least one category")
    device = pick_device(device)

    def compute() -> list[dict]:
        extractor = backbone_extractor(preset, None, device)
        pooled = torch.cat([data.train_images for data in datasets])
        padim = PaDiM(extractor=extractor, device=device).fit(pooled)
        rows = []
        for data in datasets:
            maps, scores = padim.predict(data.test_images)
            rows.append(metric_row(data.category, "padim", data.test_masks, maps, data.test_labels, scores))
        return rows

    return _cached(cache, "padim-pooled", (list(datasets), preset), compute)


def backbone_options(patterns: tuple[str, ...] = BACKBONE_PATTERNS) -> list[tuple[str, str]]:
    """(label, timm name) of CNN backbones with ImageNet weights that the feature extractor can use.

    Offline-loadable ones come first, labelled "(offline)"; the others need the Hugging Face
    hub (Colab) and are labelled "(download)".
    """
    offline = available_offline()
    names = set()
    for pattern in patterns:
        names |= {n.split(".", 1)[0] for n in timm.list_models(pattern, pretrained=True)}  # online: checked, only lists names (no download)
    usable = []
    for name in sorted(names):
        try:
            default_layers(name)
        except ValueError:
            continue
        usable.append(name)
    missing = [n for n in offline if n not in usable]
    usable += missing
    first = [(f"{n} (offline)", n) for n in usable if n in offline]
    rest = [(f"{n} (download)", n) for n in usable if n not in offline]
    return first + rest


def _by_key(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["category"], r["method"]): r for r in rows}


def comparison_markdown(reference: list[dict], other: list[dict], methods: tuple[str, ...],
                        metric: str = "pro", names: tuple[str, str] = ("per category", "unified")) -> str:
    """``reference`` and ``other`` results side by side for one metric, with the change (percent points).

    Rows are the categories both cover, then their average; per method three columns:
    reference, other, change (other - reference).
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRIC_LABELS)}")
    ref, oth = _by_key(reference), _by_key(other)
    categories = [c for c in dict.fromkeys(r["category"] for r in reference)
                  if all((c, m) in ref and (c, m) in oth for m in methods)]
    if not categories:
        raise ValueError(f"no category has {list(methods)} in both sets of results")
    header = ["category"]
    for method in methods:
        header += [f"{method}: {names[0]}", f"{method}: {names[1]}", f"{method}: change"]

    def cells(pairs):
        out = []
        for a, b in pairs:
            out += [f"{100 * a:.1f}", f"{100 * b:.1f}", f"{100 * (b - a):+.1f}"]
        return out

    body = [[category] + cells([(ref[(category, m)][metric], oth[(category, m)][metric]) for m in methods])
            for category in categories]
    if len(categories) > 1:
        pairs = [(float(np.mean([ref[(c, m)][metric] for c in categories])),
                  float(np.mean([oth[(c, m)][metric] for c in categories]))) for m in methods]
        body.append(["**average**"] + cells(pairs))
    return markdown_table(header, body, [f"{METRIC_LABELS[metric]} in percent; change = {names[1]} - {names[0]}, in points."])


def average_change(reference: list[dict], other: list[dict], method: str, metric: str = "pro") -> float:
    """Mean over shared categories of ``other - reference`` for one method and metric (a fraction)."""
    ref, oth = _by_key(reference), _by_key(other)
    shared = [key for key in ref if key[1] == method and key in oth]
    if not shared:
        raise ValueError(f"method {method!r} is not in both sets of results")
    return float(np.mean([oth[key][metric] - ref[key][metric] for key in shared]))


def rank_timestep_subsets(data: CategoryData, raw_test, raw_val, preset: Preset, max_size: int = 3,
                          method: str = "ensemble", metric: str = "pro") -> list[dict]:
    """Every subset of the scored timesteps (up to ``max_size``), best first by ``method``'s ``metric``.

    Each row is a :func:`diffad.evaluate.settings_sweep` row (``test_timesteps`` and the
    metrics); the maps are the cached raw ones, so no UNet pass is spent.
    """
    from itertools import combinations

    from diffad.evaluate import settings_sweep

    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRIC_LABELS)}")
    scored = tuple(raw_test.timesteps)
    if not 1 <= max_size <= len(scored):
        raise ValueError(f"max_size must be in [1, {len(scored)}] (the scored timesteps {scored}); got {max_size}")
    subsets = [s for k in range(1, max_size + 1) for s in combinations(scored, k)]
    rows = settings_sweep(data, raw_test, raw_val, preset, methods=(method,), test_timesteps=subsets)
    return sorted(rows, key=lambda r: r[metric], reverse=True)


def _setting_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return "–" if value is None else str(value)


def sweep_markdown(rows: list[dict], settings: tuple[str, ...], methods: tuple[str, ...] = ("ensemble",),
                   metrics: tuple[str, ...] = ("pixel_auroc", "pro", "image_auroc")) -> str:
    """Rows of a settings sweep as a markdown table: one line per combination of ``settings``.

    Each cell is a method's metrics (percent, ``/``-separated) averaged over the categories
    the rows cover; lines keep the order in which the combinations first appear.
    """
    if not rows:
        raise ValueError("no sweep rows to tabulate")
    unknown = [m for m in metrics if m not in METRIC_LABELS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_LABELS)}")
    missing = [s for s in settings if s not in rows[0]]
    if missing:
        raise ValueError(f"setting(s) {missing} not in the rows; keys are {sorted(rows[0])}")
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        key = tuple(_setting_text(row[s]) for s in settings)
        groups.setdefault(key, {}).setdefault(row["method"], []).append(row)
    body = []
    for key, by_method in groups.items():
        cells = list(key)
        for method in methods:
            group = by_method.get(method)
            cells.append(" / ".join(f"{100 * np.mean([r[m] for r in group]):.1f}" for m in metrics)
                         if group else "–")
        body.append(cells)
    n_categories = len({r["category"] for r in rows})
    scope = f"mean over {n_categories} categories" if n_categories > 1 else f"category {rows[0]['category']}"
    return markdown_table(list(settings) + list(methods), body,
                          [f"{' / '.join(METRIC_LABELS[m] for m in metrics)} in percent ({scope})."])


def authors_scoring_changes(preset: Preset) -> dict[str, dict]:
    """The authors' scoring-time departures as field changes for ``preset``, one at a time and all together.

    The 16x16 test grid is 1/16 of the image side at 256 px; at another size the same fraction.
    Without a respaced scoring schedule the raw index is the mapped step, so ``timestep_mode``
    changes nothing and is left out.
    """
    changes = {
        "timestep_mode": {"timestep_mode": "authors"},
        "test_feature_grid": {"test_feature_grid": max(1, preset.image_size // 16)},
        "kl_standardization": {"kl_standardization": "authors", "normalization": "none"},
        "mask_rule": {"mask_rule": "authors"},
        "pro_implementation": {"pro_implementation": "authors"},
    }
    if not preset.timestep_respacing:
        del changes["timestep_mode"]
    changes["all together"] = {k: v for fields in changes.values() for k, v in fields.items()}
    return changes


def authors_difference_rows(model: TrainedModel, data_root, category: str, scored, methods=("ensemble", "kl", "feature")
                            ) -> list[dict]:
    """Metric rows of ``model`` with its preset as it is and with each of the authors' scoring changes.

    ``scored(model, data) -> (raw_test, raw_val)`` scores (and may cache) a model's raw maps; masks
    are reloaded where the mask rule changes. Each row carries ``difference`` ("none" for the preset).
    """
    variants = {label: rescored(model, **fields)
                for label, fields in {"none": {}, **authors_scoring_changes(model.preset)}.items()}
    return _rows_by_difference(variants, data_root, category, scored, methods)


def _rows_by_difference(variants: dict, data_root, category: str, scored, methods) -> list[dict]:
    """Metric rows of each model of ``variants`` (label -> model), each read with its own preset's
    data and scoring, tagged ``difference=label``."""
    rows = []
    for label, model in variants.items():
        data = CategoryData.load(data_root, category, model.preset)
        raw_test, raw_val = scored(model, data)
        found, _, _ = diffusion_rows(data, raw_test, raw_val, model.preset, methods=tuple(methods))
        rows += [dict(row, difference=label) for row in found]
    return rows


def authors_training_changes(preset: Preset) -> dict[str, dict]:
    """The authors' training-time departures as field changes, one at a time (each needs its own
    trained model). ``precision`` is left out (on a CPU it cannot be fp16; on a GPU it changes how
    a step is computed, not what it learns), and so is ``backbone_normalization`` for a backbone
    whose own normalisation maps [0, 1] to [-1, 1] (:func:`diffad.backbones.expects_diffusion_range`:
    EfficientNet-Lite), where both give the backbone the same input."""
    from diffad.backbones import expects_diffusion_range

    changes = {
        "grad_clip": {"grad_clip": None},
        "backbone_normalization": {"backbone_normalization": False},
        "ema_warmup": {"ema_warmup": False},
        "image_resize": {"image_resize": "authors"},
    }
    if expects_diffusion_range(preset.backbone):
        del changes["backbone_normalization"]
    return {name: fields for name, fields in changes.items()
            if any(getattr(preset, k) != v for k, v in fields.items())}


def authors_training_rows(load_model, data_root, category: str, scored, base: TrainedModel,
                          methods=("ensemble", "kl", "feature")) -> list[dict]:
    """Metric rows of models trained with each of the authors' training changes, beside ``base``.

    ``load_model(**fields)`` returns the model of ``category`` trained with ``base``'s preset
    changed by ``fields``, or None when there is none (the book reads them from its cache or
    diffad's shipped variants; a change without a model has no rows); ``scored`` as in
    :func:`authors_difference_rows`. Rows carry ``difference`` ("none" for ``base``).
    """
    variants = {"none": base}
    for label, fields in authors_training_changes(base.preset).items():
        model = load_model(**fields)
        if model is not None:
            variants[label] = model
    return _rows_by_difference(variants, data_root, category, scored, methods)


def authors_difference_table() -> str:
    """The authors' departures from the paper, with where each is in their code, as markdown."""
    from diffad.presets import AUTHORS_DIFFERENCES, AUTHORS_UNMODELLED, RUNTIME_FIELDS

    def kind(field: str) -> str:
        return "scoring" if field in SCORING_FIELDS else "device" if field in RUNTIME_FIELDS else "training"

    body = [[f"`{f}`", kind(f), paper, code, where] for f, paper, code, where in AUTHORS_DIFFERENCES]
    body += [[what, "not modelled", "", why, where] for what, why, where in AUTHORS_UNMODELLED]
    return markdown_table(["field", "changes", "paper (preset `paper`)", "authors' code (preset `authors`)",
                           "where in VandyLu/anomaly_diff"], body)


__all__ = [
    "BACKBONE_PATTERNS",
    "authors_difference_rows",
    "authors_difference_table",
    "authors_scoring_changes",
    "authors_training_changes",
    "authors_training_rows",
    "ERROR_MAPS",
    "error_map_rows",
    "error_maps",
    "UNIFIED_TRAINING",
    "VARIANT_STUDY_TRAINING",
    "average_change",
    "backbone_ablation",
    "backbone_extractor",
    "backbone_options",
    "comparison_markdown",
    "padim_row",
    "rank_timestep_subsets",
    "rescored",
    "sweep_markdown",
    "timestep_ranges",
    "unified_overrides",
    "matched_unified_overrides",
    "variant_study_preset",
    "unified_padim_rows",
]


# The pixel-level error maps one UNet pass offers, for the KL-versus-RGB ablation (chapter 11).
ERROR_MAPS = {
    "kl_learned": "KL, learned variance (the paper's map)",
    "kl_fixed": "KL, variance fixed at the posterior's beta~",
    "rgb_squared": "squared RGB error |x0_hat - x0|^2",
    "rgb_absolute": "absolute RGB error |x0_hat - x0|",
}


@torch.no_grad()
def error_maps(model: TrainedModel, images: torch.Tensor, category: str | None = None, seed: int = 0,
               device=None) -> dict[str, torch.Tensor]:
    """The four ``ERROR_MAPS`` of ``images`` (N, 3, H, W) in [0, 1] at the preset's test timesteps,
    each (N, K, H, W) averaged over RGB, from the very passes (same noise) :func:`score_raw` makes.

    ``kl_fixed`` reads the same output with the variance channels set to -1, the lower end of
    the learned range (beta~): the KL of two Gaussians with one variance, a rescaled squared
    error of the posterior means. All four use the clipped x0_hat.
    """
    from diffad.data import to_diffusion_range
    from diffad.scoring import OnePass, _noise_for

    preset = model.preset
    diffusion = build_diffusion(preset, preset.timestep_respacing)
    device = pick_device(device)
    model.unet.to(device).eval()
    timesteps = tuple(preset.test_timesteps)
    n, k = images.shape[0], len(timesteps)
    out = {name: torch.empty(n, k, *images.shape[-2:]) for name in ERROR_MAPS}
    for start in range(0, n, preset.score_batch_size):
        x0 = to_diffusion_range(images[start:start + preset.score_batch_size]).to(device)
        noise = torch.stack([_noise_for(start + i, seed, x0.shape[1:], k) for i in range(len(x0))], dim=1).to(device)
        for j, t_index in enumerate(timesteps):
            one = OnePass(model, diffusion, x0, t_index, noise[j], category, features=False)
            fixed = one.output.clone()
            fixed[:, 3:] = -1.0  # v = -1: log variance = log beta~
            error = one.pred_x0() - x0
            maps = {"kl_learned": one.kl(), "kl_fixed": diffusion.kl_map(fixed, x0, one.x_t, one.t),
                    "rgb_squared": error.pow(2), "rgb_absolute": error.abs()}
            for name, value in maps.items():
                out[name][start:start + len(x0), j] = value.mean(dim=1).cpu()
    return out


def error_map_rows(model: TrainedModel, data: CategoryData, seed: int = 0, device=None,
                   sigmas: tuple[float, ...] | None = None) -> list[dict]:
    """Metric rows of each ``ERROR_MAPS`` map, scored like the preset scores its KL map, with and
    without smoothing (``sigmas``; default 0 and the preset's): columns ``map`` and ``smoothing``."""
    from diffad.scoring import RawMaps, final_maps

    preset = model.preset
    sigmas = tuple(dict.fromkeys((0.0, preset.smoothing_sigma) if sigmas is None else sigmas))
    category = data.category if model.num_classes else None
    test = error_maps(model, data.test_images, category, seed, device)
    val = error_maps(model, data.val_images, category, seed + 1, device)
    rows = []
    for name in ERROR_MAPS:
        for sigma in sigmas:
            scoring = preset.replace(smoothing_sigma=sigma)
            as_raw = [RawMaps(preset.test_timesteps, kl=maps[name], rgb=maps[name], feature=maps[name])
                      for maps in (test, val)]
            maps, scores = final_maps(*as_raw, scoring, alpha=1.0)
            row = metric_row(data.category, "kl", data.test_masks, maps["kl"], data.test_labels, scores["kl"])
            rows.append(dict(row, method=name, map=ERROR_MAPS[name], smoothing=sigma))
    return rows
