"""Download and extract MVTec-AD (e.g. on Colab), resumably and safely.

The official archive ``mvtec_anomaly_detection.tar.xz`` is 5,264,982,680 bytes with SHA-256
``cf4313b1...98cd3d``; the URL and hash are those anomalib uses (``DOWNLOAD_INFO`` in
``anomalib/data/datamodules/image/mvtecad.py``). MVTec-AD is licensed CC BY-NC-SA 4.0
(non-commercial use); the archive's ``license.txt`` is extracted beside the categories.

:func:`download_mvtec` downloads with :func:`diffad.download.download_url` (progress bar,
resume of an interrupted download, size and checksum check), then streams through the
archive once and extracts only the requested categories. Members that would land outside
``root`` (absolute paths, ``..``) and links or device files are refused. A category counts as
extracted once its marker file ``.extracted`` exists; such categories are skipped, and when
all requested ones are there, nothing is downloaded at all.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable

from ..download import download_url
from .mvtec import MVTEC_CATEGORIES

__all__ = ["download_mvtec", "extract_categories", "MVTEC_URL", "MVTEC_SHA256", "MVTEC_SIZE", "MVTEC_ARCHIVE_NAME"]

MVTEC_URL = (
    "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
    "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_SIZE = 5_264_982_680
MVTEC_ARCHIVE_NAME = "mvtec_anomaly_detection.tar.xz"
EXTRACTED_MARKER = ".extracted"
_TOP_FOLDER = "mvtec_anomaly_detection"  # tolerated as a leading folder in custom archives


def _is_extracted(root: Path, category: str) -> bool:
    return (root / category / EXTRACTED_MARKER).is_file()


def _member_parts(name: str) -> tuple[str, ...]:
    """Path components of an archive member, with ``./`` and a top ``mvtec_anomaly_detection/`` removed."""
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if len(parts) > 1 and parts[0] == _TOP_FOLDER:
        parts = parts[1:]
    return parts


def _safe_target(root: Path, member: tarfile.TarInfo, parts: tuple[str, ...], archive: Path) -> Path:
    """Where ``member`` goes under ``root``; raises ValueError for anything unsafe."""
    if member.issym() or member.islnk() or not (member.isfile() or member.isdir()):
        raise ValueError(
            f"refusing archive member {member.name!r} in {archive}: only regular files and folders are allowed"
        )
    if PurePosixPath(member.name).is_absolute() or ".." in parts or "\\" in member.name:
        raise ValueError(f"refusing archive member {member.name!r} in {archive}: it would be written outside {root}")
    target = root.joinpath(*parts)
    resolved_root = root.resolve()
    if resolved_root != target.resolve() and resolved_root not in target.resolve().parents:
        raise ValueError(f"refusing archive member {member.name!r} in {archive}: it would be written outside {root}")
    return target


def extract_categories(
    archive: str | Path, root: str | Path, categories: Iterable[str], progress: bool = True
) -> list[str]:
    """Extract the given category folders (and top-level files such as ``license.txt``) to ``root``.

    Streams through the archive once (compressed tar archives cannot seek cheaply). Writes each
    category's ``.extracted`` marker when the archive has been read through. Returns the
    categories found; raises ValueError naming those the archive does not contain.
    """
    archive, root = Path(archive), Path(root)
    wanted = set(categories)
    found: set[str] = set()
    root.mkdir(parents=True, exist_ok=True)
    # Files of a half-extracted category (interrupted run) are simply overwritten.
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"extracting {archive.name}", unit=" files")
    try:
        with tarfile.open(archive, mode="r|*") as stream:
            for member in stream:
                parts = _member_parts(member.name)
                if not parts:
                    continue
                target = _safe_target(root, member, parts, archive)  # checked for every member
                top_level_file = len(parts) == 1 and member.isfile()
                if parts[0] not in wanted and not top_level_file:
                    continue
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = stream.extractfile(member)
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                if not top_level_file:
                    found.add(parts[0])
                if bar is not None:
                    bar.update(1)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(
            f"cannot extract {archive}: {type(error).__name__}: {error}; delete it and run download_mvtec again"
        ) from error
    finally:
        if bar is not None:
            bar.close()
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"archive {archive} has no folder for categories {missing}")
    for category in sorted(found):
        (root / category / EXTRACTED_MARKER).write_text(f"extracted from {archive.name}\n")
    return sorted(found)


def download_mvtec(
    root: str | Path,
    categories: Iterable[str] | str | None = None,
    url: str = MVTEC_URL,
    *,
    sha256: str | None = MVTEC_SHA256,
    expected_size: int | None = MVTEC_SIZE,
    archive_path: str | Path | None = None,
    keep_archive: bool = True,
    progress: bool = True,
) -> Path:
    """Make ``root/<category>`` exist for the requested MVTec-AD categories; return ``root``.

    Args:
        root: where the category folders go (the ``root`` of :class:`~diffad.data.MVTecAD`).
        categories: names (default: all 15); already extracted ones are skipped.
        url, sha256, expected_size: the archive and its checks (override for a mirror; pass
            ``None`` to skip a check).
        archive_path: where the archive is stored (default ``root/mvtec_anomaly_detection.tar.xz``).
        keep_archive: keep the 5 GB archive after extraction (needed to add categories later
            without downloading again).
        progress: show tqdm bars.
    """
    root = Path(root)
    if categories is None:
        requested = list(MVTEC_CATEGORIES)
    elif isinstance(categories, str):
        requested = [categories]
    else:
        requested = list(dict.fromkeys(categories))
    if not requested:
        raise ValueError("categories is empty; pass None for all 15 MVTec-AD categories")
    if url == MVTEC_URL:
        unknown = [c for c in requested if c not in MVTEC_CATEGORIES]
        if unknown:
            raise ValueError(f"unknown MVTec-AD categories {unknown}; choose from {list(MVTEC_CATEGORIES)}")
    todo = [c for c in requested if not _is_extracted(root, c)]
    if not todo:
        return root
    archive = Path(archive_path) if archive_path is not None else root / MVTEC_ARCHIVE_NAME
    download_url(url, archive, expected_size=expected_size, sha256=sha256, desc=archive.name)
    extract_categories(archive, root, todo, progress=progress)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return root
