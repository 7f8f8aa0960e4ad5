"""Tests for diffad.metrics: hand-derived values, invariances, a brute-force PRO, errors."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffad.metrics import (
    image_auroc,
    pixel_auroc,
    pro,
    pro_curve,
    pro_threshold_sweep,
    threshold_sweep_curve,
    trapezoid,
)


def brute_force_pro(masks, maps, fpr_limit=0.3):
    """PRO threshold by threshold: every distinct score, regions and FPR counted directly."""
    masks = np.asarray(masks) != 0
    maps = np.asarray(maps, dtype=np.float64)
    regions = []
    for mask, amap in zip(masks, maps):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labels == k] for k in range(1, n + 1)]
    normal_scores = maps[~masks]
    xs, ys = [0.0], [0.0]
    for th in np.unique(maps)[::-1]:
        xs.append(np.mean(normal_scores >= th))
        ys.append(np.mean([np.mean(r >= th) for r in regions]))
    xs.append(1.0)
    ys.append(1.0)
    xs, ys = np.array(xs), np.array(ys)
    # Integrate the piecewise-linear curve on [0, limit]; vertical steps have no area.
    grid = np.concatenate([xs[xs < fpr_limit], [fpr_limit]])
    area = 0.0
    for a, b in zip(grid[:-1], grid[1:]):
        if b > a:
            # y at a (right-limit) and b (left-limit) on the segment containing (a, b)
            j = np.searchsorted(xs, a, side="right")  # first point with x > a
            x0, y0, x1, y1 = xs[j - 1], ys[j - 1], xs[j], ys[j]
            ya = y0 + (y1 - y0) * (a - x0) / (x1 - x0)
            yb = y0 + (y1 - y0) * (b - x0) / (x1 - x0)
            area += 0.5 * (ya + yb) * (b - a)
    return area / fpr_limit


def test_pro_hand_derived():
    # Two images, one region each (sizes 2 and 1), 5 normal pixels.
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]]])
    maps = np.array([[[0.9, 0.3, 0.8, 0.1]], [[0.7, 0.2, 0.6, 0.0]]])
    # Descending: .9 (A), .8 (n), .7 (n), .6 (B), .3 (A), .2 (n), .1 (n), 0 (n).
    # Curve (fpr, pro): (0,0) (0,.25) (.2,.25) (.4,.25) (.4,.75) (.4,1) (.6,1) (.8,1) (1,1).
    # Area up to 0.5: .25*.4 + 1.0*.1 = 0.2, divided by 0.5 -> 0.4.
    assert pro(masks, maps, fpr_limit=0.5) == pytest.approx(0.4, abs=1e-12)
    # Up to 0.3: .25*.3 = .075 -> .25
    assert pro(masks, maps, fpr_limit=0.3) == pytest.approx(0.25, abs=1e-12)
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, .2, .4, .4, .4, .6, .8, 1, 1])
    np.testing.assert_allclose(pros, [0, .25, .25, .25, .75, 1, 1, 1, 1, 1])


def test_pro_regions_are_eight_connected():
    # Two diagonal pixels form ONE region under 8-connectivity: PRO weighs it once.
    masks = np.zeros((1, 4, 4), int)
    masks[0, 0, 0] = masks[0, 1, 1] = 1
    masks[0, 3, 3] = 1  # a second, separate region
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0  # detects half of the diagonal region only
    # At threshold 1: pro = (0.5 + 0) / 2 regions = 0.25 with fpr 0; then jumps to fpr 1.
    fprs, pros = pro_curve(masks, maps)
    assert pros[1] == pytest.approx(0.25)
    assert fprs[1] == 0.0


def test_pro_ties_are_merged():
    masks = np.array([[[1, 0, 0, 0]]])
    maps = np.array([[[0.5, 0.5, 0.1, 0.1]]])
    fprs, pros = pro_curve(masks, maps)
    # One point per distinct score: (1/3, 1) at 0.5, then (1, 1) at 0.1; plus the ends.
    np.testing.assert_allclose(fprs, [0, 1 / 3, 1, 1])
    np.testing.assert_allclose(pros, [0, 1, 1, 1])
    # Segment from (0,0) to (1/3, 1): area to 0.3 is 0.5 * 0.3 * 0.9 -> / 0.3 = 0.45
    assert pro(masks, maps) == pytest.approx(0.45)


@pytest.mark.parametrize("seed", range(12))
def test_pro_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, h, w = rng.integers(1, 4), rng.integers(3, 9), rng.integers(3, 9)
    masks = (rng.random((n, h, w)) < 0.3).astype(np.uint8) * rng.integers(1, 255)
    masks[0, 0, 0] = 1  # at least one defect pixel
    masks[-1, -1, -1] = 0  # at least one normal pixel
    maps = rng.integers(0, 6, size=(n, h, w)).astype(float)  # many ties
    for limit in (0.05, 0.3, 0.77, 1.0):
        assert pro(masks, maps, fpr_limit=limit) == pytest.approx(brute_force_pro(masks, maps, limit), abs=1e-9)


def test_pro_partial_sort_equals_full_curve():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 32, 32), bool)
    masks[0, 5:12, 5:20] = True
    masks[2, 20:30, 3:6] = True
    maps = rng.gamma(0.5, size=masks.shape) + 2.0 * masks
    full_fprs, full_pros = pro_curve(masks, maps)
    assert pro(masks, maps) == pytest.approx(trapezoid(full_fprs, full_pros, 0.3) / 0.3, abs=1e-12)


def test_pro_invariant_under_monotone_rescaling_and_in_unit_range():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:6, 2:9] = True
    masks[1, 10:20, 10:12] = True
    maps = rng.random(masks.shape) + 0.6 * masks
    base = pro(masks, maps)
    assert 0.0 <= base <= 1.0
    for f in (lambda m: 3 * m + 7, np.exp, lambda m: m ** 5, lambda m: np.log(m + 1e-3)):
        assert pro(masks, f(maps)) == pytest.approx(base, abs=1e-12)
    # The threshold sweep is not invariant: it changes under a skewing transform.
    assert abs(pro_threshold_sweep(masks, np.exp(12 * maps)) - base) > 0.05


def test_perfect_and_worst_maps():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    assert pro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert pro(masks, (~masks).astype(float)) == pytest.approx(0.0)
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert pixel_auroc(masks, (~masks).astype(float)) == 0.0


def test_accepts_tensors_and_channel_dim():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 1, 10, 10)) < 0.2
    maps = rng.random((3, 1, 10, 10))
    expected = pro(masks[:, 0], maps[:, 0])
    assert pro(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(expected)
    assert pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(
        pixel_auroc(masks[:, 0], maps[:, 0])
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 7, 2])  # continuous scores, heavy ties, two values only
def test_pixel_auroc_equals_scikit_learn(seed, levels):
    """The Mann-Whitney pair count gives scikit-learn's ROC AUC, ties and float32 maps included."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    masks = rng.random((3, 17, 19)) < rng.uniform(0.02, 0.6)
    masks[0, 0, 0], masks[0, 0, 1] = True, False
    maps = (rng.normal(size=masks.shape) + masks * rng.uniform(0, 2)).astype(np.float32)
    if levels:
        maps = np.round(maps * levels / 4) / levels
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_hand_derived():
    masks = np.array([[[1, 0, 0, 1]]])
    maps = np.array([[[0.8, 0.4, 0.9, 0.1]]])
    # Pairs (pos, neg): (.8,.4) win, (.8,.9) lose, (.1,.4) lose, (.1,.9) lose -> 1/4
    assert pixel_auroc(masks, maps) == pytest.approx(0.25)


def test_image_auroc():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert image_auroc(torch.tensor([0, 1]), torch.tensor([0.0, 1.0])) == 1.0


def test_errors_name_the_problem():
    masks = np.zeros((1, 4, 4))
    maps = np.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="no defect"):
        pro(masks, maps)
    with pytest.raises(ValueError, match="no defective"):
        pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match="no normal"):
        pro(np.ones((1, 4, 4)), maps)
    with pytest.raises(ValueError, match="no normal"):
        pixel_auroc(np.ones((1, 4, 4)), maps)
    with pytest.raises(ValueError, match="differ in shape"):
        pro(np.ones((1, 4, 4)), np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.eye(4)[None], np.full((1, 4, 4), np.nan))
    with pytest.raises(ValueError, match="no defective"):
        image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="fpr_limit"):
        pro(np.eye(4)[None], maps, fpr_limit=0)


def test_many_large_maps_fit_in_memory():
    # 500 maps of 256x256, as a full MVTec category would give; float32 input.
    rng = np.random.default_rng(0)
    masks = np.zeros((500, 256, 256), dtype=np.uint8)
    masks[::2, 100:140, 60:90] = 1
    maps = rng.random((500, 256, 256), dtype=np.float32)
    maps[masks != 0] += 0.5
    value = pro(masks, maps)
    assert 0.0 < value <= 1.0


def test_threshold_sweep_curve_by_hand():
    masks = np.array([[[0, 1, 1, 0]]], bool)  # one region of two pixels, two normal pixels
    maps = np.array([[[0.0, 1.0, 2.0, 3.0]]])
    thresholds, fprs, pros = threshold_sweep_curve(masks, maps, num_thresholds=4)
    np.testing.assert_allclose(thresholds, [0, 1, 2, 3])
    np.testing.assert_allclose(fprs, [0.5, 0.5, 0.5, 0.0])  # strictly above the threshold
    np.testing.assert_allclose(pros, [1.0, 0.5, 0.0, 0.0])


def test_threshold_sweep_points_lie_on_the_exact_curve():
    rng = np.random.default_rng(3)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 3:7, 3:9] = True
    masks[1, 10:14, 1:3] = True
    maps = np.exp(4 * (rng.random(masks.shape) + 0.5 * masks))
    exact = np.stack(pro_curve(masks, maps), axis=1)
    _, fprs, pros = threshold_sweep_curve(masks, maps, num_thresholds=50)
    for point in zip(fprs, pros):
        assert np.isclose(exact, point, atol=1e-12).all(axis=1).any()


def test_threshold_sweep_curve_rejects_too_few_thresholds():
    masks = np.array([[[0, 1]]], bool)
    with pytest.raises(ValueError, match="num_thresholds"):
        threshold_sweep_curve(masks, np.array([[[0.0, 1.0]]]), num_thresholds=1)


def _authors_pro_transcribed(gt, anom, limit=0.3):
    """The authors' pro() (mvtec_tools/mvtec_evaluate.py) line by line, with scipy's 8-connected
    labelling in place of cv2.connectedComponents."""
    from scipy import ndimage
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(gt.ravel(), anom.ravel())
    valid_index = fpr <= 0.3
    valid_threshold, valid_fpr = thresholds[valid_index], fpr[valid_index]
    if len(valid_fpr) > 1000:
        valid_index = np.arange(len(valid_fpr), step=len(valid_fpr) // 1000)
        valid_threshold, valid_fpr = valid_threshold[valid_index], valid_fpr[valid_index]
    comps = [ndimage.label(g, structure=np.ones((3, 3)))[0] for g in gt]
    pros = np.zeros_like(valid_fpr)
    for k, thr in enumerate(valid_threshold):
        cov = []
        for a, g in zip(anom, comps):
            b = a >= thr
            for c in range(1, g.max() + 1):
                region = g == c
                cov.append(np.logical_and(region, b).sum() / region.sum())
        pros[k] = np.mean(cov)
    start_fpr = start_pro = area = 0.0
    for x, y in zip(valid_fpr, pros):
        area += 0.5 * (x - start_fpr) * (start_pro + y)
        start_fpr, start_pro = x, y
    area += (0.3 - start_fpr) * start_pro
    return area / 0.3


@pytest.mark.parametrize("seed", range(6))
def test_pro_authors_matches_a_transcription_of_their_code(seed):
    from diffad.metrics import pro_authors

    rng = np.random.default_rng(seed)
    gt = np.zeros((3, 24, 24), dtype=np.uint8)
    gt[0, 3:9, 4:12] = 1
    gt[1, 10:13, 2:20] = 1
    gt[1, 18:22, 18:22] = 1
    anom = rng.random((3, 24, 24)) + 0.8 * gt * rng.random((3, 24, 24))
    if seed % 2:
        anom = np.round(anom, 1)  # ties
    assert pro_authors(gt, anom) == pytest.approx(_authors_pro_transcribed(gt, anom), abs=1e-12)
    assert abs(pro_authors(gt, anom) - pro(gt, anom)) < 0.1  # an approximation of the exact PRO


def test_pro_authors_thins_thresholds_on_large_maps():
    from diffad.metrics import pro_authors

    rng = np.random.default_rng(0)
    gt = np.zeros((4, 64, 64), dtype=np.uint8)
    gt[:, 20:40, 20:30] = 1
    anom = rng.random((4, 64, 64)) + 0.5 * gt
    assert pro_authors(gt, anom) == pytest.approx(_authors_pro_transcribed(gt, anom), abs=1e-12)


def _bootstrap_case(seed: int, decimals: int | None):
    rng = np.random.default_rng(seed)
    n = 30
    masks = np.zeros((n, 24, 24), bool)
    for i in range(12, n):
        y, x = rng.integers(2, 18, 2)
        masks[i, y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = True
        if i % 3 == 0:  # a second region in some images
            masks[i, 0:2, 20:23] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if decimals is not None:  # many ties
        maps = np.round(maps, decimals)
    labels = masks.reshape(n, -1).any(1).astype(int)
    scores = np.round(maps.reshape(n, -1).max(1), 1)
    return masks, maps, labels, scores


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, 0)])
def test_bootstrap_weights_equal_the_metrics_of_repeated_images(seed, decimals):
    from diffad.metrics import ImageBootstrap

    masks, maps, labels, scores = _bootstrap_case(seed, decimals)
    boot = ImageBootstrap(masks, maps, labels, scores)
    ones = boot.metrics(np.ones(len(masks)))
    assert ones == pytest.approx((pixel_auroc(masks, maps), pro(masks, maps), image_auroc(labels, scores)), abs=1e-12)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        weights = np.bincount(rng.integers(0, len(masks), len(masks)), minlength=len(masks))
        index = np.repeat(np.arange(len(masks)), weights)
        expected = (pixel_auroc(masks[index], maps[index]), pro(masks[index], maps[index]),
                    image_auroc(labels[index], scores[index]))
        assert boot.metrics(weights) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_batch_equals_one_draw_at_a_time():
    from diffad.metrics import ImageBootstrap

    masks, maps, labels, scores = _bootstrap_case(3, None)
    boot = ImageBootstrap(masks, maps, labels, scores)
    rng = np.random.default_rng(0)
    weights = np.stack([np.bincount(rng.integers(0, len(masks), len(masks)), minlength=len(masks))
                        for _ in range(100)])
    together = boot.metrics_batch(weights)
    assert together == pytest.approx(np.array([boot.metrics(w) for w in weights]), abs=1e-12)


@pytest.mark.parametrize("block", [1, 7, 256])
def test_bootstrap_draws_crossing_in_any_block_match_the_repeated_images(monkeypatch, block):
    """The curve is summed block by block and read group by group in the block where a draw's FPR
    crosses the limit: with blocks of 1 group, of 7, or one block, draws that cross early or late
    (here the five normal images whose pixels rank below all others decide) give the exact PRO."""
    from diffad import metrics

    monkeypatch.setattr(metrics, "PRO_MIN_BLOCK", block)
    monkeypatch.setattr(metrics, "PRO_MAX_BLOCKS", 10**6 if block == 1 else 256)
    rng = np.random.default_rng(7)
    n = 20
    masks = np.zeros((n, 48, 48), bool)
    masks[10:, 10:20, 12:30] = True
    maps = rng.normal(size=masks.shape) + 2.0 * masks
    maps[:5] -= 3.0  # five normal images whose pixels rank below all others
    labels = masks.reshape(n, -1).any(1).astype(int)
    scores = maps.reshape(n, -1).max(1)
    boot = metrics.ImageBootstrap(masks, maps, labels, scores)
    assert boot.block_size == max(block, -(-boot.n_groups // metrics.PRO_MAX_BLOCKS))
    for weights in (np.ones(n, int), np.r_[np.zeros(5, int), np.ones(15, int)],
                    np.r_[np.full(5, 3), np.zeros(14, int), 1], np.r_[np.zeros(10, int), np.ones(10, int)]):
        index = np.repeat(np.arange(n), weights)
        assert boot.metrics(weights)[1] == pytest.approx(pro(masks[index], maps[index]), abs=1e-12)


def test_bootstrap_intervals_are_seeded_and_hold_the_estimate():
    from diffad.metrics import INTERVAL_COLUMNS, bootstrap_intervals

    masks, maps, labels, scores = _bootstrap_case(3, None)
    first = bootstrap_intervals(masks, maps, labels, scores, n_resamples=200, seed=5)
    assert first == bootstrap_intervals(masks, maps, labels, scores, n_resamples=200, seed=5)
    assert first != bootstrap_intervals(masks, maps, labels, scores, n_resamples=200, seed=6)
    assert set(first) == set(INTERVAL_COLUMNS)
    for metric, value in (("pixel_auroc", pixel_auroc(masks, maps)), ("pro", pro(masks, maps)),
                          ("image_auroc", image_auroc(labels, scores))):
        assert first[f"{metric}_lo"] < value < first[f"{metric}_hi"]


def test_bootstrap_rejects_mismatched_labels():
    from diffad.metrics import ImageBootstrap

    masks, maps, labels, scores = _bootstrap_case(0, None)
    with pytest.raises(ValueError, match="one label and one score per image"):
        ImageBootstrap(masks, maps, labels[:-1], scores)
