"""Reader for datasets in the MVTec-AD folder layout (the real one and the built-in one).

Layout, per category (any folder name works, not only the 15 official ones)::

    <root>/<category>/train/good/*.png                       normal training images
    <root>/<category>/test/good/*.png                        normal test images (no masks)
    <root>/<category>/test/<defect>/<name>.png               defective test images
    <root>/<category>/ground_truth/<defect>/<name>_mask.png  their masks (nonzero = defect)

Splits: ``"test"`` is the official test set (good images first, then each defect type in
name order). ``"val"`` is a seeded random fraction ``val_fraction`` of the normal *training*
images, carved out to choose thresholds or normalisation statistics without touching the test
set; ``"train"`` is the rest. The carve-out is deterministic given ``seed`` and holds at least
one image when ``val_fraction > 0`` and there are at least two training images (at most all
but one). ``val_fraction=0`` gives all training images to ``"train"``.

Each item is a dict:

* ``image``: float32 tensor 3xHxW in [0, 1]. Grayscale images are repeated to 3 channels,
  an alpha channel is dropped (not composited), 16-bit images are scaled by 1/65535.
  Resizing uses PIL's bilinear filter, which widens its support when shrinking, i.e. it
  antialiases like ``torchvision.transforms.Resize(antialias=True)``.
* ``mask``: float32 tensor 1xHxW with values {0, 1}: any nonzero mask pixel (in any channel)
  is defect, and after resizing a pixel is defect when any part of its area is
  (:func:`downsample_mask`), so a thin crack stays one connected region; all zeros for good
  images. ``mask_rule="authors"`` reads masks as the authors' code does (:func:`authors_mask`).
* ``label``: int, 0 good, 1 defective. ``defect_type``: str, ``"good"`` for normal images.
* ``path``: str, the image file.

The diffusion model wants [-1, 1]: use :func:`diffad.data.to_diffusion_range` explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffad.presets import IMAGE_RESIZES, MASK_RULES

__all__ = [
    "MVTEC_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "OBJECT_CATEGORIES",
    "IMAGE_EXTENSIONS",
    "MVTecAD",
    "Sample",
    "list_categories",
    "load_all",
]

TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood")
OBJECT_CATEGORIES = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)
MVTEC_CATEGORIES = tuple(sorted(TEXTURE_CATEGORIES + OBJECT_CATEGORIES))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
GOOD = "good"


class Sample(NamedTuple):
    """One entry of a split: where the image (and mask) live and what it is."""

    path: Path
    mask_path: Path | None
    label: int
    defect_type: str


def _root_help(root: Path) -> str:
    return (
        f"dataset root {root} does not exist; download MVTec-AD with "
        f"diffad.data.download_mvtec({str(root)!r}) or build the offline dataset with "
        f"diffad.data.make_builtin_dataset({str(root)!r})"
    )


def list_categories(root: str | Path) -> list[str]:
    """Names of the category folders under ``root`` (those with a ``train`` or ``test`` folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(_root_help(root))
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and ((p / "train").is_dir() or (p / "test").is_dir())
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _normalise_size(image_size) -> tuple[int, int] | None:
    """``int`` -> square, ``(height, width)`` as is, ``None`` -> keep each image's size."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        return int(image_size), int(image_size)
    if (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(f"image_size must be a positive int, a (height, width) pair or None, got {image_size!r}")


def _read_pil(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from error


def authors_resize(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize as the authors' ``center_crop_arr`` (``guided_diffusion/image_datasets.py``) does for
    square images: halve with a box filter while at least twice the size, then bicubic to ``size``
    = (height, width)."""
    height, width = size
    while min(picture.size) >= 2 * min(height, width):
        picture = picture.resize(tuple(x // 2 for x in picture.size), resample=Image.Resampling.BOX)
    return picture.resize((width, height), resample=Image.Resampling.BICUBIC)


def downsample_mask(binary: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask at ``size`` = (height, width): a pixel is defect when any part of its area is.

    Nearest-neighbour resizing would keep one source pixel in every k x k block, so a crack one
    pixel wide at 256 px breaks into separate pieces at 64 px, and PRO, which weighs every
    connected region alike, counts each piece as a defect of its own (chapter 9 measures it).
    Area coverage (a box filter, then > 0) keeps thin defects connected, at the price of
    widening their edges by less than one output pixel. (H, W) float32 {0, 1}.
    """
    height, width = size
    if binary.shape == (height, width):
        return binary.astype(np.float32)
    coverage = Image.fromarray(binary.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BOX)
    return (np.asarray(coverage) > 1e-6).astype(np.float32)


def authors_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as the authors' code reads it: resized like their images
    (:func:`authors_resize`), and only pixels equal to 255 kept (``(gt / 255).long()`` in
    ``scripts/image_anomaly.py``): edges and thin defects shrink or vanish. (H, W) float32 {0, 1}."""
    return (np.asarray(authors_resize(mask.convert("L"), size)) == 255).astype(np.float32)


def _image_array(image: Image.Image, size: tuple[int, int] | None, resize: str = "bilinear") -> np.ndarray:
    """HxWx3 float32 in [0, 1], resized to ``size`` = (height, width): antialiased bilinear, or
    ``resize="authors"`` (:func:`authors_resize`, on 8-bit RGB as their code reads it)."""
    if resize == "authors" and size is not None:
        image = authors_resize(image.convert("RGB"), size)
    target = None if size is None else (size[1], size[0])
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        scale = 1.0 if image.mode == "F" else 65535.0
        grey = Image.fromarray((np.asarray(image, dtype=np.float32) / scale).clip(0, 1))
        if target is not None and grey.size != target:
            grey = grey.resize(target, Image.Resampling.BILINEAR)
        return np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    rgb = image.convert("RGB")  # from RGBA this drops alpha without compositing
    if target is not None and rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def sample_item(image: np.ndarray, mask: np.ndarray, sample: Sample) -> dict:
    """One item as every reader returns it: ``image`` 3xHxW in [0, 1], ``mask`` 1xHxW, ``label``,
    ``defect_type``, ``path`` (an HxWx3 image and an HxW mask as arrays)."""
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "mask": torch.from_numpy(mask[None]),
        "label": int(sample.label),
        "defect_type": sample.defect_type,
        "path": str(sample.path),
    }


class MVTecAD(Dataset):
    """One category of an MVTec-layout dataset, one split; see the module docstring.

    Args:
        root: folder holding the category folders.
        category: category folder name, e.g. ``"bottle"`` or the built-in ``"brick"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: int (square), ``(height, width)``, or None to keep the file's size.
        val_fraction: fraction of the normal training images held out as ``"val"``, in [0, 1).
        seed: seed of the train/val carve-out.
        mask_rule: ``"any"`` nonzero mask pixel is defect, or ``"authors"`` (:func:`authors_mask`).
        image_resize: ``"bilinear"`` (antialiased) or ``"authors"`` (:func:`authors_resize`).
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: str = "train",
        image_size: int | tuple[int, int] | None = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        mask_rule: str = "any",
        image_resize: str = "bilinear",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.root = Path(root)
        self.category = category
        self.split = split
        self.image_size = _normalise_size(image_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        if mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {mask_rule!r}")
        self.mask_rule = mask_rule
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"image_resize must be one of {IMAGE_RESIZES}, got {image_resize!r}")
        self.image_resize = image_resize

        if not self.root.is_dir():
            raise FileNotFoundError(_root_help(self.root))
        if not isinstance(category, str) or not category or not (self.root / category).is_dir():
            present = list_categories(self.root)
            hint = ""
            if category in MVTEC_CATEGORIES:
                hint = f"; download it with diffad.data.download_mvtec({str(self.root)!r}, categories=[{category!r}])"
            raise FileNotFoundError(
                f"category {category!r} not found under {self.root}; present: {', '.join(present) or 'none'}{hint}"
            )
        self.category_dir = self.root / category
        self.samples: list[Sample] = self._test_samples() if split == "test" else self._train_or_val_samples()

    # ------------------------------------------------------------------ indexing the files

    def _folder(self, *parts: str) -> Path:
        folder = self.category_dir.joinpath(*parts)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: {self.category_dir} is not in the MVTec-AD layout")
        return folder

    def _train_or_val_samples(self) -> list[Sample]:
        folder = self._folder("train", GOOD)
        paths = _images_in(folder)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
        val_indices = set(self.val_indices(len(paths), self.val_fraction, self.seed))
        if self.split == "val":
            if not val_indices:
                raise ValueError(
                    f"split='val' is empty for {folder} ({len(paths)} training image(s), "
                    f"val_fraction={self.val_fraction}); use val_fraction > 0 and at least 2 training images"
                )
            chosen = [p for i, p in enumerate(paths) if i in val_indices]
        else:
            chosen = [p for i, p in enumerate(paths) if i not in val_indices]
        return [Sample(p, None, 0, GOOD) for p in chosen]

    @staticmethod
    def val_indices(n_images: int, val_fraction: float, seed: int) -> list[int]:
        """Sorted indices (into the name-sorted training images) that form the validation split.

        ``round(val_fraction * n)`` images, at least 1 when ``val_fraction > 0`` and ``n >= 2``,
        at most ``n - 1``, drawn by a permutation from ``numpy.random.default_rng(seed)``.
        """
        if val_fraction <= 0 or n_images < 2:
            return []
        n_val = min(n_images - 1, max(1, int(np.floor(val_fraction * n_images + 0.5))))
        permutation = np.random.default_rng(seed).permutation(n_images)
        return sorted(int(i) for i in permutation[:n_val])

    def _test_samples(self) -> list[Sample]:
        test_dir = self._folder("test")
        samples: list[Sample] = []
        defect_dirs = sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: (p.name != GOOD, p.name))
        for defect_dir in defect_dirs:
            defect = defect_dir.name
            for path in _images_in(defect_dir):
                if defect == GOOD:
                    samples.append(Sample(path, None, 0, GOOD))
                    continue
                mask_path = self.category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise FileNotFoundError(
                        f"no ground-truth mask for defective test image {path}: expected {mask_path}"
                    )
                samples.append(Sample(path, mask_path, 1, defect))
        if not samples:
            raise FileNotFoundError(f"no test images ({', '.join(IMAGE_EXTENSIONS)}) under {test_dir}")
        return samples

    # ------------------------------------------------------------------ public API

    @property
    def defect_types(self) -> list[str]:
        """Names of the category's defect folders under ``test`` (``"good"`` excluded), sorted."""
        test_dir = self.category_dir / "test"
        if not test_dir.is_dir():
            return []
        return sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name != GOOD)

    @property
    def labels(self) -> list[int]:
        """Image labels of the split (0 good, 1 defective), without reading any image."""
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _mask(self, sample: Sample, picture: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """The sample's ground truth at ``size`` = (height, width), binarised by ``mask_rule``."""
        mask_picture = _read_pil(sample.mask_path, "mask")
        if mask_picture.size != picture.size:
            raise ValueError(
                f"mask {sample.mask_path} is {mask_picture.size[0]}x{mask_picture.size[1]} but image "
                f"{sample.path} is {picture.size[0]}x{picture.size[1]} (width x height)"
            )
        if self.mask_rule == "authors":
            return authors_mask(mask_picture, size)
        values = np.asarray(mask_picture)
        binary = (values != 0).any(axis=2) if values.ndim == 3 else values != 0
        return downsample_mask(binary, size)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        picture = _read_pil(sample.path, "image")
        image = _image_array(picture, self.image_size, self.image_resize)
        height, width = image.shape[:2]
        if sample.mask_path is None:
            mask = np.zeros((height, width), dtype=np.float32)
        else:
            mask = self._mask(sample, picture, (height, width))
        return sample_item(image, mask, sample)

    def stack(self, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All items as tensors: images (N, 3, H, W), masks (N, 1, H, W), labels (N,) int64."""
        return load_all(self, progress=progress)

    def __repr__(self) -> str:
        size = "original" if self.image_size is None else f"{self.image_size[0]}x{self.image_size[1]}"
        return (
            f"MVTecAD(root={str(self.root)!r}, category={self.category!r}, split={self.split!r}, "
            f"n={len(self)}, defective={sum(self.labels)}, image_size={size})"
        )


def load_all(dataset, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read a whole (small) dataset of MVTecAD-style dict items into three tensors.

    Returns images (N, 3, H, W) float32, masks (N, 1, H, W) float32, labels (N,) int64. Works
    for :class:`MVTecAD` and for wrappers such as ``torch.utils.data.Subset``.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot stack an empty dataset")
    indices = range(n)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="loading images", unit="img")
    items = [dataset[i] for i in indices]
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass an image_size to the dataset")
    images = torch.stack([item["image"] for item in items])
    masks = torch.stack([item["mask"] for item in items])
    labels = torch.tensor([int(item["label"]) for item in items], dtype=torch.int64)
    return images, masks, labels
