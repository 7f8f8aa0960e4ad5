"""A cross-check test set: the built-in categories with defects made by a second, independent painter.

Why: the cpu preset's scoring settings are chosen on the development set (other photographs,
another seed, but the built-in painter's defects: :func:`diffad.data.make_development_dataset`).
A result that holds only for that painter's defects says little. :func:`make_crosscheck_dataset` writes, in the MVTec-AD layout, each built-in
category with

* ``train/good``: the built-in training images of ``train_seed`` (byte for byte the images the
  shipped models were trained on, so they apply unchanged);
* ``test/good``: new normal images of the same scene generator, drawn with another seed;
* ``test/<kind>`` and ``ground_truth/<kind>``: defects of the kinds below, painted by code that
  shares nothing with :mod:`diffad.data.builtin`'s painters but the normal scenes. Shapes come from
  thresholded noise fields, clusters, polygons and midpoint-displacement paths (the built-in
  painter uses wobbly discs, Bezier curves and random walks); blending is additive or
  multiplicative with Gaussian profiles (the built-in painter blends linearly towards a colour);
  sizes are log-uniform per image (the built-in painter cycles three sizes). Nobody tuned
  anything on it.

Defect kinds (``CROSSCHECK_KINDS``; sizes as fractions of the image side):

* ``contamination`` -- a large irregular low-contrast smear (a thresholded smooth noise field
  inside a disc of radius 0.12-0.25, covering roughly 2-12 % of the image), darkening or tinting
  by 12-30 % with a feathered edge. Hard (large, low contrast).
* ``pits``          -- a cluster of 6-24 small round pits (radius 0.006-0.016) within 0.05-0.12 of a
  centre, each darkened by 35-70 % with a lit rim. Medium.
* ``part_colour``   -- objects: the whole part (the nut, one half of the capsule) in another
  colour (a hue rotation of 25-60 degrees and a tint of 25-45 %); textures: a region bounded
  by a straight soft edge, 20-45 % of the image, tinted by 12-25 %. Hard (low frequency).
* ``misplaced``     -- objects: a piece of the outline (radius 0.08-0.14) moved outwards by
  0.06-0.12, leaving the table where it was; textures: a polygon (radius 0.07-0.14) filled
  with the same texture at 1.6-2.4x its scale. Medium.
* ``cut``           -- a nearly straight line of 2-3 jittered segments (length 0.2-0.55), 1.5-4 px
  wide at 256 px with a Gaussian profile, brightening or darkening by 0.25-0.5. Easy.
* ``fracture``      -- a midpoint-displacement path (length 0.15-0.4) tapering from 3.5 to 1 px,
  darkened by 60-85 % with a bright lip on one side. Easy-medium (thin).

The ground truth is the pixels whose blend weight exceeds 0.5 (for ``misplaced`` on objects: the
piece where it was and where it is now), so mask and altered pixels agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from diffad.io import build_each

from .builtin import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    category_rng,
    is_complete,
    make_builtin_dataset,
    resolve_categories,
    save_png,
)
from .scenes import SCENES, Scene, finish, grid, smooth_noise, texture_source, to_uint8

__all__ = ["CROSSCHECK_KINDS", "make_crosscheck_dataset"]

CROSSCHECK_KINDS = {
    "contamination": "large irregular low-contrast smear, 2-12 % of the image, darkened or tinted by 12-30 % (hard)",
    "pits": "cluster of 6-24 small round pits, each darkened by 35-70 % with a lit rim (medium)",
    "part_colour": "a whole part (objects) or 20-45 % of the image (textures) in a shifted colour (hard)",
    "misplaced": "a piece of an object moved outwards, or a polygon of texture at 1.6-2.4x its scale (medium)",
    "cut": "nearly straight line with a Gaussian profile, 1.5-4 px wide, +-0.25-0.5 brightness (easy)",
    "fracture": "midpoint-displacement crack tapering 3.5 to 1 px, darkened 60-85 % with a bright lip (easy-medium)",
}

_VERSION = 1
_TEST_GOOD_CODE = 202  # split codes of the scene generator that the built-in data never uses
_DEFECT_CODE = 300


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _centre_on(rng: np.random.Generator, scene: Scene, margin: float) -> tuple[float, float]:
    """A point where the scene is fully object (or anywhere on textures), ``margin`` px from the border."""
    size = scene.support.shape[0]
    inside = scene.support > 0.99
    lo, hi = int(margin), max(int(margin) + 1, int(size - margin))
    window = np.zeros_like(inside)
    window[lo:hi, lo:hi] = True
    candidates = np.argwhere(inside & window)
    if len(candidates) == 0:
        candidates = np.argwhere(inside)
    y, x = candidates[rng.integers(len(candidates))]
    return float(y), float(x)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# Beyond this many sigmas from a path, its weight exp(-d^2 / 2 sigma^2) < 1e-48 rounds to 0 in float32.
LINE_REACH_SIGMAS = 15.0


def _gaussian_line(size: int, points: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Weight of a path with a Gaussian cross-section: 1 on the path, 0.5 at half the local width.

    Each segment is computed only inside its bounding box widened by ``LINE_REACH_SIGMAS``: the
    pixels outside would add float32 zeros, so the weight is the same as over the whole image.
    """
    ys, xs = grid(size)
    weight = np.zeros((size, size), np.float32)
    for (ay, ax), (by, bx), width in zip(points[:-1], points[1:], widths):
        sigma = max(width, 1.0) / 2 / np.sqrt(2 * np.log(2))  # full width at half maximum = width
        reach = LINE_REACH_SIGMAS * sigma
        rows = slice(max(0, int(np.floor(min(ay, by) - reach))), max(0, int(np.ceil(max(ay, by) + reach)) + 1))
        cols = slice(max(0, int(np.floor(min(ax, bx) - reach))), max(0, int(np.ceil(max(ax, bx) + reach)) + 1))
        y, x, box = ys[rows, cols], xs[rows, cols], weight[rows, cols]  # views: box writes into weight
        if box.size == 0:
            continue
        vy, vx = by - ay, bx - ax
        t = np.clip(((y - ay) * vy + (x - ax) * vx) / max(vy * vy + vx * vx, 1e-12), 0.0, 1.0)
        distance = np.hypot(y - ay - t * vy, x - ax - t * vx)
        np.maximum(box, np.exp(-0.5 * (distance / sigma) ** 2), out=box)
    return weight


def _polygon_weight(size: int, centre: tuple[float, float], radius: float, rng: np.random.Generator,
                    corners: int) -> np.ndarray:
    """Antialiased coverage (4x4 supersampling) of a random star-convex polygon."""
    from skimage.draw import polygon

    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.6, 1.2, corners)
    fine = np.zeros((size * 4, size * 4), np.float32)
    rows = (centre[0] + radii * np.sin(angles)) * 4
    cols = (centre[1] + radii * np.cos(angles)) * 4
    rr, cc = polygon(rows, cols, fine.shape)
    fine[rr, cc] = 1.0
    return fine.reshape(size, 4, size, 4).mean(axis=(1, 3))


def _hue_rotation(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours about the grey axis (luminance kept)."""
    angle = np.deg2rad(degrees)
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(axis, axis)
    return (image @ rotation.T).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0, 1)
    return np.asarray([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)], np.float32)


# Each painter returns (defective image HxWx3, mask HxW bool); px = image side / 256.


def _contamination(scene: Scene, rng, category: str, px: float):
    image, size = scene.image, scene.image.shape[0]
    radius = _log_uniform(rng, 0.12, 0.25) * size
    centre = _centre_on(rng, scene, margin=radius * 0.7)
    ys, xs = grid(size)
    window = np.clip(1 - np.hypot(ys - centre[0], xs - centre[1]) / radius, 0, 1)
    field = smooth_noise(rng, size, sigma=radius / 3) * 0.6 + 2.2 * window - 1.0
    inside = _smoothstep(window * 6)  # nothing beyond the disc, where the noise alone might cross
    weight = _smoothstep(field / max(0.15, 6 * px / radius) + 0.5) * inside * scene.support
    strength = rng.uniform(0.12, 0.30)
    if rng.random() < 0.5:
        altered = image * (1 - strength)
    else:
        altered = image * (1 - strength + strength * 2 * _random_colour(rng))
    return image + weight[..., None] * (altered - image), weight > 0.5


def _pits(scene: Scene, rng, category: str, px: float):
    image, size = scene.image, scene.image.shape[0]
    spread = _log_uniform(rng, 0.05, 0.12) * size
    centre = _centre_on(rng, scene, margin=spread)
    ys, xs = grid(size)
    darkness, rim = np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
    for _ in range(rng.integers(6, 25)):
        py, px_ = centre[0] + rng.normal(0, spread / 2), centre[1] + rng.normal(0, spread / 2)
        r = max(1.0, _log_uniform(rng, 0.006, 0.016) * size)
        distance = np.hypot(ys - py, xs - px_)
        pit = _smoothstep((r - distance) / 1.0 + 0.5) * rng.uniform(0.35, 0.70)
        np.maximum(darkness, pit, out=darkness)
        lit = np.exp(-0.5 * ((distance - r) / 0.7) ** 2) * (np.cos(np.arctan2(ys - py, xs - px_) + 2.4) > 0.3)
        np.maximum(rim, 0.15 * lit, out=rim)
    darkness *= scene.support
    rim *= scene.support * (darkness < 0.05)
    altered = image * (1 - darkness[..., None]) + rim[..., None]
    return altered, (darkness >= 0.175) | (rim > 0.075)  # half the weakest pit's darkening, half the rim


def _part_colour(scene: Scene, rng, category: str, px: float):
    image, size = scene.image, scene.image.shape[0]
    if scene.is_object:
        weight = scene.support.copy()
        if category == "capsule":  # one half of the capsule: the side of a line through its centre
            ys, xs = grid(size)
            cy, cx = np.argwhere(scene.support > 0.5).mean(axis=0)
            side = (xs - cx) if rng.random() < 0.5 else (cx - xs)
            weight = weight * _smoothstep(side / 2 + 0.5)
        shifted = _hue_rotation(image, rng.choice([-1, 1]) * rng.uniform(25, 60))
        strength = rng.uniform(0.25, 0.45)
        altered = shifted * (1 - strength + strength * 2 * _random_colour(rng))
    else:
        ys, xs = grid(size)
        angle = rng.uniform(0, 2 * np.pi)
        share = rng.uniform(0.20, 0.45)
        projection = (ys - size / 2) * np.sin(angle) + (xs - size / 2) * np.cos(angle)
        edge = np.quantile(projection, 1 - share)
        weight = _smoothstep((projection - edge) / (8 * px) + 0.5)
        strength = rng.uniform(0.12, 0.25)
        altered = image * (1 - strength + strength * 2 * _random_colour(rng))
    return image + weight[..., None] * (altered - image), weight > 0.5


def _misplaced(scene: Scene, rng, category: str, px: float):
    image, size = scene.image, scene.image.shape[0]
    if scene.is_object:
        from scipy.ndimage import shift as translate

        radius = _log_uniform(rng, 0.08, 0.14) * size
        rim = np.argwhere((scene.outline > 0.3) & (scene.outline < 0.7))
        y, x = (float(v) for v in rim[rng.integers(len(rim))])
        cy, cx = np.argwhere(scene.outline > 0.5).mean(axis=0)
        direction = np.array([y - cy, x - cx]) / max(np.hypot(y - cy, x - cx), 1e-6)
        offset = direction * _log_uniform(rng, 0.06, 0.12) * size
        piece = _polygon_weight(size, (y, x), radius, rng, corners=7) * scene.outline
        hole = piece
        result = image + hole[..., None] * (scene.background - image)  # where the piece was: the table
        moved_piece = translate(piece, offset, order=1, mode="constant")
        moved_image = np.stack([translate(image[..., c], offset, order=1, mode="nearest") for c in range(3)], -1)
        result = result + moved_piece[..., None] * (moved_image - result)
        return result, (hole > 0.5) | (moved_piece > 0.5)
    radius = _log_uniform(rng, 0.07, 0.14) * size
    centre = _centre_on(rng, scene, margin=radius)
    weight = _polygon_weight(size, centre, radius, rng, corners=int(rng.integers(5, 9)))
    zoom = rng.uniform(1.6, 2.4)
    source = texture_source(category)
    crop = 0.5 * source.width / zoom
    x0, y0 = rng.uniform(0, source.width - crop), rng.uniform(0, source.height - crop)
    grey = np.asarray(source.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop)))
    # the same texture, coarser: matched to the surrounding pixels' colour by least squares
    where = weight > 0.5
    design = np.stack([grey[where], np.ones(where.sum(), np.float32)], 1)
    coefficients, *_ = np.linalg.lstsq(design, image[where], rcond=None)
    content = grey[..., None] * coefficients[0] + coefficients[1]
    return image + weight[..., None] * (content - image), where


def _cut(scene: Scene, rng, category: str, px: float):
    image, size = scene.image, scene.image.shape[0]
    length = _log_uniform(rng, 0.2, 0.55) * size
    centre = _centre_on(rng, scene, margin=0 if scene.is_object else length / 2)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    ends = np.linspace(-0.5, 0.5, int(rng.integers(3, 5)))[:, None] * length * direction + centre
    ends[1:-1] += normal * rng.normal(0, 0.03 * length, (len(ends) - 2, 1))
    width = rng.uniform(1.5, 4.0) * px
    weight = _gaussian_line(size, ends, np.full(len(ends) - 1, width)) * scene.support
    delta = rng.choice([-1, 1]) * rng.uniform(0.25, 0.5)
    return image + weight[..., None] * delta, weight > 0.5


def _midpoint_path(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, depth: int,
                   roughness: float) -> np.ndarray:
    points = [start, end]
    for level in range(depth):
        refined = [points[0]]
        for a, b in zip(points[:-1], points[1:]):
            normal = np.array([b[1] - a[1], a[0] - b[0]])
            middle = (a + b) / 2 + normal * rng.normal(0, roughness / (1.4 ** level))
            refined += [middle, b]
        points = refined
    return np.asarray(points)


def _fracture(scene: Scene, rng, category: str, px: float):
    image, size = scene.image, scene.image.shape[0]
    length = _log_uniform(rng, 0.15, 0.4) * size
    centre = np.asarray(_centre_on(rng, scene, margin=0 if scene.is_object else length / 2))
    angle = rng.uniform(0, 2 * np.pi)
    half = np.array([np.sin(angle), np.cos(angle)]) * length / 2
    path = _midpoint_path(rng, centre - half, centre + half, depth=5, roughness=0.18)
    widths = np.linspace(3.5, 1.0, len(path) - 1) * px
    weight = _gaussian_line(size, path, np.maximum(widths, 1.0)) * scene.support
    lip = _gaussian_line(size, path + 1.5 * px * np.array([1.0, 1.0]), np.maximum(widths, 1.0) * 0.7)
    lip = lip * scene.support * (weight < 0.5)
    darkening = rng.uniform(0.60, 0.85)
    altered = image * (1 - darkening * weight[..., None]) + 0.12 * lip[..., None]
    return altered, (weight > 0.5) | (lip > 0.5)


PAINTERS = {
    "contamination": _contamination,
    "pits": _pits,
    "part_colour": _part_colour,
    "misplaced": _misplaced,
    "cut": _cut,
    "fracture": _fracture,
}


def paint(category: str, kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, Scene]:
    """One ``kind`` defect on a normal scene of ``category``: (float HxWx3 image before sensor
    noise, bool HxW mask, the scene); redrawn if it left fewer than 4 mask pixels (tiny images)."""
    if kind not in PAINTERS:
        raise ValueError(f"unknown cross-check defect kind {kind!r}; known: {', '.join(CROSSCHECK_KINDS)}")
    scene = SCENES[category](rng, size)
    for _ in range(20):
        image, mask = PAINTERS[kind](scene, rng, category, size / 256.0)
        if mask.sum() >= 4:
            return np.clip(image, 0, 1).astype(np.float32), mask, scene
    raise RuntimeError(f"could not place a visible {kind!r} defect on a {size}px {category!r} image")


def crosscheck_defect(category: str, kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A normal scene of ``category`` with one ``kind`` defect: (uint8 HxWx3 image, bool HxW mask)."""
    image, mask, scene = paint(category, kind, rng, size)
    return finish(image, scene, rng), mask


def make_crosscheck_dataset(
    root: str | Path,
    seed: int = 2,
    train_seed: int = 0,
    image_size: int = 256,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_per_defect: int = 6,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write (or find) the cross-check dataset under ``root`` and return ``root``.

    ``train_seed``, ``n_train`` and ``image_size`` must match the built-in dataset the models were
    trained on (``make_builtin_dataset``'s defaults: seed 0, 60 images, 256 px); ``seed`` draws the
    new normal test images and the defects. Rebuilt when the parameters change, like the built-in data.
    """
    if seed == train_seed:
        raise ValueError(f"seed ({seed}) must differ from train_seed: the test images would repeat training's")
    categories = resolve_categories(categories)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parameters = {category: {
        "generator": "diffad.data.crosscheck", "version": _VERSION, "scenes": GENERATOR_VERSION,
        "category": category, "seed": seed, "train_seed": train_seed, "image_size": image_size,
        "n_train": n_train, "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect,
        "defect_kinds": list(CROSSCHECK_KINDS),
    } for category in categories}
    build_each([root / category for category in categories],
               lambda folder: is_complete(folder, parameters[folder.name]),
               lambda folder: _write_category(folder, parameters[folder.name]),
               "writing the cross-check data")
    return root


def _write_category(folder: Path, parameters: dict) -> None:
    """Write one category of the cross-check set (``folder``'s name; ``parameters`` as in its
    manifest) into a staging folder beside it, then rename it over ``folder``."""
    root, category = folder.parent, folder.name
    if folder.exists() and not (folder / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{folder} exists but was not made by make_crosscheck_dataset; "
                              "move it away or choose another root")
    staging = root / f".{category}.building"
    shutil.rmtree(staging, ignore_errors=True)
    make_builtin_dataset(staging / "source", seed=parameters["train_seed"], image_size=parameters["image_size"],
                         n_train=parameters["n_train"], n_test_good=0, n_test_per_defect=0, categories=[category])
    (staging / "out").mkdir()
    shutil.move(str(staging / "source" / category / "train"), str(staging / "out" / "train"))
    files = [f"train/good/{p.name}" for p in sorted((staging / "out" / "train" / "good").glob("*.png"))]

    def save(array: np.ndarray, relative: str) -> None:
        path = staging / "out" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(array, path)
        files.append(relative)

    for index in range(parameters["n_test_good"]):
        rng = category_rng(parameters["seed"], category, _TEST_GOOD_CODE, index)
        scene = SCENES[category](rng, parameters["image_size"])
        save(finish(scene.image, scene, rng), f"test/good/{index:03d}.png")
    for kind_index, kind in enumerate(CROSSCHECK_KINDS):
        for index in range(parameters["n_test_per_defect"]):
            rng = category_rng(parameters["seed"], category, _DEFECT_CODE + kind_index, index)
            image, mask = crosscheck_defect(category, kind, rng, parameters["image_size"])
            save(image, f"test/{kind}/{index:03d}.png")
            save(to_uint8(mask.astype(np.float32)), f"ground_truth/{kind}/{index:03d}_mask.png")
    (staging / "out" / MANIFEST_NAME).write_text(json.dumps({"parameters": parameters, "files": files}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    (staging / "out").rename(folder)
    shutil.rmtree(staging)
