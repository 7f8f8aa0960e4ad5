"""A small built-in anomaly-detection dataset in the MVTec-AD layout, made offline in seconds.

Why: MVTec-AD is 5 GB and cannot be downloaded everywhere (tests, CI, a laptop without
network). :func:`make_builtin_dataset` writes a dataset with the same folder layout, so the
same :class:`~diffad.data.MVTecAD` reader, training loop and metrics run on it unchanged::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png     (0 = normal, 255 = defect)

Categories (``BUILTIN_CATEGORIES``)
-----------------------------------
Textures, from scikit-image's bundled photographs (licence CC0, loaded offline):

* ``brick``  -- ``skimage.data.brick()``, tinted red-brown;
* ``grass``  -- ``skimage.data.grass()``, tinted green;
* ``gravel`` -- ``skimage.data.gravel()``, tinted warm grey.

Each image is a random crop of half the 512 px source (random position, random horizontal
flip), resized to ``image_size`` (PIL bilinear, antialiased), with a small brightness
(+-0.03) and contrast (x0.93-1.07) jitter, then mapped through a dark-to-light colour ramp so
that the images have three real colour channels.

Objects, two drawn procedurally with numpy (our own code, same licence as diffad):

* ``nut``     -- a machined hexagonal metal nut with a chamfer, a threaded bore, turning
  marks and a soft drop shadow, on a light-grey table;
* ``capsule`` -- a two-tone (red / ivory) medicine capsule with cylindrical shading, a
  specular highlight and a seam, on a blue-grey table;

and two from real colour photographs bundled with scikit-image (CC0), warped with the pose change
below (the photographed table moves with the object) and relit:

* ``cup``    -- ``skimage.data.coffee()``: an espresso cup with a spoon on a saucer, on wood
  (the object: the saucer's and the cup's outlines, two ellipses);
* ``retina`` -- ``skimage.data.retina()``: a fundus photograph, a red disc with vessels and
  the optic disc, on black.

Every object image has a small random pose and lighting change: shift up to 3 % of the
image, rotation up to 4 degrees, scale +-2 %, light direction +-10 degrees, brightness +-4 %,
plus sensor noise (sigma 0.01). Normal variation is therefore real, as in MVTec's objects.

Development categories (``DEVELOPMENT_CATEGORIES``, :func:`make_development_dataset`), made from
photographs that no test category uses, for choosing settings (chapter 7):

* ``coin``   -- a real photographed coin (the helmeted head of ``skimage.data.coins()``, CC0),
  warped with the objects' pose and lighting change onto a dark table, warm-tinted;
* ``tissue`` -- random crops (0.4 of the side) of ``skimage.data.immunohistochemistry()``
  (CC0), a real colour texture with large normal variation.

Defect kinds (``DEFECT_KINDS``)
-------------------------------
Every category's test split has all thirteen kinds; six of them (``LOW_CONTRAST_KINDS``) are
deliberately hard, and four (smudge, discolour, displaced, pits) are MVTec-AD kinds that favour
no branch in particular: large and faint, a whole part, a misplaced part, a cluster. Sizes cycle small / medium / large over the images of a kind (``size``
below is the fraction of the image side at 256 px). Defects are blended with antialiased
edges; the ground-truth mask is exactly the pixels whose blend weight exceeds 0.5, so the
mask and the altered pixels agree.

* ``scratch``       -- a thin bright or dark curve (quadratic Bezier), 2-4 px wide at 256 px,
  length 0.15-0.5 of the side, 80 % of the way to the line colour. Easy.
* ``crack``         -- a dark, 1-2.5 px wide random-walk path with 1-3 side branches,
  0.15-0.45 of the side. Easy to medium (thin).
* ``stain``         -- an irregular blob (radius 0.06-0.16) tinted brown, rust or ink-blue by
  multiplication, with a soft edge. Easy.
* ``hole``          -- textures: a dark irregular pit (radius 0.03-0.08); objects: a missing
  piece (radius 0.08-0.15) bitten out of the outline, showing the table. Easy.
* ``foreign``       -- an irregular patch (radius 0.05-0.12) of another texture in that
  texture's own colours (e.g. gravel on brick, grass on a nut). Easy.
* ``faint_scratch`` -- like ``scratch`` but only 20-30 % of the way to the line colour and
  thinner. Hard (low contrast).
* ``shift``         -- a large soft blob (radius 0.1-0.2) whose brightness moves by 0.05-0.09 or
  one colour channel by 0.04-0.07 (on a 0-1 scale). Hard (low contrast, low frequency).
* ``matched_patch`` -- a patch (radius 0.08-0.14) of another texture whose per-channel mean
  and standard deviation are matched to the pixels it covers: right colour, wrong
  structure. Hard.
* ``rotated_patch`` -- the image rotated by 60-180 degrees about a point, pasted back in a
  disc (radius 0.08-0.14): right colours and texture statistics, wrong orientation. Hard
  (nearly invisible on isotropic texture such as gravel; obvious on brick).
* ``smudge``        -- a large irregular patchy smear (radius 0.12-0.24, wobbling outline, its
  strength modulated by smooth noise), 15-45 % of the way to grime, dust or oil, whichever two
  differ most from the surface. Hard (large, low contrast: MVTec's stains and contamination).
* ``discolour``     -- objects: the whole object with one colour channel scaled by 12-25 %;
  textures: a broad soft region (radius 0.22-0.34) likewise. Hard (a whole part, low frequency).
* ``displaced``     -- objects: a piece of the rim (radius 0.07-0.12) slid along the outline by
  0.05-0.09 of the side, leaving a gap and overlapping where it lands (the mask is both);
  textures: a disc (radius 0.07-0.13) of the texture copied from 0.1-0.25 of the side away,
  out of phase with its surroundings. Medium.
* ``pits``          -- a cluster of 5-14 small dark pits (radius 0.012-0.025) scattered within
  0.04-0.1 of a centre. Medium (small, many components).

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "PAINTABLE_KINDS",
    "paint_defect",
    "BUILTIN_CATEGORIES",
    "BUILTIN_TEXTURES",
    "BUILTIN_OBJECTS",
    "DEFECT_KINDS",
    "DEVELOPMENT_CATEGORIES",
    "LOW_CONTRAST_KINDS",
    "CATEGORY_DEFECTS",
    "make_builtin_dataset",
    "make_development_dataset",
    "make_mvtec_shaped_dataset",
    "MVTEC_DEFECT_KINDS",
]

BUILTIN_TEXTURES = ("brick", "grass", "gravel")
BUILTIN_OBJECTS = ("nut", "capsule", "cup", "retina")
BUILTIN_CATEGORIES = BUILTIN_TEXTURES + BUILTIN_OBJECTS
# Development categories: other source photographs than every test category, for choosing
# settings (``make_development_dataset``); never part of a reported table.
DEVELOPMENT_CATEGORIES = ("coin", "tissue")

DEFECT_KINDS = {
    "scratch": "thin bright or dark curve, 2-4 px wide at 256 px, 0.15-0.5 of the side long (easy)",
    "crack": "dark thin branching random-walk path, 1-2.5 px wide, 0.15-0.45 of the side (easy-medium)",
    "stain": "irregular soft blob tinted brown, rust or ink-blue, radius 0.06-0.16 of the side (easy)",
    "hole": "dark pit on textures (radius 0.03-0.08), a piece missing from the outline on objects (0.08-0.15) (easy)",
    "foreign": "patch of another texture in its own colours, radius 0.05-0.12 (easy)",
    "faint_scratch": "scratch at 20-30 % strength, thinner (hard, low contrast)",
    "shift": "large soft blob, brightness +-0.05-0.09 or one channel +-0.04-0.07 (hard, low contrast)",
    "matched_patch": "patch of another texture matched to the local mean and contrast (hard)",
    "rotated_patch": "disc of the image rotated by 60-180 degrees about its centre (hard)",
    "smudge": "large irregular patchy smear of dirt, radius 0.12-0.24, 15-45 % of the way to its colour (hard)",
    "discolour": "the whole object, or a broad soft region of texture, with one channel off by 12-25 % (hard)",
    "displaced": "objects: a piece of the rim slid along the outline; textures: a patch copied out of phase (medium)",
    "pits": "cluster of 5-14 small dark pits, radius 0.012-0.025, within 0.04-0.1 of a centre (medium)",
}
LOW_CONTRAST_KINDS = ("faint_scratch", "shift", "matched_patch", "rotated_patch", "smudge", "discolour")
CATEGORY_DEFECTS = {category: tuple(DEFECT_KINDS) for category in BUILTIN_CATEGORIES + DEVELOPMENT_CATEGORIES}

_GENERATOR_VERSION = 1
_MANIFEST_NAME = ".builtin.json"
_SPLIT_CODES = {"train": 1, "test_good": 2}

# Colour ramps (dark, light) that turn the grey photographs into colour textures.
_PALETTES = {
    "brick": ((0.22, 0.09, 0.06), (0.98, 0.72, 0.58)),
    "grass": ((0.04, 0.12, 0.02), (0.72, 0.90, 0.45)),
    "gravel": ((0.10, 0.09, 0.08), (0.96, 0.93, 0.86)),
    # sources of the development categories' foreign patches, and the coin's metal
    "moon": ((0.08, 0.08, 0.12), (0.88, 0.90, 0.96)),
    "camera": ((0.05, 0.05, 0.05), (0.95, 0.95, 0.95)),
    "coin": ((0.10, 0.08, 0.05), (0.98, 0.90, 0.70)),
}
# Where foreign and matched patches come from: another photograph than the category's own (the
# development categories draw on photographs that no test category uses).
_FOREIGN_SOURCE = {"brick": "gravel", "grass": "brick", "gravel": "grass", "nut": "grass", "capsule": "gravel",
                   "cup": "gravel", "retina": "grass", "coin": "moon", "tissue": "camera"}
_MATCHED_SOURCE = {"brick": "gravel", "grass": "gravel", "gravel": "brick", "nut": "gravel", "capsule": "grass",
                   "cup": "grass", "retina": "gravel", "coin": "camera", "tissue": "moon"}


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int, category: str, split_code: int, index: int) -> np.random.Generator:
    """One independent generator per image, stable across runs and category subsets."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(category.encode()), split_code, index]))


@lru_cache(maxsize=None)
def _texture_source(name: str) -> Image.Image:
    """The 512x512 grey scikit-image photograph as a float ('F') PIL image in [0, 1]."""
    import skimage.data

    grey = getattr(skimage.data, name)().astype(np.float32) / 255.0
    return Image.fromarray(grey)  # float32 -> mode "F"


def _grey_crop(name: str, rng: np.random.Generator, size: int, crop_fraction: float = 0.5) -> np.ndarray:
    """A random (crop, flip) of a texture photograph, resized to size x size, grey in [0, 1]."""
    source = _texture_source(name)
    crop = crop_fraction * source.width
    x0 = rng.uniform(0, source.width - crop)
    y0 = rng.uniform(0, source.height - crop)
    grey = np.asarray(source.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop)))
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def _colourise(grey: np.ndarray, palette: str) -> np.ndarray:
    dark, light = (np.asarray(c, np.float32) for c in _PALETTES[palette])
    return dark + (light - dark) * grey[..., None]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


def _coverage(signed_distance_px: np.ndarray) -> np.ndarray:
    """Antialiased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - signed_distance_px, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smooth random field with unit standard deviation and correlation length ~``sigma`` px.

    Fine grain: Gaussian-filtered white noise; coarse (sigma >= 3): a small noise grid
    upsampled bicubically, which is much cheaper than a wide Gaussian kernel.
    """
    if sigma < 3:
        from scipy.ndimage import gaussian_filter

        noise = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    else:
        cells = max(2, int(round(size / sigma)))
        coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
        noise = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
    return (noise - noise.mean()) / (noise.std() + 1e-8)


def _blob(
    rng: np.random.Generator,
    size: int,
    centre: tuple[float, float],
    radius: float,
    edge_px: float,
    wobble: float = 0.25,
) -> np.ndarray:
    """Blend weight of an irregular blob: a circle whose radius wobbles with angle.

    Weight > 0.5 exactly inside the wobbly outline; ``edge_px`` is the width of the soft ramp.
    """
    ys, xs = _grid(size)
    dy, dx = ys - centre[0], xs - centre[1]
    angle = np.arctan2(dy, dx)
    outline = np.ones_like(angle)
    for harmonic in range(2, 6):
        outline += wobble / harmonic * rng.uniform(-1, 1) * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
    distance = np.hypot(dy, dx) - radius * outline
    return np.clip(0.5 - distance / max(edge_px, 1e-3), 0.0, 1.0)


def _polyline_weight(size: int, paths: Sequence[np.ndarray], widths: Sequence[float]) -> np.ndarray:
    """Antialiased blend weight of thick polylines (points as (y, x) rows); > 0.5 within width/2."""
    weight = np.zeros((size, size), np.float32)
    for points, width in zip(paths, widths):
        pad = width / 2 + 2
        y0 = int(max(0, np.floor(points[:, 0].min() - pad)))
        y1 = int(min(size, np.ceil(points[:, 0].max() + pad) + 1))
        x0 = int(max(0, np.floor(points[:, 1].min() - pad)))
        x1 = int(min(size, np.ceil(points[:, 1].max() + pad) + 1))
        if y0 >= y1 or x0 >= x1:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        distance = np.full(ys.shape, np.inf, np.float32)
        for (ay, ax), (by, bx) in zip(points[:-1], points[1:]):
            vy, vx = by - ay, bx - ax
            t = np.clip(((ys - ay) * vy + (xs - ax) * vx) / max(vy * vy + vx * vx, 1e-12), 0.0, 1.0)
            np.minimum(distance, np.hypot(ys - ay - t * vy, xs - ax - t * vx), out=distance)
        local = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)
        np.maximum(weight[y0:y1, x0:x1], local, out=weight[y0:y1, x0:x1])
    return weight


# ----------------------------------------------------------------------------- normal scenes


@dataclass
class _Scene:
    """A rendered normal image and what the defect painters need to know about it."""

    image: np.ndarray  # HxWx3 float32 in [0, 1]
    support: np.ndarray  # HxW weight where defects may go (1 on textures, object coverage on objects)
    outline: np.ndarray  # HxW coverage of the object's outer silhouette, bore included (1 on textures)
    background: np.ndarray | None  # the empty, unshadowed table (objects only), for missing-part holes
    is_object: bool
    noise_sigma: float  # sensor noise added after the defect, so defects do not change noise statistics


def _texture_scene(category: str, rng: np.random.Generator, size: int) -> _Scene:
    grey = _grey_crop(category, rng, size)
    mean = float(grey.mean())
    grey = (grey - mean) * rng.uniform(0.93, 1.07) + mean + rng.uniform(-0.03, 0.03)
    image = _colourise(np.clip(grey, 0, 1), category)
    ones = np.ones((size, size), np.float32)
    return _Scene(image, ones, ones, None, False, 0.0)


def _pose(rng: np.random.Generator, size: int):
    """Small random pose and lighting shared by the object renderers."""
    return dict(
        cy=size / 2 + rng.uniform(-0.03, 0.03) * size,
        cx=size / 2 + rng.uniform(-0.03, 0.03) * size,
        angle=np.deg2rad(rng.uniform(-4, 4)),
        scale=rng.uniform(0.98, 1.02),
        light=np.deg2rad(225 + rng.uniform(-10, 10)),  # from the top left
        gain=rng.uniform(0.96, 1.04),
    )


def _light_gradient(pose: dict, u: np.ndarray, v: np.ndarray, strength: float = 0.05) -> np.ndarray:
    """A soft linear brightening towards the light, for relighting a photographed object."""
    light = pose["light"] - pose["angle"]
    return 1 + strength * (u * np.cos(light) + v * np.sin(light))


def _object_frame(size: int, pose: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """Object-frame coordinates (u, v) in units of half the image side, and pixels per unit."""
    ys, xs = _grid(size)
    unit = size / 2 * pose["scale"]
    dy, dx = (ys - pose["cy"]) / unit, (xs - pose["cx"]) / unit
    c, s = np.cos(pose["angle"]), np.sin(pose["angle"])
    return c * dx + s * dy, -s * dx + c * dy, unit


def _table(size: int, colour: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    ys, xs = _grid(size)
    r2 = ((ys - size / 2) ** 2 + (xs - size / 2) ** 2) / (size / 2) ** 2
    shade = 1.0 - 0.06 * r2 + 0.015 * _smooth_noise(rng, size, size / 16)
    return np.asarray(colour, np.float32) * shade[..., None]


def _nut_scene(rng: np.random.Generator, size: int) -> _Scene:
    pose = _pose(rng, size)
    u, v, unit = _object_frame(size, pose)
    inradius, bore = 0.68, 0.30
    normals = [(np.cos(a), np.sin(a)) for a in np.deg2rad([0, 60, 120])]
    hex_sdf = np.max([np.abs(u * nx + v * ny) for nx, ny in normals], axis=0) - inradius
    radius = np.hypot(u, v)
    hexagon = _coverage(hex_sdf * unit)
    face = _coverage((radius - 1.08 * inradius) * unit)
    hole = _coverage((radius - bore) * unit)
    thread = _coverage((radius - bore - 0.05) * unit) - hole

    light = pose["light"] - pose["angle"]
    theta = np.arctan2(v, u)
    gradient = (u * np.cos(light) + v * np.sin(light)) / inradius
    face_shade = 0.56 + 0.07 * gradient + 0.012 * np.sin(radius * unit * 0.9) + 0.012 * _smooth_noise(rng, size, 1.2)
    chamfer_shade = 0.50 + 0.25 * np.cos(theta - light)
    thread_shade = 0.28 + 0.06 * np.sin(theta * 24) - 0.08 * np.cos(theta - light)
    metal = face * face_shade + (1 - face) * chamfer_shade
    metal = thread * thread_shade + (1 - thread) * metal
    metal = metal * pose["gain"]
    tint = np.asarray((0.93, 0.95, 0.98), np.float32)

    lit_table = _table(size, (0.80, 0.78, 0.74), rng)
    shadow_u, shadow_v = u + 0.04 * np.cos(light), v + 0.04 * np.sin(light)  # cast away from the light
    shadow_sdf = np.max([np.abs(shadow_u * nx + shadow_v * ny) for nx, ny in normals], axis=0) - inradius
    table = lit_table * (1 - 0.35 * np.clip(0.5 - shadow_sdf / 0.08, 0, 1))[..., None]
    bore_view = table * 0.45
    solid = metal[..., None] * tint
    nut = hole[..., None] * bore_view + (1 - hole[..., None]) * solid
    image = hexagon[..., None] * nut + (1 - hexagon[..., None]) * table
    support = hexagon * (1 - hole)
    return _Scene(
        image.astype(np.float32),
        support.astype(np.float32),
        hexagon.astype(np.float32),
        lit_table.astype(np.float32),  # where a piece is missing, its shadow is missing too
        True,
        0.01,
    )


def _capsule_scene(rng: np.random.Generator, size: int) -> _Scene:
    pose = _pose(rng, size)
    u, v, unit = _object_frame(size, pose)
    half_length, radius = 0.80, 0.30
    along = np.clip(u, -(half_length - radius), half_length - radius)
    du, dv = u - along, v
    distance = np.hypot(du, dv)
    body = _coverage((distance - radius) * unit)

    # Surface normal of the capsule (cylinder with hemispherical caps), in the object frame.
    nu, nv = du / radius, dv / radius
    nz = np.sqrt(np.clip(1 - nu**2 - nv**2, 0, 1))
    light = pose["light"] - pose["angle"]
    lu, lv, lz = 0.45 * np.cos(light), 0.45 * np.sin(light), 0.89
    diffuse = np.clip(nu * lu + nv * lv + nz * lz, 0, 1)
    half_u, half_v, half_z = lu, lv, lz + 1.0
    norm = np.sqrt(half_u**2 + half_v**2 + half_z**2)
    specular = np.clip((nu * half_u + nv * half_v + nz * half_z) / norm, 0, 1) ** 40

    red = np.asarray((0.80, 0.22, 0.10), np.float32)
    ivory = np.asarray((0.95, 0.90, 0.79), np.float32)
    right = _coverage(-u * unit)[..., None]
    albedo = right * red[None, None] + (1 - right) * ivory[None, None]
    seam = np.clip(1.2 - np.abs(u) * unit / max(1.0, size / 256), 0, 1) * body
    shade = (0.30 + 0.70 * diffuse) * (1 - 0.35 * seam)
    colour = albedo * shade[..., None] * pose["gain"] + 0.45 * specular[..., None]
    colour = colour * (1 + 0.01 * _smooth_noise(rng, size, 1.5))[..., None]

    lit_table = _table(size, (0.34, 0.37, 0.42), rng)
    shadow_distance = np.hypot(u - 0.05 * np.cos(light + np.pi) - along, v - 0.05 * np.sin(light + np.pi)) - radius
    table = lit_table * (1 - 0.45 * np.clip(0.5 - shadow_distance / 0.07, 0, 1))[..., None]
    image = body[..., None] * colour + (1 - body[..., None]) * table
    body = body.astype(np.float32)
    return _Scene(np.clip(image, 0, 1).astype(np.float32), body, body, lit_table.astype(np.float32), True, 0.01)


@lru_cache(maxsize=None)
def _coin_source() -> tuple[np.ndarray, tuple[float, float], float]:
    """One coin of ``skimage.data.coins()`` (a real photograph, CC0): the grey photograph, the
    coin's centre (y, x) and radius in its pixels. Otsu's threshold finds the coin; its outline
    is taken as the circle of the same area (the threshold frays at the dark rim)."""
    import skimage.data
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    grey = skimage.data.coins().astype(np.float32) / 255.0
    y0, x0 = 224, 8  # the helmeted head, bottom left
    crop = grey[y0:298, x0:86]
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(crop > threshold_otsu(crop), iterations=2))
    labels, _ = ndimage.label(mask)
    mask = labels == np.bincount(labels.ravel()[labels.ravel() > 0]).argmax()
    cy, cx = ndimage.center_of_mass(mask)
    return grey, (cy + y0, cx + x0), float(np.sqrt(mask.sum() / np.pi))


def _coin_scene(rng: np.random.Generator, size: int) -> _Scene:
    """The photographed coin on a dark table, with the objects' small pose and lighting change."""
    from scipy.ndimage import map_coordinates

    grey, (cy, cx), radius = _coin_source()
    pose = _pose(rng, size)
    u, v, unit = _object_frame(size, pose)
    coin_radius = 0.74  # of half the image side
    coords = [cy + v * radius / coin_radius, cx + u * radius / coin_radius]
    metal = map_coordinates(grey, coords, order=3, mode="nearest")
    coverage = _coverage((np.hypot(u, v) - coin_radius) * unit)
    metal = metal * pose["gain"] * _light_gradient(pose, u, v)
    light = pose["light"] - pose["angle"]
    coin = _colourise(np.clip(metal, 0, 1), "coin")
    lit_table = _table(size, (0.20, 0.21, 0.23), rng)
    shadow = np.clip(0.5 - (np.hypot(u + 0.03 * np.cos(light), v + 0.03 * np.sin(light)) - coin_radius) / 0.06, 0, 1)
    table = lit_table * (1 - 0.4 * shadow)[..., None]
    image = coverage[..., None] * coin + (1 - coverage[..., None]) * table
    coverage = coverage.astype(np.float32)
    return _Scene(np.clip(image, 0, 1).astype(np.float32), coverage, coverage, lit_table.astype(np.float32), True, 0.01)


@lru_cache(maxsize=None)
def _colour_source(name: str) -> Image.Image:
    """A colour scikit-image photograph as an RGB PIL image."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def _tissue_scene(rng: np.random.Generator, size: int) -> _Scene:
    """A random (crop, flip) of the immunohistochemistry photograph: a real colour texture."""
    source = _colour_source("immunohistochemistry")
    crop = 0.4 * source.width
    x0, y0 = rng.uniform(0, source.width - crop), rng.uniform(0, source.height - crop)
    image = np.asarray(source.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop)))
    image = image.astype(np.float32) / 255.0
    if rng.random() < 0.5:
        image = image[:, ::-1]
    mean = image.mean(axis=(0, 1))
    image = (image - mean) * rng.uniform(0.93, 1.07) + mean + rng.uniform(-0.03, 0.03)
    ones = np.ones((size, size), np.float32)
    return _Scene(np.clip(image, 0, 1).astype(np.float32), ones, ones, None, False, 0.0)


@lru_cache(maxsize=None)
def _photo(name: str, longest: int) -> np.ndarray:
    """A colour scikit-image photograph as float32 HxWx3 in [0, 1], its longer side brought to
    ``longest`` pixels (antialiased), so that warping it costs little."""
    image = _colour_source(name)
    scale = longest / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return np.asarray(image, np.float32) / 255.0


def _ellipse_distance(ys, xs, box: tuple[float, float, float, float]) -> np.ndarray:
    """Approximate signed distance (source pixels, negative inside) to the ellipse inscribed in
    ``box`` = (top, left, bottom, right)."""
    top, left, bottom, right = box
    cy, cx, ry, rx = (top + bottom) / 2, (left + right) / 2, (bottom - top) / 2, (right - left) / 2
    return (np.hypot((ys - cy) / ry, (xs - cx) / rx) - 1) * min(ry, rx)


# Real photographs of objects (CC0, bundled with scikit-image): the photograph, its longer side
# after downsampling, the crop's centre (y, x) and half side at that size, the object's outline as
# ellipses (top, left, bottom, right) in the same pixels, and the colour of the table beneath.
_PHOTO_OBJECTS = {
    "cup": ("coffee", 600, (203.0, 277.0), 197.0,
            ((72.0, 72.0, 398.0, 482.0), (15.0, 170.0, 270.0, 410.0)), (0.42, 0.24, 0.12)),
    "retina": ("retina", 512, (256.0, 256.0), 256.0, ((12.0, 12.0, 500.0, 500.0),), (0.02, 0.02, 0.02)),
}


def _photo_object_scene(category: str, rng: np.random.Generator, size: int) -> _Scene:
    """A photographed object (``_PHOTO_OBJECTS``), warped with the objects' small pose change and
    lit with their brightness change and a soft gradient: the table in the photograph moves with it."""
    from scipy.ndimage import map_coordinates

    name, longest, (cy, cx), half_side, ellipses, table_colour = _PHOTO_OBJECTS[category]
    photo = _photo(name, longest)
    pose = _pose(rng, size)
    u, v, unit = _object_frame(size, pose)
    ys, xs = cy + v * half_side, cx + u * half_side
    image = np.stack([map_coordinates(photo[..., c], [ys, xs], order=1, mode="nearest") for c in range(3)], -1)
    image = image * (pose["gain"] * _light_gradient(pose, u, v))[..., None]
    distance = np.min([_ellipse_distance(ys, xs, box) for box in ellipses], axis=0)
    support = _coverage(distance * unit / half_side).astype(np.float32)
    table = _table(size, table_colour, rng)
    return _Scene(np.clip(image, 0, 1).astype(np.float32), support, support, table.astype(np.float32), True, 0.01)


_SCENES: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "brick": lambda rng, size: _texture_scene("brick", rng, size),
    "grass": lambda rng, size: _texture_scene("grass", rng, size),
    "gravel": lambda rng, size: _texture_scene("gravel", rng, size),
    "nut": _nut_scene,
    "capsule": _capsule_scene,
    "cup": lambda rng, size: _photo_object_scene("cup", rng, size),
    "retina": lambda rng, size: _photo_object_scene("retina", rng, size),
    "coin": _coin_scene,
    "tissue": _tissue_scene,
}


# ----------------------------------------------------------------------------- defects

_SIZE_LEVELS = (0.0, 0.5, 1.0)  # small, medium, large: position inside each kind's size range


def _lerp(low: float, high: float, level: float) -> float:
    return low + (high - low) * level


def _pick_centre(rng: np.random.Generator, scene: _Scene, margin: float, inner: float = 0.98) -> tuple[float, float]:
    """A random point away from the border; on objects, well inside the object."""
    size = scene.support.shape[0]
    allowed = scene.support >= inner
    lo, hi = int(margin), int(size - margin)
    window = np.zeros_like(allowed)
    window[lo:hi, lo:hi] = True
    candidates = np.argwhere(allowed & window)
    if len(candidates) == 0:
        candidates = np.argwhere(allowed) if allowed.any() else np.argwhere(window)
    y, x = candidates[rng.integers(len(candidates))]
    return float(y) + rng.uniform(-0.5, 0.5), float(x) + rng.uniform(-0.5, 0.5)


def _line_target(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Colour of a scratch: a light or a dark mark."""
    if rng.random() < 0.5:
        return np.full_like(image, 0.96)
    return image * 0.12


def _bezier(rng: np.random.Generator, centre: tuple[float, float], length: float, steps: int = 24) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    start = np.asarray(centre) - direction * length / 2
    end = np.asarray(centre) + direction * length / 2
    control = np.asarray(centre) + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, steps)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def _random_walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float, step: float) -> np.ndarray:
    points = [np.asarray(start, np.float64)]
    for _ in range(max(2, int(length / step))):
        angle += rng.normal(0, 0.35)
        points.append(points[-1] + step * np.array([np.sin(angle), np.cos(angle)]))
    return np.asarray(points)


def _match_stats(content: np.ndarray, host: np.ndarray, where: np.ndarray, min_std: float) -> np.ndarray:
    """Give ``content`` (HxW grey) the per-channel mean and std of ``host`` over ``where``."""
    grey = content[where]
    normalised = (content - grey.mean()) / (grey.std() + 1e-6)
    pixels = host[where]
    mean, std = pixels.mean(axis=0), np.maximum(pixels.std(axis=0), min_std)
    return normalised[..., None] * std + mean


# One painter per defect kind (a registry, so a new kind is one function): each paints a defect of
# ``level`` (0 small .. 1 large) on the scene and returns (new content HxWx3, blend weight HxW).
# Sizes are written for 256 px images and scaled by ``px``.
_PAINTERS: dict = {}


def _painter(*kinds: str):
    def register(function):
        for kind in kinds:
            _PAINTERS[kind] = function
        return function
    return register


@_painter("scratch", "faint_scratch")
def _paint_scratch(kind, scene: _Scene, rng, level, category, px):
    """A thin curved line: dark or light (scratch), or of low contrast (faint_scratch)."""
    image, size = scene.image, scene.image.shape[0]
    length = _lerp(0.15, 0.5, level) * size
    centre = _pick_centre(rng, scene, margin=length / 2 if not scene.is_object else 0)
    width = max(1.0, rng.uniform(2.0, 4.0) * px) if kind == "scratch" else max(1.0, rng.uniform(1.5, 2.5) * px)
    weight = _polyline_weight(size, [_bezier(rng, centre, length)], [width])
    strength = 0.8 if kind == "scratch" else rng.uniform(0.2, 0.3)
    return image + strength * (_line_target(rng, image) - image), weight * scene.support


@_painter("crack")
def _paint_crack(kind, scene: _Scene, rng, level, category, px):
    """A dark random walk with one to three branches."""
    image, size = scene.image, scene.image.shape[0]
    length = _lerp(0.15, 0.45, level) * size
    centre = _pick_centre(rng, scene, margin=length / 3 if not scene.is_object else 0)
    angle = rng.uniform(0, 2 * np.pi)
    main = _random_walk(rng, np.asarray(centre), angle, length, step=max(2.0, 6 * px))
    paths, widths = [main], [max(1.0, rng.uniform(1.8, 2.5) * px)]
    for _ in range(rng.integers(1, 4)):
        origin = main[rng.integers(1, len(main) - 1)]
        branch_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
        branch_length = length * rng.uniform(0.2, 0.45)
        paths.append(_random_walk(rng, origin, branch_angle, branch_length, step=max(2.0, 5 * px)))
        widths.append(max(1.0, rng.uniform(1.0, 1.6) * px))
    return image * 0.12, _polyline_weight(size, paths, widths) * scene.support


@_painter("stain")
def _paint_stain(kind, scene: _Scene, rng, level, category, px):
    """A soft-edged blob tinted brown, orange or blue."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.06, 0.16, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    weight = _blob(rng, size, centre, radius, edge_px=rng.uniform(2, 4) * px, wobble=0.35)
    tints = [(0.62, 0.42, 0.24), (0.85, 0.45, 0.18), (0.35, 0.45, 0.80)]
    tint = np.asarray(tints[rng.integers(len(tints))], np.float32) * rng.uniform(0.75, 0.95)
    return image * tint, weight * scene.support


@_painter("hole")
def _paint_hole(kind, scene: _Scene, rng, level, category, px):
    """A bite out of an object's rim (background shows through), or a dark pit in a texture."""
    image, size = scene.image, scene.image.shape[0]
    if scene.is_object:
        radius = _lerp(0.08, 0.15, level) * size
        rim = np.argwhere((scene.outline > 0.3) & (scene.outline < 0.7))
        y, x = rim[rng.integers(len(rim))]
        weight = _blob(rng, size, (float(y), float(x)), radius, edge_px=1.0, wobble=0.3)
        return scene.background, weight * scene.outline
    radius = _lerp(0.03, 0.08, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    weight = _blob(rng, size, centre, radius, edge_px=1.5 * px, wobble=0.3)
    ys, xs = _grid(size)
    depth = np.clip(np.hypot(ys - centre[0], xs - centre[1]) / radius, 0, 1)
    pit = (0.03 + 0.10 * depth)[..., None] * np.ones(3, np.float32) + 0.08 * image
    return pit, weight


@_painter("foreign")
def _paint_foreign(kind, scene: _Scene, rng, level, category, px):
    """A patch of another photo, coloured, pasted with a soft edge."""
    size = scene.image.shape[0]
    radius = _lerp(0.05, 0.12, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    source = _FOREIGN_SOURCE[category]
    content = _colourise(_grey_crop(source, rng, size, crop_fraction=rng.uniform(0.35, 0.6)), source)
    return content, _blob(rng, size, centre, radius, edge_px=1.5 * px, wobble=0.35)


@_painter("shift")
def _paint_shift(kind, scene: _Scene, rng, level, category, px):
    """A large, very soft region of slightly shifted brightness or colour (low contrast)."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.10, 0.20, level) * size
    centre = _pick_centre(rng, scene, margin=radius * 0.6)
    weight = _blob(rng, size, centre, radius, edge_px=rng.uniform(6, 10) * px, wobble=0.2) * scene.support
    delta = np.zeros(3, np.float32)
    if rng.random() < 0.5:
        delta[:] = rng.choice([-1, 1]) * rng.uniform(0.05, 0.09)
    else:
        delta[rng.integers(3)] = rng.choice([-1, 1]) * rng.uniform(0.04, 0.07)
    return image + delta, weight


@_painter("matched_patch")
def _paint_matched_patch(kind, scene: _Scene, rng, level, category, px):
    """Another texture with the surroundings' mean and contrast: visible by structure only."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.08, 0.14, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    weight = _blob(rng, size, centre, radius, edge_px=2.0 * px, wobble=0.3) * scene.support
    where = weight > 0.5
    content = _grey_crop(_MATCHED_SOURCE[category], rng, size, crop_fraction=rng.uniform(0.4, 0.6))
    return _match_stats(content, image, where, min_std=0.03), weight


@_painter("rotated_patch")
def _paint_rotated_patch(kind, scene: _Scene, rng, level, category, px):
    """The image itself rotated inside a disc: same colours and contrast, wrong orientation."""
    from skimage.transform import rotate

    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.08, 0.14, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    angle = rng.choice([-1, 1]) * rng.uniform(60, 180)
    rotated = rotate(image, angle, center=(centre[1], centre[0]), order=1, mode="reflect")
    weight = _blob(rng, size, centre, radius, edge_px=1.5 * px, wobble=0.1) * scene.support
    return rotated.astype(np.float32), weight


@_painter("smudge")
def _paint_smudge(kind, scene: _Scene, rng, level, category, px):
    """A large patchy smear of dirt, brown, grey or blue-grey: low contrast over a wide area."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.12, 0.24, level) * size
    centre = _pick_centre(rng, scene, margin=radius * 0.5)
    outline = _blob(rng, size, centre, radius, edge_px=rng.uniform(4, 8) * px, wobble=0.5)
    patchy = 0.5 + 0.5 * np.clip(_smooth_noise(rng, size, max(2.0, 12 * px)), -1, 1)
    weight = outline * (0.6 + 0.4 * patchy) * scene.support
    # dark grime, grey dust, blue-grey oil, light dust: one of the two farthest from the surface
    dirts = np.asarray([(0.22, 0.17, 0.11), (0.45, 0.44, 0.42), (0.24, 0.27, 0.34), (0.80, 0.78, 0.74)], np.float32)
    host = image[weight > 0.5].mean(axis=0)
    far = np.argsort(-np.abs(dirts - host).sum(axis=1))[:2]
    dirt = dirts[far[rng.integers(2)]]
    return image + rng.uniform(0.25, 0.45) * (dirt - image), weight


@_painter("discolour")
def _paint_discolour(kind, scene: _Scene, rng, level, category, px):
    """The whole object, or a broad soft region of a texture, with one colour channel off."""
    image, size = scene.image, scene.image.shape[0]
    if scene.is_object:
        weight = scene.support.copy()
    else:
        radius = _lerp(0.22, 0.34, level) * size
        weight = _blob(rng, size, _pick_centre(rng, scene, margin=0), radius,
                       edge_px=rng.uniform(8, 14) * px, wobble=0.3)
    gain = np.ones(3, np.float32)
    gain[rng.integers(3)] += rng.choice([-1, 1]) * _lerp(0.12, 0.25, level)
    return image * gain, weight


@_painter("displaced")
def _paint_displaced(kind, scene: _Scene, rng, level, category, px):
    """Objects: a piece of the rim slid along the outline (a gap where it was, an overlap where it
    is); textures: a patch of the texture itself copied from a place nearby, out of phase."""
    image, size = scene.image, scene.image.shape[0]
    if scene.is_object:
        radius = _lerp(0.07, 0.12, level) * size
        rim = np.argwhere((scene.outline > 0.3) & (scene.outline < 0.7))
        y, x = rim[rng.integers(len(rim))]
        centre_y, centre_x = np.argwhere(scene.support > 0.5).mean(axis=0)
        radial = np.array([y - centre_y, x - centre_x], np.float64)
        tangent = np.array([-radial[1], radial[0]]) / max(np.hypot(*radial), 1e-6)
        shift = np.round(tangent * rng.choice([-1, 1]) * _lerp(0.05, 0.09, level) * size).astype(int)
        piece = _blob(rng, size, (float(y), float(x)), radius, edge_px=1.0, wobble=0.25) * scene.outline
        moved_piece = np.roll(piece, tuple(shift), axis=(0, 1))
        moved_image = np.roll(image, tuple(shift), axis=(0, 1))
        content = moved_piece[..., None] * moved_image + (1 - moved_piece[..., None]) * scene.background
        return content, np.maximum(piece, moved_piece)
    radius = _lerp(0.07, 0.13, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    angle = rng.uniform(0, 2 * np.pi)
    distance = rng.uniform(0.1, 0.25) * size
    shift = np.round([distance * np.sin(angle), distance * np.cos(angle)]).astype(int)
    content = np.roll(image, tuple(shift), axis=(0, 1))
    return content, _blob(rng, size, centre, radius, edge_px=1.0, wobble=0.3)


@_painter("pits")
def _paint_pits(kind, scene: _Scene, rng, level, category, px):
    """A cluster of small dark pits, each a tiny wobbly disc."""
    image, size = scene.image, scene.image.shape[0]
    spread = _lerp(0.04, 0.10, level) * size
    centre = np.asarray(_pick_centre(rng, scene, margin=spread))
    weight = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(5, 15)):
        offset = rng.normal(0, spread / 2, 2).clip(-spread, spread)
        pit = _blob(rng, size, tuple(centre + offset), rng.uniform(0.012, 0.025) * size, edge_px=1.0, wobble=0.15)
        np.maximum(weight, pit, out=weight)
    return image * 0.25, weight * scene.support


def _defect(
    kind: str, scene: _Scene, rng: np.random.Generator, level: float, category: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect; returns (new content HxWx3, blend weight HxW). Mask = weight > 0.5."""
    if kind not in _PAINTERS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    return _PAINTERS[kind](kind, scene, rng, level, category, scene.image.shape[0] / 256.0)


# Kinds that need nothing but the picture itself (the others take a second texture or an object's outline).
PAINTABLE_KINDS = ("scratch", "faint_scratch", "crack", "stain", "hole", "shift", "rotated_patch", "smudge",
                   "discolour", "displaced", "pits")


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator, level: float = 0.5,
                 where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One of the built-in painter's defects on any square picture: (defective HxWx3 in [0, 1], mask HxW bool).

    ``image``: HxWx3 float in [0, 1], square; ``kind``: one of :data:`PAINTABLE_KINDS` (painted as on a
    texture: a hole is a dark pit); ``level``: 0 small .. 1 large; ``where``: an optional HxW weight in
    [0, 1] of where the defect may go (1 everywhere by default). The mask is the pixels whose blend weight
    exceeds 0.5, as in the built-in dataset; a defect that left fewer than 4 mask pixels is drawn again.
    """
    if kind not in PAINTABLE_KINDS:
        raise ValueError(f"kind must be one of {PAINTABLE_KINDS}, got {kind!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be a square HxWx3 array, got shape {image.shape}")
    support = np.ones(image.shape[:2], np.float32) if where is None else np.asarray(where, np.float32)
    scene = _Scene(image, support, np.ones_like(support), None, False, 0.0)
    for _ in range(20):
        content, weight = _defect(kind, scene, rng, level, "")
        mask = weight > 0.5
        if mask.sum() >= 4:
            return np.clip(image + weight[..., None] * (content - image), 0.0, 1.0), mask
    raise RuntimeError(f"could not place a visible {kind!r} defect on this {image.shape[0]} px picture")


# ----------------------------------------------------------------------------- files


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _finish(scene_image: np.ndarray, scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    if scene.noise_sigma > 0:
        scene_image = scene_image + rng.normal(0, scene.noise_sigma, scene_image.shape).astype(np.float32)
    return _to_uint8(scene_image)


def _normal_image(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    scene = _SCENES[category](rng, size)
    return _finish(scene.image, scene, rng)


def _defective_image(category: str, kind: str, rng: np.random.Generator, size: int, level: float):
    """A defective image and its mask; redraws the defect if it left no mask pixel (tiny images)."""
    scene = _SCENES[category](rng, size)
    for _ in range(20):
        content, weight = _defect(kind, scene, rng, level, category)
        mask = weight > 0.5
        if mask.sum() >= 4:
            blended = scene.image + weight[..., None] * (content - scene.image)
            return _finish(blended, scene, rng), mask
    raise RuntimeError(f"could not place a visible {kind!r} defect on a {size}px {category!r} image")


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _parameters(
    seed: int, image_size: int, n_train: int, n_test_good: int, n_test_per_defect: int, category: str
) -> dict:
    return {
        "generator": "diffad.data.builtin",
        "version": _GENERATOR_VERSION,
        "category": category,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_per_defect": n_test_per_defect,
        "defect_kinds": list(CATEGORY_DEFECTS[category]),
    }


def _resolve_categories(categories: str | Sequence[str] | None) -> list[str]:
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


def _is_complete(folder: Path, parameters: dict) -> bool:
    manifest = folder / _MANIFEST_NAME
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
        _save_png(array, path)
        files.append(relative)

    for split, count, subfolder in (("train", "n_train", "train/good"), ("test_good", "n_test_good", "test/good")):
        for index in range(parameters[count]):
            rng = _rng(seed, category, _SPLIT_CODES[split], index)
            save(_normal_image(category, rng, size), f"{subfolder}/{index:03d}.png")
    for kind_index, kind in enumerate(parameters["defect_kinds"]):
        for index in range(parameters["n_test_per_defect"]):
            rng = _rng(seed, category, 100 + kind_index, index)
            level = _SIZE_LEVELS[index % len(_SIZE_LEVELS)]
            image, mask = _defective_image(category, kind, rng, size, level)
            save(image, f"test/{kind}/{index:03d}.png")
            save(mask.astype(np.uint8) * 255, f"ground_truth/{kind}/{index:03d}_mask.png")
    (folder / _MANIFEST_NAME).write_text(json.dumps({"parameters": parameters, "files": files}, indent=1))


def is_builtin(root: str | Path, category: str) -> bool:
    """Whether ``<root>/<category>`` was written by :func:`make_builtin_dataset` (not MVTec-AD)."""
    return (Path(root) / category / _MANIFEST_NAME).is_file()


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
    categories = _resolve_categories(categories)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for category in categories:
        parameters = _parameters(
            int(seed), int(image_size), int(n_train), int(n_test_good), int(n_test_per_defect), category
        )
        folder = root / category
        if _is_complete(folder, parameters):
            continue
        if folder.exists() and not (folder / _MANIFEST_NAME).is_file():
            raise FileExistsError(
                f"{folder} exists but was not made by make_builtin_dataset (no {_MANIFEST_NAME}); "
                "move it away or choose another root"
            )
        staging = root / f".{category}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _write_category(staging, category, parameters)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    return root


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
    for category in categories:
        parameters = {"generator": "diffad.data.builtin.make_mvtec_shaped_dataset", "version": _GENERATOR_VERSION,
                      "category": category, "source": _SHAPED_SOURCE[category], "seed": int(seed),
                      "image_size": int(image_size), "n_train": int(n_train), "n_test_good": int(n_test_good),
                      "n_test_per_defect": int(n_test_per_defect)}
        folder = root / category
        manifest = folder / _SHAPED_MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()) == parameters:
            continue
        if folder.exists() and not manifest.is_file():
            raise FileExistsError(f"{folder} exists but was not made by make_mvtec_shaped_dataset; choose another root")
        staging = root / f".{category}.building"
        shutil.rmtree(staging, ignore_errors=True)
        _write_shaped_category(staging, category, parameters)
        (staging / _SHAPED_MANIFEST).write_text(json.dumps(parameters, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    return root


def _write_shaped_category(folder: Path, category: str, parameters: dict) -> None:
    source, size, seed = parameters["source"], parameters["image_size"], parameters["seed"]

    def save(array: np.ndarray, relative: str) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(array, path)

    for split, count, subfolder in (("train", "n_train", "train/good"), ("test_good", "n_test_good", "test/good")):
        for index in range(parameters[count]):
            save(_normal_image(source, _rng(seed, category, _SPLIT_CODES[split], index), size),
                 f"{subfolder}/{index:03d}.png")
    for kind_index, kind in enumerate(MVTEC_DEFECT_KINDS[category]):
        for index in range(parameters["n_test_per_defect"]):
            rng = _rng(seed, category, 100 + kind_index, index)
            image, mask = _defective_image(source, shaped_painter(kind), rng, size,
                                           _SIZE_LEVELS[(index + 2) % len(_SIZE_LEVELS)])
            save(image, f"test/{kind}/{index:03d}.png")
            save(mask.astype(np.uint8) * 255, f"ground_truth/{kind}/{index:03d}_mask.png")
