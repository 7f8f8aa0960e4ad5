"""The built-in categories' scenes: how a normal image of each is drawn, and the drawing primitives
the defect painters (:mod:`diffad.data.defects`) and the cross-check painter share.

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
photographs that no test category uses, for choosing settings (chapter 7b):

* ``coin``   -- a real photographed coin (the helmeted head of ``skimage.data.coins()``, CC0),
  warped with the objects' pose and lighting change onto a dark table, warm-tinted;
* ``tissue`` -- random crops (0.4 of the side) of ``skimage.data.immunohistochemistry()``
  (CC0), a real colour texture with large normal variation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image


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


@lru_cache(maxsize=None)
def texture_source(name: str) -> Image.Image:
    """The 512x512 grey scikit-image photograph as a float ('F') PIL image in [0, 1]."""
    import skimage.data

    grey = getattr(skimage.data, name)().astype(np.float32) / 255.0
    return Image.fromarray(grey)  # float32 -> mode "F"


def grey_crop(name: str, rng: np.random.Generator, size: int, crop_fraction: float = 0.5) -> np.ndarray:
    """A random (crop, flip) of a texture photograph, resized to size x size, grey in [0, 1]."""
    source = texture_source(name)
    crop = crop_fraction * source.width
    x0 = rng.uniform(0, source.width - crop)
    y0 = rng.uniform(0, source.height - crop)
    grey = np.asarray(source.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop)))
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def colourise(grey: np.ndarray, palette: str) -> np.ndarray:
    dark, light = (np.asarray(c, np.float32) for c in _PALETTES[palette])
    return dark + (light - dark) * grey[..., None]


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


def _coverage(signed_distance_px: np.ndarray) -> np.ndarray:
    """Antialiased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - signed_distance_px, 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
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


def blob(
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
    ys, xs = grid(size)
    dy, dx = ys - centre[0], xs - centre[1]
    angle = np.arctan2(dy, dx)
    outline = np.ones_like(angle)
    for harmonic in range(2, 6):
        outline += wobble / harmonic * rng.uniform(-1, 1) * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
    distance = np.hypot(dy, dx) - radius * outline
    return np.clip(0.5 - distance / max(edge_px, 1e-3), 0.0, 1.0)


def polyline_weight(size: int, paths: Sequence[np.ndarray], widths: Sequence[float]) -> np.ndarray:
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
class Scene:
    """A rendered normal image and what the defect painters need to know about it."""

    image: np.ndarray  # HxWx3 float32 in [0, 1]
    support: np.ndarray  # HxW weight where defects may go (1 on textures, object coverage on objects)
    outline: np.ndarray  # HxW coverage of the object's outer silhouette, bore included (1 on textures)
    background: np.ndarray | None  # the empty, unshadowed table (objects only), for missing-part holes
    is_object: bool
    noise_sigma: float  # sensor noise added after the defect, so defects do not change noise statistics


def _texture_scene(category: str, rng: np.random.Generator, size: int) -> Scene:
    grey = grey_crop(category, rng, size)
    mean = float(grey.mean())
    grey = (grey - mean) * rng.uniform(0.93, 1.07) + mean + rng.uniform(-0.03, 0.03)
    image = colourise(np.clip(grey, 0, 1), category)
    ones = np.ones((size, size), np.float32)
    return Scene(image, ones, ones, None, False, 0.0)


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
    ys, xs = grid(size)
    unit = size / 2 * pose["scale"]
    dy, dx = (ys - pose["cy"]) / unit, (xs - pose["cx"]) / unit
    c, s = np.cos(pose["angle"]), np.sin(pose["angle"])
    return c * dx + s * dy, -s * dx + c * dy, unit


def _table(size: int, colour: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    ys, xs = grid(size)
    r2 = ((ys - size / 2) ** 2 + (xs - size / 2) ** 2) / (size / 2) ** 2
    shade = 1.0 - 0.06 * r2 + 0.015 * smooth_noise(rng, size, size / 16)
    return np.asarray(colour, np.float32) * shade[..., None]


def _nut_scene(rng: np.random.Generator, size: int) -> Scene:
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
    face_shade = 0.56 + 0.07 * gradient + 0.012 * np.sin(radius * unit * 0.9) + 0.012 * smooth_noise(rng, size, 1.2)
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
    return Scene(
        image.astype(np.float32),
        support.astype(np.float32),
        hexagon.astype(np.float32),
        lit_table.astype(np.float32),  # where a piece is missing, its shadow is missing too
        True,
        0.01,
    )


def _capsule_scene(rng: np.random.Generator, size: int) -> Scene:
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
    colour = colour * (1 + 0.01 * smooth_noise(rng, size, 1.5))[..., None]

    lit_table = _table(size, (0.34, 0.37, 0.42), rng)
    shadow_distance = np.hypot(u - 0.05 * np.cos(light + np.pi) - along, v - 0.05 * np.sin(light + np.pi)) - radius
    table = lit_table * (1 - 0.45 * np.clip(0.5 - shadow_distance / 0.07, 0, 1))[..., None]
    image = body[..., None] * colour + (1 - body[..., None]) * table
    body = body.astype(np.float32)
    return Scene(np.clip(image, 0, 1).astype(np.float32), body, body, lit_table.astype(np.float32), True, 0.01)


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


def _coin_scene(rng: np.random.Generator, size: int) -> Scene:
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
    coin = colourise(np.clip(metal, 0, 1), "coin")
    lit_table = _table(size, (0.20, 0.21, 0.23), rng)
    shadow = np.clip(0.5 - (np.hypot(u + 0.03 * np.cos(light), v + 0.03 * np.sin(light)) - coin_radius) / 0.06, 0, 1)
    table = lit_table * (1 - 0.4 * shadow)[..., None]
    image = coverage[..., None] * coin + (1 - coverage[..., None]) * table
    coverage = coverage.astype(np.float32)
    return Scene(np.clip(image, 0, 1).astype(np.float32), coverage, coverage, lit_table.astype(np.float32), True, 0.01)


@lru_cache(maxsize=None)
def _colour_source(name: str) -> Image.Image:
    """A colour scikit-image photograph as an RGB PIL image."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def _tissue_scene(rng: np.random.Generator, size: int) -> Scene:
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
    return Scene(np.clip(image, 0, 1).astype(np.float32), ones, ones, None, False, 0.0)


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


def _photo_object_scene(category: str, rng: np.random.Generator, size: int) -> Scene:
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
    return Scene(np.clip(image, 0, 1).astype(np.float32), support, support, table.astype(np.float32), True, 0.01)


SCENES: dict[str, Callable[[np.random.Generator, int], Scene]] = {
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


# ----------------------------------------------------------------------------- files


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def finish(scene_image: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    if scene.noise_sigma > 0:
        scene_image = scene_image + rng.normal(0, scene.noise_sigma, scene_image.shape).astype(np.float32)
    return to_uint8(scene_image)
