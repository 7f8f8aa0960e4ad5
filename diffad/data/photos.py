"""A folder of "phone photos" of one object, for the chapter "Your own object", made offline in a second.

The object is the rocket on its launch pad of ``skimage.data.rocket()`` (a real colour photograph
bundled with scikit-image, CC0; no other chapter uses it). Each photo is the rocket as a person
would photograph it again and again: the framing shifts (up to 4 % of the side), turns (up to 2
degrees) and zooms (+-5 %), the exposure and white balance change a little, the sensor adds noise,
and the photos are saved as JPEGs of several sizes, a few of them stored sideways with an EXIF
orientation tag, as phones do. What :func:`make_photo_folder` writes::

    <root>/normal/*.jpg                          40 photos of the good object (training)
    <root>/test/good/*.jpg                       new photos of the good object
    <root>/test/<kind>/*.jpg                     new photos with a defect painted in
    <root>/test/ground_truth/<kind>/*_mask.png   where each defect is (255), for the metrics

Defects come from the built-in dataset's painter (:func:`diffad.data.builtin.paint_defect`), painted
on the photo at its own resolution before it is saved: ``scratch`` (a line across the lens or the
rocket), ``stain`` (a tinted blob: dirt on the white rocket), ``crack`` (a dark branching line) and
``pits`` (a cluster of dark specks, dust). Determinism: every photo has its own generator seeded
by (seed, split, index); a finished folder holds a manifest and is returned at once next time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from diffad.io import build_each

from .defects import paint_defect

__all__ = ["PHOTO_DEFECTS", "make_photo_folder"]

PHOTO_DEFECTS = ("scratch", "stain", "crack", "pits")
_SOURCE_CENTRE = (228.0, 322.0)  # (y, x) of the rocket in skimage.data.rocket(), 427x640
_SOURCE_SIDE = 300.0  # the framing: 300 source pixels around the rocket
_SIDES = (224, 256, 288, 320)  # the saved photos' sizes
_MANIFEST = ".photos.json"
_VERSION = 1
_SPLITS = {"normal": 1, "good": 2, "defect": 3}
_EXIF_ORIENTATION = 0x0112


def _source() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.rocket())


def _photo(source: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """One framing of the rocket: HxWx3 float32 in [0, 1], square, of one of :data:`_SIDES`."""
    side = int(rng.choice(_SIDES))
    scale = _SOURCE_SIDE * rng.uniform(0.95, 1.05) / side  # source pixels per output pixel
    angle = np.deg2rad(rng.uniform(-2.0, 2.0))
    cy, cx = np.asarray(_SOURCE_CENTRE) + rng.uniform(-0.04, 0.04, 2) * _SOURCE_SIDE
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    # PIL's affine maps an output pixel (x, y) to the source pixel (a x + b y + c, d x + e y + f)
    half = side / 2
    coefficients = (cos, -sin, cx - cos * half + sin * half, sin, cos, cy - sin * half - cos * half)
    framed = source.transform((side, side), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BICUBIC)
    image = np.asarray(framed, dtype=np.float32) / 255.0
    exposure = rng.uniform(0.9, 1.1)
    balance = 1.0 + rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    return np.clip(image * exposure * balance, 0.0, 1.0)


def _rocket(photo: np.ndarray) -> np.ndarray:
    """Where the bright rocket (and the lit pad) is: a stain is dirt on it, not on the dark sky."""
    from scipy.ndimage import binary_opening

    return binary_opening(photo.mean(axis=2) > 0.55, iterations=2).astype(np.float32)


def _save_jpeg(image: np.ndarray, path: Path, rng: np.random.Generator, sideways: bool) -> None:
    noisy = image + rng.normal(0.0, 0.01, image.shape).astype(np.float32)
    picture = Image.fromarray(np.round(np.clip(noisy, 0, 1) * 255).astype(np.uint8))
    exif = Image.Exif()
    if sideways:  # stored turned 90 degrees counter-clockwise; orientation 6 tells a viewer to turn it back
        picture = picture.transpose(Image.Transpose.ROTATE_90)
        exif[_EXIF_ORIENTATION] = 6
    picture.save(path, format="JPEG", quality=int(rng.integers(88, 96)), exif=exif.tobytes())


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def _write(folder: Path, seed: int, n_normal: int, n_test_good: int, n_per_defect: int) -> None:
    source = _source()
    (folder / "normal").mkdir(parents=True)
    for i in range(n_normal):
        rng = _rng(seed, "normal", i)
        _save_jpeg(_photo(source, rng), folder / "normal" / f"{i:03d}.jpg", rng, sideways=i % 13 == 5)
    (folder / "test" / "good").mkdir(parents=True)
    for i in range(n_test_good):
        rng = _rng(seed, "good", i)
        _save_jpeg(_photo(source, rng), folder / "test" / "good" / f"{i:03d}.jpg", rng, sideways=False)
    for k, kind in enumerate(PHOTO_DEFECTS):
        (folder / "test" / kind).mkdir(parents=True)
        (folder / "test" / "ground_truth" / kind).mkdir(parents=True)
        for i in range(n_per_defect):
            rng = _rng(seed, "defect", 100 * k + i)
            level = (0.0, 0.5, 1.0)[i % 3]
            photo = _photo(source, rng)
            image, mask = paint_defect(photo, kind, rng, level, where=_rocket(photo) if kind == "stain" else None)
            _save_jpeg(image, folder / "test" / kind / f"{i:03d}.jpg", rng, sideways=False)
            Image.fromarray((mask * 255).astype(np.uint8)).save(
                folder / "test" / "ground_truth" / kind / f"{i:03d}_mask.png")


def make_photo_folder(root: str | Path, seed: int = 0, n_normal: int = 40, n_test_good: int = 12,
                      n_per_defect: int = 3) -> Path:
    """Write the rocket's photo folder under ``root`` (see the module docstring) and return ``root``.

    Written into a temporary folder and renamed when complete; a finished folder with the same
    parameters is returned as it is.
    """
    root = Path(root)
    parameters = {"version": _VERSION, "seed": seed, "n_normal": n_normal, "n_test_good": n_test_good,
                  "n_per_defect": n_per_defect}
    build_each([root], lambda folder: _complete(folder, parameters),
               lambda folder: _replace_folder(folder, parameters), "writing the photo folder")
    return root


def _complete(root: Path, parameters: dict) -> bool:
    manifest = root / _MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()) == parameters


def _replace_folder(root: Path, parameters: dict) -> None:
    """Write the photo folder into a temporary one and rename it over ``root``."""
    manifest = root / _MANIFEST
    if root.exists():
        if not manifest.is_file():
            raise FileExistsError(f"{root} exists and is not a photo folder made by diffad: choose another root")
        shutil.rmtree(root)  # made by an earlier version or with other parameters
    temporary = root.with_name(root.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    _write(temporary, parameters["seed"], parameters["n_normal"], parameters["n_test_good"],
           parameters["n_per_defect"])
    (temporary / _MANIFEST).write_text(json.dumps(parameters))
    temporary.rename(root)
