"""A plain folder of photos as a category: one more way into the same pipeline as MVTec-AD.

A user who photographs twenty good parts has no MVTec-AD layout, no masks and no defects. Here a
folder of normal images is a category::

    <images>/*.jpg                      normal images (any size, RGB or grey, PNG/JPEG/BMP/TIFF)

and, optionally, a folder of test images, labelled or not, with or without masks::

    <test>/good/*.jpg                   normal test images
    <test>/<defect>/*.jpg               defective test images, one folder per kind
    <test>/ground_truth/<defect>/<stem>_mask.png    masks (or <stem>.png; nonzero = defect);
                                        a ``ground_truth`` folder beside ``<test>`` (MVTec-AD's
                                        place) or a ``masks=`` folder of the same shape works too
    <test>/*.jpg                        unlabelled test images (no subfolders): predict only

:class:`ImageFolder` reads such folders and yields exactly the items :class:`~diffad.data.MVTecAD`
yields (``image`` 3xHxW in [0, 1], ``mask``, ``label``, ``defect_type``, ``path``), through the
same image conversion (:func:`diffad.data.mvtec._image_array`) and mask rule
(:func:`diffad.data.mvtec.downsample_mask`); ``"train"`` and ``"val"`` are the same seeded
carve-out of the normal images (:meth:`MVTecAD.val_indices`, the preset's ``val_fraction`` and
``seed``). :func:`diffad.train.fit` takes an ImageFolder wherever it takes a data root.

What a phone folder holds is checked before anything is written, each problem one sentence:
a missing or empty folder, too few images (:data:`MIN_IMAGES`), a file that cannot be read
(named), a folder of masks instead of photos. Files that are not images (by their suffix, or
hidden) are skipped and listed; photos are turned upright by their EXIF orientation
(:func:`PIL.ImageOps.exif_transpose`), as a phone's gallery shows them; images of several sizes
are resized to the model's size, and the reader says so (:meth:`ImageFolder.size_note`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .mvtec import GOOD, IMAGE_EXTENSIONS, MVTecAD, Sample, _image_array, _normalise_size, _read_pil, downsample_mask, sample_item

__all__ = ["MIN_IMAGES", "ImageFolder", "FolderDataset", "read_image", "list_images"]

# Fewer normal images than this train nothing useful and leave no image to set a threshold on.
MIN_IMAGES = 8
MASK_FOLDER = "ground_truth"
# EXIF orientations that swap width and height (rotations by 90 or 270 degrees, with or without a flip).
_TRANSPOSING = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The image files directly in ``folder`` (by suffix, sorted by name) and the other files."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return [p for p in files if _is_image_name(p)], [p for p in files if not _is_image_name(p)]


def read_image(path: str | Path, draft: int | None = None) -> Image.Image:
    """An image file, upright by its EXIF orientation; a file PIL cannot read is a ValueError naming it.

    ``draft``: a JPEG is decoded at the smallest power-of-two reduction still at least ``draft``
    pixels on each side (PIL's ``draft``): a 12-megapixel phone photo read for a 64 px model decodes
    in a fraction of the time, and the bilinear resize that follows sees as many pixels as it needs.
    """
    path = Path(path)
    try:
        with Image.open(path) as handle:
            if draft is not None and handle.format == "JPEG":
                handle.draft("RGB", (draft, draft))
            handle.load()
            picture = ImageOps.exif_transpose(handle)
            return picture if picture is not handle else handle.copy()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}; replace or remove "
                         f"this file") from error


def _upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the photo is shown, from its header alone; an unreadable file is named."""
    try:
        with Image.open(path) as handle:
            width, height = handle.size
            if handle.getexif().get(_ORIENTATION_TAG) in _TRANSPOSING:
                width, height = height, width
            return width, height
    except Exception as error:
        raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}; replace or remove "
                         f"this file") from error


def _looks_like_a_mask(path: Path) -> bool:
    """A single-channel picture with at most two values (0 and one other): a ground-truth mask."""
    picture = _read_pil(path, "image")
    if picture.mode not in ("1", "L", "P", "I;16", "I"):
        return False
    values = np.unique(np.asarray(picture))
    return len(values) <= 2 and values.min() == 0


class FolderDataset(Dataset):
    """A list of samples read like :class:`~diffad.data.MVTecAD` reads its own: the same dict items."""

    def __init__(self, samples: Sequence[Sample], image_size: int | tuple[int, int] | None = 256,
                 image_resize: str = "bilinear"):
        self.samples = list(samples)
        self.image_size = _normalise_size(image_size)
        self.image_resize = image_resize

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        draft = None if self.image_size is None else max(self.image_size)
        picture = read_image(sample.path, draft=draft)
        image = _image_array(picture, self.image_size, self.image_resize)
        height, width = image.shape[:2]
        mask = np.zeros((height, width), dtype=np.float32)
        if sample.mask_path is not None:
            mask_picture = _read_pil(sample.mask_path, "mask")
            width_height = _upright_size(sample.path)  # the photo's own size, before any draft reduction
            if mask_picture.size != width_height:
                raise ValueError(f"mask {sample.mask_path} is {mask_picture.size[0]}x{mask_picture.size[1]} but "
                                 f"image {sample.path} is {width_height[0]}x{width_height[1]} (width x height)")
            values = np.asarray(mask_picture)
            mask = downsample_mask((values != 0).any(axis=2) if values.ndim == 3 else values != 0, (height, width))
        return sample_item(image, mask, sample)

    def stack(self, progress: bool = False):
        """All items as tensors: images (N, 3, H, W), masks (N, 1, H, W), labels (N,)."""
        from .mvtec import load_all

        return load_all(self, progress=progress)


class ImageFolder:
    """A folder of normal photos as one category, with an optional (labelled) test folder.

    Args:
        images: the folder of normal images.
        test: an optional folder of test images: ``good/`` and one subfolder per defect kind
            (labelled), or images directly inside (unlabelled).
        masks: an optional folder of masks, ``<defect>/<stem>_mask.png`` or ``<defect>/<stem>.png``;
            default: ``<test>/ground_truth`` or a ``ground_truth`` beside ``<test>``, when present.
        name: the category's name (default: the folder's name, or its parent's when the folder is
            called ``good``, ``train`` or ``normal``).
        min_images: fewer normal images than this are refused.
        report: where the reader's notes go (skipped files, mixed sizes); ``print`` by default.

    Every check runs here, before anything is trained or written.
    """

    GENERIC_NAMES = ("good", "train", "normal", "images", "ok")

    def __init__(self, images: str | Path, test: str | Path | None = None, masks: str | Path | None = None,
                 name: str | None = None, min_images: int = MIN_IMAGES,
                 report: Callable[[str], None] | None = print):
        self.folder = Path(images)
        self.report = report or (lambda message: None)
        self.notes: list[str] = []
        self.paths = self._scan(self.folder, "normal images", min_images)
        self.sizes = {path: _upright_size(path) for path in self.paths}
        self._refuse_masks()
        self.name = name or self._default_name()
        self.test_folder = None if test is None else Path(test)
        self.test_samples = [] if test is None else self._test_samples(Path(test), masks)

    # ------------------------------------------------------------------ checks

    def _note(self, message: str) -> None:
        self.notes.append(message)
        self.report(message)

    def _scan(self, folder: Path, what: str, min_images: int) -> list[Path]:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder: pass the folder that holds the {what}")
        paths, others = list_images(folder)
        if others:
            shown = ", ".join(p.name for p in others[:5]) + (", ..." if len(others) > 5 else "")
            self._note(f"skipped {len(others)} file{'s' if len(others) > 1 else ''} in {folder} that "
                       f"{'are' if len(others) > 1 else 'is'} not an image ({shown}); images are "
                       f"{', '.join(IMAGE_EXTENSIONS)}")
        if not paths:
            inside = [p.name for p in folder.iterdir() if p.is_dir()]
            hint = f"; it holds folders ({', '.join(sorted(inside)[:5])}): pass the one with the photos" if inside else ""
            raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}){hint}")
        if len(paths) < min_images:
            held = max(1, round(0.25 * min_images))
            raise ValueError(
                f"{folder} holds {len(paths)} image{'s' if len(paths) > 1 else ''}; training needs at least "
                f"{min_images} photos of good parts ({min_images - held} to learn from, {held} held out to set "
                f"the threshold): add {min_images - len(paths)} more (20 or more work better)")
        return paths

    def _refuse_masks(self) -> None:
        """A folder whose images are all black-and-white masks (``*_mask`` names, or two values only)."""
        named = all(p.stem.lower().endswith("_mask") for p in self.paths)
        if named or all(_looks_like_a_mask(p) for p in self.paths[:MIN_IMAGES]):
            raise ValueError(
                f"{self.folder} looks like a folder of masks (its images are black and white with two values"
                f"{', named *_mask' if named else ''}), not of photos: pass the folder of photos of good parts; "
                f"masks belong beside labelled test images (<test>/ground_truth/<defect>/)")

    def _default_name(self) -> str:
        folder = self.folder.resolve()
        return folder.parent.name if folder.name.lower() in self.GENERIC_NAMES else folder.name

    def size_note(self, image_size: int) -> str | None:
        """The note that images of several sizes (or not square) are resized to the model's size; None if not."""
        sizes = sorted(set(self.sizes.values()))
        square = all(w == h for w, h in sizes)
        if len(sizes) == 1 and square:
            return None
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        what = f"come in {len(sizes)} sizes ({shown})" if len(sizes) > 1 else f"are {shown}"
        message = (f"the {len(self.paths)} images in {self.folder.name}/ {what}; each is resized to "
                   f"{image_size}x{image_size}")
        return message + ("" if square else " (a photo that is not square is squeezed: crop them alike for the "
                                            "best results)")

    # ------------------------------------------------------------------ test folder

    def _mask_folder(self, test: Path, masks: str | Path | None) -> Path | None:
        if masks is not None:
            if not Path(masks).is_dir():
                raise FileNotFoundError(f"mask folder {masks} does not exist")
            return Path(masks)
        for candidate in (test / MASK_FOLDER, test.parent / MASK_FOLDER):
            if candidate.is_dir():
                return candidate
        return None

    def _test_samples(self, test: Path, masks) -> list[Sample]:
        if not test.is_dir():
            raise FileNotFoundError(f"test folder {test} does not exist")
        folders = sorted((p for p in test.iterdir() if p.is_dir() and p.name != MASK_FOLDER),
                         key=lambda p: (p.name != GOOD, p.name))
        if not folders:  # unlabelled: images directly inside
            return [Sample(p, None, -1, "unknown") for p in self._scan(test, "test images", 1)]
        if GOOD not in [p.name for p in folders]:
            raise ValueError(f"labelled test folder {test} has no {GOOD}/ subfolder of normal test images "
                             f"(its subfolders: {', '.join(p.name for p in folders)})")
        mask_root = self._mask_folder(test, masks)
        samples = []
        for folder in folders:
            for path in self._scan(folder, "test images", 1):
                mask = None
                if folder.name != GOOD and mask_root is not None:
                    found = [m for m in (mask_root / folder.name / f"{path.stem}_mask.png",
                                         mask_root / folder.name / f"{path.stem}.png") if m.is_file()]
                    mask = found[0] if found else None
                samples.append(Sample(path, mask, int(folder.name != GOOD), folder.name))
        return samples

    @property
    def labelled(self) -> bool:
        return bool(self.test_samples) and all(s.label >= 0 for s in self.test_samples)

    @property
    def has_masks(self) -> bool:
        """Every defective test image has a mask (pixel metrics need them all)."""
        defective = [s for s in self.test_samples if s.label == 1]
        return self.labelled and bool(defective) and all(s.mask_path is not None for s in defective)

    # ------------------------------------------------------------------ splits

    def dataset(self, category: str, split: str, preset) -> FolderDataset:
        """The ``split`` of this folder at ``preset``'s size, as :class:`~diffad.data.MVTecAD` would give it.

        ``"train"`` and ``"val"``: the seeded carve-out of ``preset.val_fraction`` of the normal images
        (:meth:`MVTecAD.val_indices`); ``"test"``: the test folder. (``category`` must be :attr:`name`:
        :func:`diffad.train.fit` passes it.)
        """
        if category != self.name:
            raise ValueError(f"this folder is the category {self.name!r}, not {category!r}")
        if split == "test":
            if not self.test_samples:
                raise ValueError(f"no test folder was given for {self.folder}")
            samples = self.test_samples
        elif split in ("train", "val"):
            held = set(MVTecAD.val_indices(len(self.paths), preset.val_fraction, preset.seed))
            samples = [Sample(p, None, 0, GOOD) for i, p in enumerate(self.paths) if (i in held) == (split == "val")]
        else:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return FolderDataset(samples, preset.image_size, preset.image_resize)

    def __repr__(self) -> str:
        test = "" if not self.test_samples else (
            f", test={len(self.test_samples)} ({'labelled' if self.labelled else 'unlabelled'}"
            f"{', masks' if self.has_masks else ''})")
        return f"ImageFolder({str(self.folder)!r}, name={self.name!r}, images={len(self.paths)}{test})"
