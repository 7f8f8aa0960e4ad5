"""Files: the cache folder, atomic writes with a free-space check, and torch files read safely.

A training run on Colab can be cut off at any moment and its disk is small, so every file diffad
writes goes to a temporary file beside the target and is renamed over it only when complete, and
before writing we check that the folder has room for the new copy (the old one stays until the
rename). Large files are read with ``mmap=True`` where torch can, so resuming a 2 GB checkpoint
does not first copy it all into host memory.

Several processes share one cache (two chapters open at once, the book built with its chapters in
parallel, two ``diffad train`` runs into one folder): what one of them builds (a dataset, a model,
scored maps) the others wait for and then read, through :func:`exclusive` and
:func:`computed_once`.

This module imports nothing else from diffad.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import filelock
import torch

__all__ = ["cache_dir", "scratch_dir", "atomic_save", "load_torch_file", "read_state_dict", "tensor_bytes", "InsufficientDiskSpace",
           "space_to_write", "free_disk_bytes", "exclusive", "computed_once", "atomic_write",
           "build_each"]

# torch.save writes a little more than the tensors' bytes (the pickle, zip headers, alignment).
_SAVE_OVERHEAD = 1.02
_SAVE_SLACK_BYTES = 16 << 20


class InsufficientDiskSpace(OSError):
    """The folder has too little free space for the file about to be written."""


def cache_dir(path=None) -> Path:
    """The cache folder: ``path``, else ``$DIFFAD_CACHE`` (e.g. a Google Drive folder on Colab), else ./cache."""
    return Path(path or os.environ.get("DIFFAD_CACHE", "cache")).expanduser().resolve()


def scratch_dir() -> Path | None:
    """``$DIFFAD_SCRATCH``: a folder on the machine's own disk for what can be made again (downloads such
    as OpenAI's weights) and for checkpoints that the cache's disk cannot hold; None when unset. On Colab
    with the cache on Google Drive, ``book.setup`` sets it: Drive keeps what must survive a disconnect."""
    value = os.environ.get("DIFFAD_SCRATCH")
    return Path(value).expanduser().resolve() if value else None


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples (what torch.save will write)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def space_to_write(nbytes: int) -> int:
    """Free bytes :func:`atomic_save` asks for before writing ``nbytes`` of tensors: a margin for the format."""
    return int(nbytes * _SAVE_OVERHEAD) + _SAVE_SLACK_BYTES


def free_disk_bytes(path: str | Path) -> tuple[int, Path]:
    """Free bytes on the disk of ``path`` (a folder not made yet: its nearest existing parent), and that folder."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free, folder


def check_free_space(folder: Path, needed: int) -> None:
    """Raise :class:`InsufficientDiskSpace` naming ``folder`` and the bytes needed when it lacks room."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InsufficientDiskSpace(
            f"not enough free disk space in {folder}: writing this file needs about {needed:,} bytes "
            f"({needed / 2**30:.2f} GiB) and {free:,} bytes ({free / 2**30:.2f} GiB) are free; free some space "
            "or point DIFFAD_CACHE / the output folder at a larger disk"
        )


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file.

    The free space is checked first (the new copy must fit beside the old one until the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, space_to_write(tensor_bytes(obj)))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# One lock object per lock file in this process: filelock counts nested acquisitions of one object,
# where a second object on the same file would wait for the first forever.
_LOCKS: dict[str, filelock.FileLock] = {}
T = TypeVar("T")


def lock_file(path: str | Path) -> Path:
    """The lock file that guards ``path``: in the machine's temporary folder (``diffad-locks/``, one
    file per resolved path), so neither the cache nor an output folder fills with lock files, and
    it works where the cache sits on a filesystem without locks (Google Drive on Colab)."""
    key = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / "diffad-locks" / f"{Path(path).name[:40]}-{key}.lock"


@contextlib.contextmanager
def exclusive(path: str | Path, what: str, wait: bool = True) -> Iterator[bool]:
    """Hold the inter-process lock of ``path`` (a file or folder about to be made) for the block.

    Another process that holds it is making the same thing: this one says so on the process's own
    stderr (a terminal; a notebook's output stays as it would be without the wait), waits for it,
    and should then look again before making it itself. With ``wait=False`` it does not wait: the
    block gets False (and runs without the lock) where another process holds it, True otherwise.
    The lock is the operating system's (``flock``): a process that dies releases it, so no stale
    lock outlives a killed runtime. One process may nest the same lock. Where the temporary folder
    cannot lock, the block runs unlocked, as a single process would.
    """
    where = lock_file(path)
    lock = _LOCKS.get(str(where))
    if lock is None:
        where.parent.mkdir(parents=True, exist_ok=True)
        lock = _LOCKS.setdefault(str(where), filelock.FileLock(str(where)))
    try:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if not wait:
                yield False
                return
            if sys.__stderr__ is not None:
                print(f"diffad: waiting for another process {what} ({path})", file=sys.__stderr__, flush=True)
            lock.acquire()
    except NotImplementedError:  # flock unsupported where the lock file lives
        yield True
        return
    try:
        yield True
    finally:
        lock.release()


def build_each(paths, is_complete: Callable[[Path], bool], build: Callable[[Path], object], what: str) -> None:
    """``build(path)`` for each of ``paths`` (the categories of a dataset) that is not complete, each
    under its lock. Processes building the same set at once share it out: each first takes the
    paths no other holds, then waits for the ones another was building (and builds any it left)."""
    taken = []
    for path in paths:
        if is_complete(path):
            continue
        with exclusive(path, what, wait=False) as held:
            if not held:
                taken.append(path)
            elif not is_complete(path):
                build(path)
    for path in taken:
        with exclusive(path, what):
            if not is_complete(path):
                build(path)


def computed_once(path: str | Path, compute: Callable[[], T], load: Callable[[Path], T],
                  save: Callable[[T, Path], object], what: str) -> T:
    """``load(path)`` when the file is there; else ``compute()``, saved with ``save(value, path)``
    (an atomic write) and returned. Under :func:`exclusive`: of several processes asking at once,
    one computes and the others wait and read its file."""
    path = Path(path)
    if path.is_file():
        return load(path)
    with exclusive(path, what):
        if path.is_file():  # made while this process waited
            return load(path)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        save(value, path)
        return value


def atomic_write(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path`` through a temporary file beside it and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_torch_file(path: str | Path, mmap: bool = True):
    """A diffad checkpoint or model file, on the CPU, memory-mapped where torch can.

    Memory-mapping leaves the tensors' bytes in the file until they are used (copied into a
    model or onto the GPU), so resuming does not hold the whole file in host RAM at once.
    Anything unreadable (truncated, foreign) is a ValueError naming the file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc).lower():  # an old (non-zip) torch file cannot be mapped
            return load_torch_file(path, mmap=False)
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc


# Keys under which checkpoints of other projects wrap their state dict (timm: state_dict_ema).
STATE_DICT_WRAPPERS = ("state_dict", "model", "state_dict_ema")


def read_state_dict(path: str | Path, map_location="cpu", what: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """A state dict of tensors from a .pt/.pth/.bin or .safetensors file, with clear errors otherwise.

    Accepts a plain state dict (what guided-diffusion saves) or a dict holding one under one of
    ``STATE_DICT_WRAPPERS``. Torch files load with ``weights_only=True`` (no arbitrary code).
    ``what`` names the file in messages ("checkpoint", "weights file").
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device=str(map_location))
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many types on foreign bytes; all mean the same here
        raise ValueError(f"{path} is not a readable torch {what} ({type(error).__name__}: {error})") from error
    if isinstance(obj, Mapping):
        for wrapper in STATE_DICT_WRAPPERS:
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return OrderedDict(obj)
