"""The built-in defect painters: one painter per defect kind, registered with its description, so
that a new kind is one function (:data:`DEFECT_KINDS` is read from the registry).

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
"""

from __future__ import annotations


from typing import Callable

import numpy as np

from .scenes import Scene, blob, colourise, grey_crop, grid, polyline_weight, smooth_noise


LOW_CONTRAST_KINDS = ("faint_scratch", "shift", "matched_patch", "rotated_patch", "smudge", "discolour")
# Where foreign and matched patches come from: another photograph than the category's own (the
# development categories draw on photographs that no test category uses).
_FOREIGN_SOURCE = {"brick": "gravel", "grass": "brick", "gravel": "grass", "nut": "grass", "capsule": "gravel",
                   "cup": "gravel", "retina": "grass", "coin": "moon", "tissue": "camera"}
_MATCHED_SOURCE = {"brick": "gravel", "grass": "gravel", "gravel": "brick", "nut": "gravel", "capsule": "grass",
                   "cup": "grass", "retina": "gravel", "coin": "camera", "tissue": "moon"}


# ----------------------------------------------------------------------------- defects

SIZE_LEVELS = (0.0, 0.5, 1.0)  # small, medium, large: position inside each kind's size range


def _lerp(low: float, high: float, level: float) -> float:
    return low + (high - low) * level


def _pick_centre(rng: np.random.Generator, scene: Scene, margin: float, inner: float = 0.98) -> tuple[float, float]:
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
PAINTERS: dict[str, Callable] = {}
# Every kind's one-line description, in the order of registration: the order of the dataset's defect
# folders and of their random streams (the kinds are read from here, listed nowhere else).
DEFECT_KINDS: dict[str, str] = {}


def painter(**descriptions: str):
    """Register the decorated function as the painter of each kind named, with its description."""
    def register(function):
        for kind, description in descriptions.items():
            PAINTERS[kind] = function
            DEFECT_KINDS[kind] = description
        return function
    return register


@painter(scratch="thin bright or dark curve, 2-4 px wide at 256 px, 0.15-0.5 of the side long (easy)")
def _paint_scratch(kind, scene: Scene, rng, level, category, px):
    """A thin curved line: dark or light (scratch), or of low contrast (faint_scratch)."""
    image, size = scene.image, scene.image.shape[0]
    length = _lerp(0.15, 0.5, level) * size
    centre = _pick_centre(rng, scene, margin=length / 2 if not scene.is_object else 0)
    width = max(1.0, rng.uniform(2.0, 4.0) * px) if kind == "scratch" else max(1.0, rng.uniform(1.5, 2.5) * px)
    weight = polyline_weight(size, [_bezier(rng, centre, length)], [width])
    strength = 0.8 if kind == "scratch" else rng.uniform(0.2, 0.3)
    return image + strength * (_line_target(rng, image) - image), weight * scene.support


@painter(crack="dark thin branching random-walk path, 1-2.5 px wide, 0.15-0.45 of the side (easy-medium)")
def _paint_crack(kind, scene: Scene, rng, level, category, px):
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
    return image * 0.12, polyline_weight(size, paths, widths) * scene.support


@painter(stain="irregular soft blob tinted brown, rust or ink-blue, radius 0.06-0.16 of the side (easy)")
def _paint_stain(kind, scene: Scene, rng, level, category, px):
    """A soft-edged blob tinted brown, orange or blue."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.06, 0.16, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    weight = blob(rng, size, centre, radius, edge_px=rng.uniform(2, 4) * px, wobble=0.35)
    tints = [(0.62, 0.42, 0.24), (0.85, 0.45, 0.18), (0.35, 0.45, 0.80)]
    tint = np.asarray(tints[rng.integers(len(tints))], np.float32) * rng.uniform(0.75, 0.95)
    return image * tint, weight * scene.support


@painter(hole="dark pit on textures (radius 0.03-0.08), a piece missing from the outline on objects (0.08-0.15) (easy)")
def _paint_hole(kind, scene: Scene, rng, level, category, px):
    """A bite out of an object's rim (background shows through), or a dark pit in a texture."""
    image, size = scene.image, scene.image.shape[0]
    if scene.is_object:
        radius = _lerp(0.08, 0.15, level) * size
        rim = np.argwhere((scene.outline > 0.3) & (scene.outline < 0.7))
        y, x = rim[rng.integers(len(rim))]
        weight = blob(rng, size, (float(y), float(x)), radius, edge_px=1.0, wobble=0.3)
        return scene.background, weight * scene.outline
    radius = _lerp(0.03, 0.08, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    weight = blob(rng, size, centre, radius, edge_px=1.5 * px, wobble=0.3)
    ys, xs = grid(size)
    depth = np.clip(np.hypot(ys - centre[0], xs - centre[1]) / radius, 0, 1)
    pit = (0.03 + 0.10 * depth)[..., None] * np.ones(3, np.float32) + 0.08 * image
    return pit, weight


@painter(foreign="patch of another texture in its own colours, radius 0.05-0.12 (easy)")
def _paint_foreign(kind, scene: Scene, rng, level, category, px):
    """A patch of another photo, coloured, pasted with a soft edge."""
    size = scene.image.shape[0]
    radius = _lerp(0.05, 0.12, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    source = _FOREIGN_SOURCE[category]
    content = colourise(grey_crop(source, rng, size, crop_fraction=rng.uniform(0.35, 0.6)), source)
    return content, blob(rng, size, centre, radius, edge_px=1.5 * px, wobble=0.35)


painter(faint_scratch="scratch at 20-30 % strength, thinner (hard, low contrast)")(_paint_scratch)  # its place in the order


@painter(shift="large soft blob, brightness +-0.05-0.09 or one channel +-0.04-0.07 (hard, low contrast)")
def _paint_shift(kind, scene: Scene, rng, level, category, px):
    """A large, very soft region of slightly shifted brightness or colour (low contrast)."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.10, 0.20, level) * size
    centre = _pick_centre(rng, scene, margin=radius * 0.6)
    weight = blob(rng, size, centre, radius, edge_px=rng.uniform(6, 10) * px, wobble=0.2) * scene.support
    delta = np.zeros(3, np.float32)
    if rng.random() < 0.5:
        delta[:] = rng.choice([-1, 1]) * rng.uniform(0.05, 0.09)
    else:
        delta[rng.integers(3)] = rng.choice([-1, 1]) * rng.uniform(0.04, 0.07)
    return image + delta, weight


@painter(matched_patch="patch of another texture matched to the local mean and contrast (hard)")
def _paint_matched_patch(kind, scene: Scene, rng, level, category, px):
    """Another texture with the surroundings' mean and contrast: visible by structure only."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.08, 0.14, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    weight = blob(rng, size, centre, radius, edge_px=2.0 * px, wobble=0.3) * scene.support
    where = weight > 0.5
    content = grey_crop(_MATCHED_SOURCE[category], rng, size, crop_fraction=rng.uniform(0.4, 0.6))
    return _match_stats(content, image, where, min_std=0.03), weight


@painter(rotated_patch="disc of the image rotated by 60-180 degrees about its centre (hard)")
def _paint_rotated_patch(kind, scene: Scene, rng, level, category, px):
    """The image itself rotated inside a disc: same colours and contrast, wrong orientation."""
    from skimage.transform import rotate

    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.08, 0.14, level) * size
    centre = _pick_centre(rng, scene, margin=radius)
    angle = rng.choice([-1, 1]) * rng.uniform(60, 180)
    rotated = rotate(image, angle, center=(centre[1], centre[0]), order=1, mode="reflect")
    weight = blob(rng, size, centre, radius, edge_px=1.5 * px, wobble=0.1) * scene.support
    return rotated.astype(np.float32), weight


@painter(smudge="large irregular patchy smear of dirt, radius 0.12-0.24, 15-45 % of the way to its colour (hard)")
def _paint_smudge(kind, scene: Scene, rng, level, category, px):
    """A large patchy smear of dirt, brown, grey or blue-grey: low contrast over a wide area."""
    image, size = scene.image, scene.image.shape[0]
    radius = _lerp(0.12, 0.24, level) * size
    centre = _pick_centre(rng, scene, margin=radius * 0.5)
    outline = blob(rng, size, centre, radius, edge_px=rng.uniform(4, 8) * px, wobble=0.5)
    patchy = 0.5 + 0.5 * np.clip(smooth_noise(rng, size, max(2.0, 12 * px)), -1, 1)
    weight = outline * (0.6 + 0.4 * patchy) * scene.support
    # dark grime, grey dust, blue-grey oil, light dust: one of the two farthest from the surface
    dirts = np.asarray([(0.22, 0.17, 0.11), (0.45, 0.44, 0.42), (0.24, 0.27, 0.34), (0.80, 0.78, 0.74)], np.float32)
    host = image[weight > 0.5].mean(axis=0)
    far = np.argsort(-np.abs(dirts - host).sum(axis=1))[:2]
    dirt = dirts[far[rng.integers(2)]]
    return image + rng.uniform(0.25, 0.45) * (dirt - image), weight


@painter(discolour="the whole object, or a broad soft region of texture, with one channel off by 12-25 % (hard)")
def _paint_discolour(kind, scene: Scene, rng, level, category, px):
    """The whole object, or a broad soft region of a texture, with one colour channel off."""
    image, size = scene.image, scene.image.shape[0]
    if scene.is_object:
        weight = scene.support.copy()
    else:
        radius = _lerp(0.22, 0.34, level) * size
        weight = blob(rng, size, _pick_centre(rng, scene, margin=0), radius,
                       edge_px=rng.uniform(8, 14) * px, wobble=0.3)
    gain = np.ones(3, np.float32)
    gain[rng.integers(3)] += rng.choice([-1, 1]) * _lerp(0.12, 0.25, level)
    return image * gain, weight


@painter(displaced="objects: a piece of the rim slid along the outline; textures: a patch copied out of phase (medium)")
def _paint_displaced(kind, scene: Scene, rng, level, category, px):
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
        piece = blob(rng, size, (float(y), float(x)), radius, edge_px=1.0, wobble=0.25) * scene.outline
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
    return content, blob(rng, size, centre, radius, edge_px=1.0, wobble=0.3)


@painter(pits="cluster of 5-14 small dark pits, radius 0.012-0.025, within 0.04-0.1 of a centre (medium)")
def _paint_pits(kind, scene: Scene, rng, level, category, px):
    """A cluster of small dark pits, each a tiny wobbly disc."""
    image, size = scene.image, scene.image.shape[0]
    spread = _lerp(0.04, 0.10, level) * size
    centre = np.asarray(_pick_centre(rng, scene, margin=spread))
    weight = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(5, 15)):
        offset = rng.normal(0, spread / 2, 2).clip(-spread, spread)
        pit = blob(rng, size, tuple(centre + offset), rng.uniform(0.012, 0.025) * size, edge_px=1.0, wobble=0.15)
        np.maximum(weight, pit, out=weight)
    return image * 0.25, weight * scene.support


def draw_defect(
    kind: str, scene: Scene, rng: np.random.Generator, level: float, category: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect; returns (new content HxWx3, blend weight HxW). Mask = weight > 0.5."""
    if kind not in PAINTERS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    return PAINTERS[kind](kind, scene, rng, level, category, scene.image.shape[0] / 256.0)


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
    scene = Scene(image, support, np.ones_like(support), None, False, 0.0)
    for _ in range(20):
        content, weight = draw_defect(kind, scene, rng, level, "")
        mask = weight > 0.5
        if mask.sum() >= 4:
            return np.clip(image + weight[..., None] * (content - image), 0.0, 1.0), mask
    raise RuntimeError(f"could not place a visible {kind!r} defect on this {image.shape[0]} px picture")
