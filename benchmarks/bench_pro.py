"""Time diffad.metrics.pro against a straightforward exact PRO, on the same maps, in one run.

The straightforward version is how the official MVTec evaluation computes it: one full sort of
every score, a per-region loop (one mask comparison per region) to weight the pixels, cumulative
sums, ties merged, trapezoid to the limit. diffad's version sorts only the scores above the FPR
limit's threshold and weights regions with one bincount per image.

    python benchmarks/bench_pro.py [--maps 200] [--size 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from diffad.metrics import pro, trapezoid


def straightforward_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Exact PRO with a full sort and per-region loops (the reference to beat)."""
    masks = masks != 0
    fp_change = np.zeros(masks.shape, dtype=np.float64)
    pro_change = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        n_regions += n
        fp_change[i][labels == 0] = 1
        for k in range(1, n + 1):
            region = labels == k
            pro_change[i][region] = 1.0 / region.sum()
    scores = maps.ravel().astype(np.float64)
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / fp_change.sum()
    pros = np.cumsum(pro_change.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate(([0.0], np.minimum(fprs[keep], 1), [1.0]))
    pros = np.concatenate(([0.0], np.minimum(pros[keep], 1), [1.0]))
    return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit


def make_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half the maps with a few defect blobs; scores noisy, higher on the defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            r = rng.integers(size // 32, size // 8)
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    maps = rng.normal(size=masks.shape).astype(np.float32)
    maps = ndimage.gaussian_filter(maps, sigma=(0, 2, 2))
    maps += 0.15 * masks  # weak signal: PRO well below 1, as on real data
    return masks, maps


def best_time(fn, repeat: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    masks, maps = make_maps(args.maps, args.size)
    t_ref, v_ref = best_time(lambda: straightforward_pro(masks, maps), args.repeat)
    t_ours, v_ours = best_time(lambda: pro(masks, maps), args.repeat)
    print(f"{args.maps} maps of {args.size}x{args.size}, {int((masks != 0).sum())} defect pixels")
    print(f"straightforward exact PRO: {t_ref:.3f} s  value {v_ref:.9f}")
    print(f"diffad.metrics.pro:        {t_ours:.3f} s  value {v_ours:.9f}")
    print(f"speed-up: {t_ref / t_ours:.1f}x   |difference|: {abs(v_ref - v_ours):.2e}")
    if abs(v_ref - v_ours) > 1e-6:
        raise SystemExit("values differ by more than 1e-6")


if __name__ == "__main__":
    main()
