"""Data for diffad: the MVTec-AD reader, its download, and an offline built-in dataset.

* :class:`MVTecAD` reads one category of any dataset in the MVTec-AD folder layout and
  returns dicts with ``image`` (3xHxW in [0, 1]), ``mask`` (1xHxW, {0, 1}), ``label``,
  ``defect_type`` and ``path``; ``split`` is ``"train"``, ``"val"`` (a seeded carve-out of
  the normal training images) or ``"test"``. :func:`load_all` / ``MVTecAD.stack`` read a
  small split into tensors.
* :func:`download_mvtec` fetches the official 5 GB archive (resumable, verified) and
  extracts the categories asked for.
* :func:`make_builtin_dataset` (:mod:`~diffad.data.builtin`, the writer, drawing the scenes of
  :mod:`~diffad.data.scenes` and the defects of :mod:`~diffad.data.defects`) writes a small
  dataset in the same layout offline, in seconds: three textures from scikit-image's CC0 photographs (brick, grass, gravel), two
  drawn objects (nut, capsule) and two photographed ones (cup, retina), each with thirteen
  defect kinds, six of them low-contrast.
* :func:`make_development_dataset` writes the development categories (a photographed coin, a
  tissue texture: other photographs, another seed) on which settings are chosen.
* :func:`make_mvtec_shaped_dataset` writes a folder shaped exactly like MVTec-AD (its 15 category
  names, each with its real defect folders), drawn by the built-in painter and shrunk only in
  size: the ``paper`` and ``authors`` presets run on it without MVTec-AD (the tests do).
* :func:`make_crosscheck_dataset` writes the same categories (the same training images) with
  new normal test images and six defect kinds of a second, independent painter: results on
  defects that no setting was chosen on.
* :class:`ImageFolder` reads a plain folder of photos (any size, EXIF-upright, checked) as one
  category, with optional labelled test images and masks, yielding the items MVTecAD yields
  (:mod:`diffad.data.folder`); :func:`make_photo_folder` writes one, photos of the rocket of
  ``skimage.data.rocket()`` (:mod:`diffad.data.photos`, chapter 15).
* :func:`to_diffusion_range` / :func:`from_diffusion_range`: the explicit [0, 1] <-> [-1, 1]
  conversion for the diffusion model.

This package imports nothing of diffad except the generic :mod:`diffad.download`.
"""

from .builtin import (
    BUILTIN_CATEGORIES,
    BUILTIN_OBJECTS,
    BUILTIN_TEXTURES,
    DEVELOPMENT_CATEGORIES,
    MVTEC_DEFECT_KINDS,
    is_builtin,
    make_builtin_dataset,
    make_development_dataset,
    make_mvtec_shaped_dataset,
)
from .crosscheck import CROSSCHECK_KINDS, make_crosscheck_dataset
from .defects import DEFECT_KINDS, LOW_CONTRAST_KINDS, PAINTABLE_KINDS, paint_defect
from .folder import ImageFolder
from .photos import make_photo_folder
from .download import MVTEC_SHA256, MVTEC_SIZE, MVTEC_URL, download_mvtec
from .mvtec import (
    MVTEC_CATEGORIES,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    MVTecAD,
    Sample,
    list_categories,
    load_all,
)
from .transforms import from_diffusion_range, to_diffusion_range

__all__ = [
    "BUILTIN_CATEGORIES",
    "BUILTIN_OBJECTS",
    "BUILTIN_TEXTURES",
    "CROSSCHECK_KINDS",
    "DEFECT_KINDS",
    "DEVELOPMENT_CATEGORIES",
    "LOW_CONTRAST_KINDS",
    "MVTEC_CATEGORIES",
    "MVTEC_DEFECT_KINDS",
    "MVTEC_SHA256",
    "MVTEC_SIZE",
    "MVTEC_URL",
    "ImageFolder",
    "MVTecAD",
    "OBJECT_CATEGORIES",
    "PAINTABLE_KINDS",
    "Sample",
    "TEXTURE_CATEGORIES",
    "download_mvtec",
    "from_diffusion_range",
    "is_builtin",
    "list_categories",
    "load_all",
    "make_builtin_dataset",
    "make_crosscheck_dataset",
    "make_development_dataset",
    "make_mvtec_shaped_dataset",
    "paint_defect",
    "make_photo_folder",
    "to_diffusion_range",
]
