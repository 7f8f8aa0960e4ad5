"""The scoring study of chapter 7b (issue #26): which scoring lets the feature map earn a weight.

The same raw maps (``book.scored``: one UNet pass per test step, cached) are scored four ways,
{the paper's per-image normalisation, the preset's validation normalisation} x {no smoothing,
the preset's smoothing}, and under each the KL map (alpha = 1), the feature map (alpha = 0) and
the alpha sweep between them are measured on every category, with 95% bootstrap intervals for
the category averages: every category's test images are resampled (by image, seeded), the
metrics averaged over the categories on each resample, and the percentiles taken. The interval
of "alpha 0.5 minus the better branch" is paired: both maps are scored on the same resamples.

* per image: the paper's scoring (``presets.with_paper_scoring``): each KL map z-scored within its
  image, the feature map raw, the image score from those maps with the paper's top-k;
* validation: the preset's: both maps in units of their spread on normal validation images, the
  image score with the preset's top-k.

Each (category, scoring) unit is cached in ``<cache>/studies`` under a fingerprint of its raw
maps, masks and settings, so that chapters 11 and 14 read what chapter 7b computed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffad.evaluate import (BOOTSTRAP_RESAMPLES, METRIC_LABELS, RESULT_COLUMNS, CategoryData, difference_interval,
                             metric_row)
from diffad.io import atomic_write, computed_once
from diffad.metrics import ImageBootstrap
from diffad.presets import Preset, with_paper_scoring
from diffad.scoring import Normalizer, RawMaps, final_maps, image_scores, normalized
from diffad.tables import markdown_table

METRICS = RESULT_COLUMNS[2:]  # pixel_auroc, pro, image_auroc
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
# the maps whose averages get intervals: the two branches and the paper's mix
INTERVAL_ALPHAS = (1.0, 0.0, 0.5)
RESAMPLES = 200
STUDY_VERSION = 1


@dataclass(frozen=True)
class Scoring:
    """One of the four scorings: a normalisation (with its image score) and a blur."""

    normalization: str  # "per_image" (the paper's) or "validation" (the preset's)
    smoothing_sigma: float

    @property
    def label(self) -> str:
        norm = "per image" if self.normalization == "per_image" else "validation"
        blur = "no blur" if not self.smoothing_sigma else f"blur {self.smoothing_sigma:g} px"
        return f"{norm}, {blur}"

    def preset(self, preset: Preset) -> Preset:
        """``preset`` scored this way: the paper's scoring fields for per-image normalisation, the
        preset's own otherwise (its image score and top-k), with this blur; alpha stays the preset's.
        The preset's own scoring (:func:`preset_scoring`) gives the preset back."""
        if self.normalization == "per_image" and preset.normalization != "per_image":
            base = with_paper_scoring(preset).replace(alpha=preset.alpha)
        elif self.normalization != preset.normalization:
            base = preset.replace(normalization=self.normalization, image_normalization=None)
        else:
            base = preset
        return base.replace(smoothing_sigma=self.smoothing_sigma)


def paper_scoring() -> Scoring:
    """The paper's scoring: per-image z-scores, no blur."""
    return Scoring("per_image", 0.0)


def preset_scoring(preset: Preset) -> Scoring:
    """The preset's own scoring (the cpu preset's: validation statistics, a blur of 2 px)."""
    return Scoring(preset.normalization, float(preset.smoothing_sigma))


def scorings(preset: Preset) -> list[Scoring]:
    """The four scorings of ``preset``: per image / validation x no blur / the preset's blur (two
    when the preset does not blur). The first is the paper's scoring, the last the cpu preset's."""
    sigmas = sorted({0.0, float(preset.smoothing_sigma)})
    return [Scoring(norm, sigma) for norm in ("per_image", "validation") for sigma in sigmas]


def _fingerprint(data: CategoryData, raw_test: RawMaps, raw_val: RawMaps, preset: Preset, alphas,
                 n_resamples: int, seed: int) -> str:
    digest = hashlib.sha1()
    for tensor in (raw_test.kl, raw_test.rgb, raw_test.feature, raw_val.kl, raw_val.rgb, raw_val.feature,
                   data.test_masks, data.test_labels):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    settings = {k: getattr(preset, k) for k in ("normalization", "image_normalization", "smoothing_sigma", "top_k",
                                                "pro_implementation")}
    digest.update(repr((sorted(settings.items()), raw_test.timesteps, tuple(alphas), n_resamples, seed,
                        STUDY_VERSION)).encode())
    return digest.hexdigest()[:16]


def score_unit(data: CategoryData, raw_test: RawMaps, raw_val: RawMaps, preset: Preset, alphas=ALPHAS,
               n_resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """One category under one scoring (``preset``'s scoring fields): the metrics at every alpha, and
    the metrics of the maps at ``INTERVAL_ALPHAS`` on ``n_resamples`` seeded resamples of the images."""
    normalizer = Normalizer.fit(raw_val, preset.smoothing_sigma) if "validation" in (
        preset.normalization, preset.image_normalization) else None

    def branches(normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(normalized(raw_test, kind, normalization, normalizer, preset.smoothing_sigma)
                     for kind in ("kl", "feature"))

    kl, feature = branches(preset.normalization)
    image_kl, image_feature = (kl, feature) if preset.image_normalization in (None, preset.normalization) \
        else branches(preset.image_normalization)
    n = len(data.test_labels)
    rng = np.random.default_rng(seed)
    weights = [np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_resamples)]
    by_alpha, resampled = {}, {}
    for alpha in sorted(set(alphas) | set(INTERVAL_ALPHAS)):
        maps = alpha * kl + (1.0 - alpha) * feature
        scores = image_scores(alpha * image_kl + (1.0 - alpha) * image_feature, preset.top_k)
        row = metric_row(data.category, "ensemble", data.test_masks, maps, data.test_labels, scores,
                         preset.pro_implementation)
        by_alpha[alpha] = [row[m] for m in METRICS]
        if alpha in INTERVAL_ALPHAS and n_resamples:
            boot = ImageBootstrap(data.test_masks, maps, data.test_labels, scores)
            resampled[alpha] = boot.metrics_batch(np.stack(weights)).tolist()
    return {"category": data.category, "alphas": {str(a): v for a, v in by_alpha.items()},
            "resampled": {str(a): v for a, v in resampled.items()}}


def cached_unit(cache: Path | None, data: CategoryData, raw_test: RawMaps, raw_val: RawMaps, preset: Preset,
                alphas=ALPHAS, n_resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """:func:`score_unit`, read from ``cache/studies`` when it was computed before (None: no cache)."""
    if cache is None:
        return score_unit(data, raw_test, raw_val, preset, alphas, n_resamples, seed)
    path = Path(cache) / "studies" / f"scoring-{data.category}-{_fingerprint(data, raw_test, raw_val, preset, alphas, n_resamples, seed)}.json"
    return computed_once(path, lambda: score_unit(data, raw_test, raw_val, preset, alphas, n_resamples, seed),
                         lambda p: json.loads(p.read_text()),
                         lambda value, p: atomic_write(p, json.dumps(value).encode()), f"scoring {data.category}")


def paired_comparison(data: CategoryData, raw_test: RawMaps, raw_val: RawMaps, preset: Preset, first: str = "kl",
                      second: str = "rgb", n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                      cache: Path | None = None) -> dict[str, dict[str, float]]:
    """:func:`diffad.evaluate.difference_interval` of two maps of one scoring run under ``preset``'s
    scoring (first - second per metric, paired), cached in ``cache/studies`` like the study's units.
    Under the preset's own scoring it equals ``evaluate.compare_saved`` on ``reproduce``'s maps."""
    path = None
    if cache is not None:
        key = _fingerprint(data, raw_test, raw_val, preset, (first, second), n_resamples, seed)
        path = Path(cache) / "studies" / f"paired-{data.category}-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
    maps, scores = final_maps(raw_test, raw_val, preset)
    result = difference_interval(data.test_masks, data.test_labels, (maps[first], scores[first]),
                                 (maps[second], scores[second]), n_resamples, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


def _interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def summarize(units: list[dict], data: str, scoring: Scoring) -> dict:
    """One (data, scoring) cell of the study from its categories' units: category averages per alpha,
    intervals of the averages at ``INTERVAL_ALPHAS``, the best alpha per metric, and alpha 0.5 minus
    the better branch (paired) per metric."""
    alphas = [float(a) for a in units[0]["alphas"]]
    mean = {a: np.mean([u["alphas"][str(a)] for u in units], axis=0) for a in alphas}
    summary = {"data": data, "scoring": scoring.label, "normalization": scoring.normalization,
               "smoothing_sigma": scoring.smoothing_sigma, "categories": [u["category"] for u in units],
               "by_alpha": {a: dict(zip(METRICS, map(float, mean[a]))) for a in alphas}}
    if not units[0]["resampled"]:
        return summary
    boot = {a: np.mean([np.asarray(u["resampled"][str(a)]) for u in units], axis=0) for a in INTERVAL_ALPHAS}
    summary["intervals"] = {a: {m: _interval(boot[a][:, i]) for i, m in enumerate(METRICS)} for a in INTERVAL_ALPHAS}
    summary["best"] = {m: max(alphas, key=lambda a: (mean[a][i], -abs(a - 0.5))) for i, m in enumerate(METRICS)}
    gain = {}
    for i, m in enumerate(METRICS):
        better = 1.0 if mean[1.0][i] >= mean[0.0][i] else 0.0
        difference = boot[0.5][:, i] - boot[better][:, i]
        low, high = _interval(difference)
        gain[m] = {"difference": float(mean[0.5][i] - mean[better][i]), "lo": low, "hi": high,
                   "better": "KL" if better == 1.0 else "feature"}
    summary["gain"] = gain
    return summary


def scoring_study(sets: dict[str, list[tuple[CategoryData, RawMaps, RawMaps]]], preset: Preset,
                  alphas=ALPHAS, n_resamples: int = RESAMPLES, seed: int = 0,
                  cache: Path | None = None, which: list[Scoring] | None = None) -> list[dict]:
    """The study: for each named set of (data, raw test maps, raw validation maps) and each of the
    four :func:`scorings` (or those of ``which``), a :func:`summarize` dict (category averages,
    intervals, best alpha, gain)."""
    result = []
    for name, entries in sets.items():
        for scoring in which or scorings(preset):
            scored = scoring.preset(preset)
            units = [cached_unit(cache, data, raw_test, raw_val, scored, alphas, n_resamples, seed)
                     for data, raw_test, raw_val in entries]
            result.append(summarize(units, name, scoring))
    return result


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def study_markdown(study: list[dict], metrics: tuple[str, ...] = METRICS) -> str:
    """The study as one markdown table: a row per data set, scoring and metric; the KL map, the
    feature map and alpha 0.5 with 95% intervals of their category averages, the best alpha of the
    grid, and alpha 0.5 minus the better branch with its paired interval (percent)."""
    body = []
    for s in study:
        for m in metrics:
            cells = [f"{_percent(s['by_alpha'][a][m])} [{_percent(s['intervals'][a][m][0])}, "
                     f"{_percent(s['intervals'][a][m][1])}]" for a in INTERVAL_ALPHAS]
            best = s["best"][m]
            g = s["gain"][m]
            gain = (f"{100 * g['difference']:+.1f} [{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}]"
                    f" vs {g['better']}")
            body.append([s["data"], s["scoring"], METRIC_LABELS[m], *cells,
                         f"{best:.1f}: {_percent(s['by_alpha'][best][m])}", gain])
    n = len(study[0]["categories"])
    return markdown_table(
        ["data", "scoring", "metric", "KL (alpha 1)", "feature (alpha 0)", "alpha 0.5", "best alpha",
         "alpha 0.5 minus the better branch"], body,
        [f"Mean over {n} categories in percent, with 95% bootstrap intervals (test images resampled within "
         f"each category, {RESAMPLES} seeded resamples; the last column paired). 'per image': the paper's "
         "scoring (KL maps z-scored within each image, the feature map raw, the paper's top-k); "
         "'validation': the preset's (both maps in units of normal validation images, the preset's top-k). "
         "The best alpha is chosen on these test images: read it as a description, not a result."])


def verdicts(study: list[dict], data: str) -> list[dict]:
    """Per scoring of one data set: does alpha 0.5 beat the better branch, metric by metric (its paired
    interval above 0: 'ahead'; holding 0: 'tie'; below: 'behind')."""
    rows = []
    for s in study:
        if s["data"] != data:
            continue
        row = {"scoring": s["scoring"]}
        for m in METRICS:
            g = s["gain"][m]
            row[METRIC_LABELS[m]] = "ahead" if g["lo"] > 0 else "behind" if g["hi"] < 0 else "tie"
        rows.append(row)
    return rows
