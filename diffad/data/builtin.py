"""A small built-in anomaly-detection dataset in the MVTec-AD layout, made offline in seconds.

Why: MVTec-AD is 5 GB and cannot be downloaded everywhere (tests, CI, a laptop without
network). :func:`make_builtin_dataset` writes a dataset with the same folder layout, so the
same :class:`~diffad.data.MVTecAD` reader, training loop and metrics run on it unchanged::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png     (0 = normal, 255 = defect)

The scenes (categories) are :mod:`diffad.data.scenes`, the defect painters
:mod:`diffad.data.defects`; this module writes them as files.

Determinism and caching
-----------------------
Every image is drawn from its own random generator seeded by (seed, category, split, index),
so the same seed gives the same bytes (on one platform) and a subset of categories gives the
same images as the full set. Each finished category folder holds a ``.builtin.json`` manifest
with the parameters and the file list; calling again with the same parameters returns at once.
A category is written into a temporary folder and renamed when complete, so an interrupted
run never leaves a half-made category that looks finished.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from diffad.io import build_each

from .defects import (  # noqa: F401  (LOW_CONTRAST_KINDS, PAINTABLE_KINDS, paint_defect: this module's API too)
    DEFECT_KINDS, LOW_CONTRAST_KINDS, PAINTABLE_KINDS, SIZE_LEVELS, draw_defect, paint_defect)
from .scenes import SCENES, finish


BUILTIN_TEXTURES = ("brick", "grass", "gravel")
BUILTIN_OBJECTS = ("nut", "capsule", "cup", "retina")
BUILTIN_CATEGORIES = BUILTIN_TEXTURES + BUILTIN_OBJECTS
# Development categories: other source photographs than every test category, for choosing
# settings (``make_development_dataset``); never part of a reported table.
DEVELOPMENT_CATEGORIES = ("coin", "tissue")
CATEGORY_DEFECTS = {category: tuple(DEFECT_KINDS) for category in BUILTIN_CATEGORIES + DEVELOPMENT_CATEGORIES}

GENERATOR_VERSION = 1
MANIFEST_NAME = ".builtin.json"
_SPLIT_CODES = {"train": 1, "test_good": 2}


# ----------------------------------------------------------------------------- helpers


def category_rng(seed: int, category: str, split_code: int, index: int) -> np.random.Generator:
    """One independent generator per image, stable across runs and category subsets."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(category.encode()), split_code, index]))


def _normal_image(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    scene = SCENES[category](rng, size)
    return finish(scene.image, scene, rng)


def _defective_image(category: str, kind: str, rng: np.random.Generator, size: int, level: float):
    """A defective image and its mask; redraws the defect if it left no mask pixel (tiny images)."""
    scene = SCENES[category](rng, size)
    for _ in range(20):
        content, weight = draw_defect(kind, scene, rng, level, category)
        mask = weight > 0.5
        if mask.sum() >= 4:
            blended = scene.image + weight[..., None] * (content - scene.image)
            return finish(blended, scene, rng), mask
    raise RuntimeError(f"could not place a visible {kind!r} defect on a {size}px {category!r} image")


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _parameters(
    seed: int, image_size: int, n_train: int, n_test_good: int, n_test_per_defect: int, category: str
) -> dict:
    return {
        "generator": "diffad.data.builtin",
        "version": GENERATOR_VERSION,
        "category": category,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_per_defect": n_test_per_defect,
        "defect_kinds": list(CATEGORY_DEFECTS[category]),
    }


def resolve_categories(categories: str | Sequence[str] | None) -> list[str]:
    """``categories`` as a list without repeats (None: every built-in one), each checked."""
    if categories is None:
        categories = BUILTIN_CATEGORIES
    elif isinstance(categories, str):
        categories = [categories]
    known = BUILTIN_CATEGORIES + DEVELOPMENT_CATEGORIES
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ValueError(f"unknown built-in categories {unknown}; choose from {list(known)}")
    return list(dict.fromkeys(categories))


def is_complete(folder: Path, parameters: dict) -> bool:
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("parameters") != parameters:
        return False
    return all((folder / name).is_file() for name in recorded.get("files", []))


def _write_category(folder: Path, category: str, parameters: dict) -> None:
    size, seed = parameters["image_size"], parameters["seed"]
    files: list[str] = []

    def save(array: np.ndarray, relative: str) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(array, path)
        files.append(relative)

    for split, count, subfolder in (("train", "n_train", "train/good"), ("test_good", "n_test_good", "test/good")):
        for index in range(parameters[count]):
            rng = category_rng(seed, category, _SPLIT_CODES[split], index)
            save(_normal_image(category, rng, size), f"{subfolder}/{index:03d}.png")
    for kind_index, kind in enumerate(parameters["defect_kinds"]):
        for index in range(parameters["n_test_per_defect"]):
            rng = category_rng(seed, category, 100 + kind_index, index)
            level = SIZE_LEVELS[index % len(SIZE_LEVELS)]
            image, mask = _defective_image(category, kind, rng, size, level)
            save(image, f"test/{kind}/{index:03d}.png")
            save(mask.astype(np.uint8) * 255, f"ground_truth/{kind}/{index:03d}_mask.png")
    (folder / MANIFEST_NAME).write_text(json.dumps({"parameters": parameters, "files": files}, indent=1))


def is_builtin(root: str | Path, category: str) -> bool:
    """Whether ``<root>/<category>`` was written by :func:`make_builtin_dataset` (not MVTec-AD)."""
    return (Path(root) / category / MANIFEST_NAME).is_file()


def make_builtin_dataset(
    root: str | Path,
    seed: int = 0,
    image_size: int = 256,
    n_train: int = 60,
    n_test_good: int = 8,
    n_test_per_defect: int = 4,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write (or find) the built-in MVTec-layout dataset under ``root`` and return ``root``.

    ``categories`` defaults to all of ``BUILTIN_CATEGORIES``. A category already present with
    the same parameters is kept as is; one made with other parameters is rebuilt. A folder of
    the same name that this function did not make is never touched (FileExistsError).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    counts = (("n_train", n_train, 1), ("n_test_good", n_test_good, 0), ("n_test_per_defect", n_test_per_defect, 0))
    for name, value, minimum in counts:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    categories = resolve_categories(categories)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parameters = {category: _parameters(int(seed), int(image_size), int(n_train), int(n_test_good),
                                        int(n_test_per_defect), category) for category in categories}
    build_each([root / category for category in categories],
               lambda folder: is_complete(folder, parameters[folder.name]),
               lambda folder: _build_category(folder, parameters[folder.name]),
               "writing the built-in data")
    return root


def _build_category(folder: Path, parameters: dict) -> None:
    """Write one category (``folder``'s name) into a staging folder beside it, then rename it over ``folder``."""
    root, category = folder.parent, folder.name
    if folder.exists() and not (folder / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{folder} exists but was not made by make_builtin_dataset (no {MANIFEST_NAME}); "
            "move it away or choose another root"
        )
    staging = root / f".{category}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _write_category(staging, category, parameters)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


DEVELOPMENT_SEED = 1


def make_development_dataset(root: str | Path, seed: int = DEVELOPMENT_SEED, image_size: int = 256,
                             n_train: int = 60, n_test_good: int = 24, n_test_per_defect: int = 8) -> Path:
    """Write (or find) the development set under ``root``: ``DEVELOPMENT_CATEGORIES`` (a photographed
    coin, a tissue texture), drawn with ``seed`` by the built-in painter, with every defect kind.

    Settings are chosen here: other source photographs *and* another seed than the test categories
    (seed 0), so that a choice cannot fit the reported images; the cross-check painter
    (:mod:`diffad.data.crosscheck`) stays untouched by any choice. Twice the test images of the
    built-in data per kind and three times the good ones: a choice among many settings needs them.
    """
    if seed == 0:
        raise ValueError("the development set needs a seed other than 0, the test data's")
    return make_builtin_dataset(root, seed=seed, image_size=image_size, n_train=n_train, n_test_good=n_test_good,
                                n_test_per_defect=n_test_per_defect, categories=DEVELOPMENT_CATEGORIES)


# ---------------------------------------------------------------- an MVTec-AD-shaped folder

# MVTec-AD's defect folders, category by category (the dataset's test/ and ground_truth/ names).
MVTEC_DEFECT_KINDS: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "cable": ("bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation",
              "missing_cable", "missing_wire", "poke_insulation"),
    "capsule": ("crack", "faulty_imprint", "poke", "scratch", "squeeze"),
    "carpet": ("color", "cut", "hole", "metal_contamination", "thread"),
    "grid": ("bent", "broken", "glue", "metal_contamination", "thread"),
    "hazelnut": ("crack", "cut", "hole", "print"),
    "leather": ("color", "cut", "fold", "glue", "poke"),
    "metal_nut": ("bent", "color", "flip", "scratch"),
    "pill": ("color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"),
    "screw": ("manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"),
    "tile": ("crack", "glue_strip", "gray_stroke", "oil", "rough"),
    "toothbrush": ("defective",),
    "transistor": ("bent_lead", "cut_lead", "damaged_case", "misplaced"),
    "wood": ("color", "combined", "hole", "liquid", "scratch"),
    "zipper": ("broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth",
               "squeezed_teeth"),
}
# Which built-in category stands in for each MVTec-AD one (a texture for a texture, an object for an
# object), and which built-in painter draws each of its defect folders (by the kind's look: a cut or a
# crack is a crack, a colour defect a discolouring, contamination a foreign patch, a bend or a flip a
# displaced or rotated part; anything else a scratch).
_SHAPED_SOURCE = {"carpet": "grass", "grid": "gravel", "leather": "brick", "tile": "gravel", "wood": "brick",
                  "bottle": "cup", "cable": "nut", "capsule": "capsule", "hazelnut": "nut", "metal_nut": "nut",
                  "pill": "capsule", "screw": "capsule", "toothbrush": "capsule", "transistor": "nut",
                  "zipper": "cup"}
_SHAPED_PAINTER = (("crack", "crack"), ("cut", "crack"), ("broken", "hole"), ("hole", "hole"), ("poke", "pits"),
                   ("color", "discolour"), ("gray", "shift"), ("oil", "stain"), ("liquid", "stain"),
                   ("glue", "stain"), ("print", "stain"), ("contamination", "foreign"), ("combined", "foreign"),
                   ("bent", "displaced"), ("flip", "rotated_patch"), ("misplaced", "rotated_patch"),
                   ("swap", "rotated_patch"), ("missing", "hole"), ("squeeze", "displaced"), ("fold", "smudge"),
                   ("rough", "smudge"), ("thread", "scratch"))
_SHAPED_MANIFEST = ".mvtec_shaped.json"


def shaped_painter(kind: str) -> str:
    """The built-in defect kind that draws MVTec-AD's defect folder ``kind`` in a shaped dataset."""
    return next((painter for part, painter in _SHAPED_PAINTER if part in kind), "scratch")


def make_mvtec_shaped_dataset(root: str | Path, categories: Sequence[str] | None = None, image_size: int = 64,
                              n_train: int = 8, n_test_good: int = 2, n_test_per_defect: int = 1,
                              seed: int = 0) -> Path:
    """Write a folder shaped exactly like MVTec-AD, shrunk only in size, and return ``root``.

    MVTec-AD's category names (``categories``, default all 15) with each category's real defect
    folders (:data:`MVTEC_DEFECT_KINDS`), ``train/good``, ``test/<kind>/000.png`` and masks in
    ``ground_truth/<kind>/000_mask.png``; the images are drawn by the built-in painter (a built-in
    texture for a texture, an object for an object). What it is for: running the ``paper`` and
    ``authors`` presets, which read MVTec-AD, on a machine without it (tests/test_switch.py runs
    every chapter so). Not a stand-in for MVTec-AD's numbers. Written once: a category already
    there with the same parameters is kept.
    """
    from .mvtec import MVTEC_CATEGORIES

    categories = list(MVTEC_CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in MVTEC_DEFECT_KINDS]
    if unknown:
        raise ValueError(f"not MVTec-AD categories: {unknown}; choose from {sorted(MVTEC_DEFECT_KINDS)}")
    for name, value, minimum in (("n_train", n_train, 1), ("n_test_good", n_test_good, 1),
                                 ("n_test_per_defect", n_test_per_defect, 1), ("image_size", image_size, 32)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parameters = {category: {"generator": "diffad.data.builtin.make_mvtec_shaped_dataset",
                             "version": GENERATOR_VERSION, "category": category, "source": _SHAPED_SOURCE[category],
                             "seed": int(seed), "image_size": int(image_size), "n_train": int(n_train),
                             "n_test_good": int(n_test_good), "n_test_per_defect": int(n_test_per_defect)}
                  for category in categories}
    build_each([root / category for category in categories],
               lambda folder: _shaped_complete(folder, parameters[folder.name]),
               lambda folder: _build_shaped(folder, parameters[folder.name]),
               "writing the MVTec-shaped data")
    return root


def _build_shaped(folder: Path, parameters: dict) -> None:
    """Write one MVTec-shaped category into a staging folder beside it, then rename it over ``folder``."""
    root = folder.parent
    if folder.exists() and not (folder / _SHAPED_MANIFEST).is_file():
        raise FileExistsError(f"{folder} exists but was not made by make_mvtec_shaped_dataset; choose another root")
    staging = root / f".{folder.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    _write_shaped_category(staging, folder.name, parameters)
    (staging / _SHAPED_MANIFEST).write_text(json.dumps(parameters, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def _shaped_complete(folder: Path, parameters: dict) -> bool:
    manifest = folder / _SHAPED_MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()) == parameters


def _write_shaped_category(folder: Path, category: str, parameters: dict) -> None:
    source, size, seed = parameters["source"], parameters["image_size"], parameters["seed"]

    def save(array: np.ndarray, relative: str) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(array, path)

    for split, count, subfolder in (("train", "n_train", "train/good"), ("test_good", "n_test_good", "test/good")):
        for index in range(parameters[count]):
            save(_normal_image(source, category_rng(seed, category, _SPLIT_CODES[split], index), size),
                 f"{subfolder}/{index:03d}.png")
    for kind_index, kind in enumerate(MVTEC_DEFECT_KINDS[category]):
        for index in range(parameters["n_test_per_defect"]):
            rng = category_rng(seed, category, 100 + kind_index, index)
            image, mask = _defective_image(source, shaped_painter(kind), rng, size,
                                           SIZE_LEVELS[(index + 2) % len(SIZE_LEVELS)])
            save(image, f"test/{kind}/{index:03d}.png")
            save(mask.astype(np.uint8) * 255, f"ground_truth/{kind}/{index:03d}_mask.png")
