"""Exact anomaly-detection metrics: pixel AUROC, PRO and image AUROC.

The numbers in the paper's tables depend on how these are computed, so they follow the
official MVTec-AD evaluation code exactly:

* **pixel AUROC** -- ROC AUC over every test pixel (scikit-learn).
* **image AUROC** -- ROC AUC over one score per image (scikit-learn).
* **PRO** (per-region overlap) -- every connected defect region (8-connectivity, any nonzero
  mask pixel is defect) counts equally. For a threshold, a region contributes the fraction of
  its pixels above it and the normal pixels give the false-positive rate. Every distinct score
  is a threshold (ties merged), the curve is integrated with the trapezoid rule up to
  ``fpr_limit`` (the point at the limit interpolated) and divided by ``fpr_limit``.

The exact PRO is invariant under any strictly increasing rescaling of the scores. The widely
copied variants that sweep 200 or 1000 evenly spaced thresholds are not; ``pro_threshold_sweep``
implements one of them for the metrics chapter, to show how far off it can be.

This module imports nothing else from diffad.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "pixel_auroc",
    "image_auroc",
    "pro",
    "pro_curve",
    "pro_threshold_sweep",
    "threshold_sweep_curve",
    "trapezoid",
    "label_regions",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _as_numpy(x, name: str) -> np.ndarray:
    """Turn a numpy array, torch tensor or nested list into a numpy array."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _prepare_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Check and reshape (masks, maps) to boolean (N, H, W) and float64 (N, H, W)."""
    masks = _as_numpy(masks, "masks")
    maps = _as_numpy(maps, "maps")
    for name, arr in (("masks", masks), ("maps", maps)):
        if arr.ndim == 4 and arr.shape[1] == 1:
            continue
        if arr.ndim == 2:
            continue
        if arr.ndim != 3:
            raise ValueError(
                f"{name} must have shape (N, H, W) or (N, 1, H, W); got {arr.shape}"
            )
    if masks.ndim == 4:
        masks = masks[:, 0]
    if maps.ndim == 4:
        maps = maps[:, 0]
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim == 2:
        maps = maps[None]
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps differ in shape: masks {masks.shape}, maps {maps.shape} "
            "(resize the anomaly maps to the mask size first)"
        )
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float64)
    if not np.all(np.isfinite(maps)):
        raise ValueError("maps contain NaN or infinite values")
    return masks != 0, maps


def _check_both_classes(positives: int, negatives: int, what: str) -> None:
    if positives == 0:
        raise ValueError(f"{what} is undefined: there is no defective {what.split()[0]} (all labels are normal)")
    if negatives == 0:
        raise ValueError(f"{what} is undefined: there is no normal {what.split()[0]} (all labels are defective)")


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels; ``masks`` nonzero marks defect pixels."""
    masks, maps = _prepare_maps(masks, maps)
    n_pos = int(masks.sum())
    _check_both_classes(n_pos, masks.size - n_pos, "pixel AUROC")
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def image_auroc(labels, scores) -> float:
    """ROC AUC over images; ``labels`` 1 marks a defective image."""
    labels = _as_numpy(labels, "labels").ravel()
    scores = _as_numpy(scores, "scores").astype(np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.shape[0]} vs {scores.shape[0]}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    labels = labels != 0
    n_pos = int(labels.sum())
    _check_both_classes(n_pos, labels.size - n_pos, "image AUROC")
    return float(roc_auc_score(labels, scores))


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected defect regions of one boolean mask (0 is background)."""
    return ndimage.label(mask, structure=_EIGHT_CONNECTED)


def _region_labels(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global region ids per pixel (0 = normal) and each region's size (index 0 unused)."""
    labels = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i, mask in enumerate(masks):
        if mask.any():
            lab, n = label_regions(mask)
            labels[i] = np.where(lab > 0, lab + offset, 0)
            offset += n
    sizes = np.bincount(labels.ravel(), minlength=offset + 1)
    return labels, sizes


def _pro_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat scores, flat global region ids and region sizes; errors where PRO is undefined."""
    masks, maps = _prepare_maps(masks, maps)
    labels, sizes = _region_labels(masks)
    if len(sizes) == 1:
        raise ValueError("PRO is undefined: the masks contain no defect pixel")
    if sizes[0] == 0:
        raise ValueError("PRO is undefined: the masks contain no normal pixel")
    return maps.ravel(), labels.ravel(), sizes


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The whole exact PRO curve: false-positive rates and per-region overlaps, (0, 0) to (1, 1).

    One point per distinct score (ties merged), as the official MVTec evaluation computes it.
    """
    scores, labels, sizes = _pro_inputs(masks, maps)
    n_regions, n_normal = len(sizes) - 1, int(sizes[0])
    order = np.argsort(scores)[::-1]  # ties need no order: they are merged below
    scores, labels = scores[order], labels[order]
    inv_sizes = np.zeros(len(sizes), dtype=np.float64)
    inv_sizes[1:] = 1.0 / sizes[1:]
    fprs = np.cumsum(labels == 0, dtype=np.float64) / n_normal
    pros = np.cumsum(inv_sizes[labels]) / n_regions
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    fprs = np.concatenate(([0.0], np.minimum(fprs[last_of_tie], 1.0), [1.0]))
    pros = np.concatenate(([0.0], np.minimum(pros[last_of_tie], 1.0), [1.0]))
    return fprs, pros


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under the piecewise-linear curve (x, y), x ascending, up to ``x_max``.

    When ``x_max`` falls between two points, y is interpolated there, as the official MVTec
    evaluation does.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max is not None:
        if not np.any(x == x_max):
            i = int(np.searchsorted(x, x_max, side="left"))
            if not 0 < i < len(x):
                raise ValueError(f"x_max={x_max} lies outside the curve's range [{x[0]}, {x[-1]}]")
            y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
            correction = 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
        inside = x <= x_max
        x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def pro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the exact PRO curve up to ``fpr_limit`` (MVTec's official PRO).

    ``masks``: (N, H, W) or (N, 1, H, W), nonzero is defect; ``maps``: anomaly scores of the same
    shape, higher is more anomalous. Returns a value in [0, 1].

    Equal to ``trapezoid(*pro_curve(masks, maps), fpr_limit) / fpr_limit``, computed faster: only
    the normal scores above the limit's threshold are sorted, and the vertical steps of the curve
    (defect pixels, which add no area) are summed with a search instead of a joint sort.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    scores, labels, sizes = _pro_inputs(masks, maps)
    n_regions, n_normal = len(sizes) - 1, int(sizes[0])

    # Normal scores at or above the first threshold past the limit, as (value, count), descending.
    normal = scores[labels == 0]
    m = int(np.floor(fpr_limit * n_normal)) + 1
    if m <= n_normal:
        cut = np.partition(normal, n_normal - m)[n_normal - m]
        normal = normal[normal >= cut]
    normal = np.sort(normal)
    starts = np.concatenate(([0], np.flatnonzero(normal[1:] != normal[:-1]) + 1))
    values = normal[starts][::-1]
    counts = np.diff(np.append(starts, len(normal)))[::-1]

    # Overlap above / at each threshold: suffix sums of the defect pixels' weights.
    defect = labels > 0
    order = np.argsort(scores[defect])
    defect_scores = scores[defect][order]
    weights = (1.0 / sizes[labels[defect]])[order] / n_regions
    suffix = np.append(np.cumsum(weights[::-1])[::-1], 0.0)
    y_above = suffix[np.searchsorted(defect_scores, values, side="right")]
    y_at = suffix[np.searchsorted(defect_scores, values, side="left")]

    x_after = np.cumsum(counts) / n_normal
    x_before = np.concatenate(([0.0], x_after[:-1]))
    full = x_after <= fpr_limit
    area = np.sum(0.5 * (y_above[full] + y_at[full]) * (x_after[full] - x_before[full]))
    k = int(full.sum())
    if k < len(values) and x_before[k] < fpr_limit:  # the step that crosses the limit
        frac = (fpr_limit - x_before[k]) / (x_after[k] - x_before[k])
        y_limit = y_above[k] + (y_at[k] - y_above[k]) * frac
        area += 0.5 * (y_limit + y_above[k]) * (fpr_limit - x_before[k])
    return float(min(area / fpr_limit, 1.0))


def threshold_sweep_curve(masks, maps, num_thresholds: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points the approximate PRO sees: (thresholds, FPRs, PROs) at evenly spaced thresholds.

    ``num_thresholds`` thresholds from the smallest to the largest score; a pixel counts as
    positive when its score is strictly above the threshold. Every point lies on the exact
    curve of :func:`pro_curve`; what the sweep gets wrong is how few of them fall at low FPR
    when the scores are skewed.
    """
    if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)) or num_thresholds < 2:
        raise ValueError(f"num_thresholds must be an int >= 2, got {num_thresholds!r}")
    masks, maps = _prepare_maps(masks, maps)
    labels, sizes = _region_labels(masks)
    if len(sizes) == 1 or sizes[0] == 0:
        raise ValueError("PRO is undefined without both defect and normal pixels")
    labels, scores = labels.ravel(), maps.ravel()
    thresholds = np.linspace(scores.min(), scores.max(), int(num_thresholds))
    fprs, pros = [], []
    for th in thresholds:
        hits = np.bincount(labels, weights=scores > th, minlength=len(sizes))
        fprs.append(hits[0] / sizes[0])
        pros.append(float(np.mean(hits[1:] / sizes[1:])))
    return thresholds, np.array(fprs), np.array(pros)


def pro_threshold_sweep(masks, maps, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """The widely copied approximate PRO, kept here only to show its flaws.

    It sweeps ``num_thresholds`` evenly spaced thresholds between the smallest and largest score
    (:func:`threshold_sweep_curve`), keeps the points with FPR <= limit, rescales their FPRs to
    [0, 1] by the largest one kept, and integrates. Evenly spaced thresholds miss most of the
    curve when scores are skewed, and the rescaling changes the result under monotone
    transforms of the scores.
    """
    _, fprs, pros = threshold_sweep_curve(masks, maps, num_thresholds)
    keep = fprs <= fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    if len(fprs) < 2 or fprs.max() == 0:
        return 0.0
    order = np.argsort(fprs)
    fprs = fprs[order] / fprs.max()
    return float(np.trapezoid(pros[order], fprs))


def pro_authors(masks, maps, fpr_limit: float = 0.3, max_thresholds: int = 1000) -> float:
    """PRO as the authors' evaluation computes it (``mvtec_tools/mvtec_evaluate.py``, ``pro``).

    An approximation of :func:`pro`, kept to measure what it changes: the thresholds are those
    ``sklearn.metrics.roc_curve`` returns (which drops points on straight stretches of the ROC)
    with FPR up to the limit, thinned to about ``max_thresholds`` by taking every k-th; a region's
    overlap is the share of its pixels scoring at least the threshold, averaged over all regions
    (8-connected, as ``cv2.connectedComponents``); the area runs by trapezoids from (0, 0) and
    then flat from the last point to the limit, divided by the limit. Not invariant to every
    monotone rescaling of the scores, unlike :func:`pro`.
    """
    from sklearn.metrics import roc_curve

    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    scores, labels, sizes = _pro_inputs(masks, maps)
    fpr, _, thresholds = roc_curve(labels > 0, scores)
    keep = fpr <= fpr_limit
    fpr, thresholds = fpr[keep], thresholds[keep]
    if len(fpr) > max_thresholds:
        every = np.arange(len(fpr), step=len(fpr) // max_thresholds)
        fpr, thresholds = fpr[every], thresholds[every]
    defect = labels > 0
    order = np.lexsort((scores[defect], labels[defect]))  # by region, then by score
    region_scores, region_ids = scores[defect][order], labels[defect][order]
    starts = np.searchsorted(region_ids, np.arange(1, len(sizes)))
    coverage = np.zeros(len(thresholds))
    for region, start in enumerate(starts, start=1):
        own = region_scores[start:start + int(sizes[region])]
        coverage += (len(own) - np.searchsorted(own, thresholds, side="left")) / len(own)
    pros = coverage / (len(sizes) - 1)
    area, last_fpr, last_pro = 0.0, 0.0, 0.0
    for x, y in zip(fpr, pros):
        area += 0.5 * (x - last_fpr) * (last_pro + y)
        last_fpr, last_pro = x, y
    area += (fpr_limit - last_fpr) * last_pro
    return float(area / fpr_limit)
