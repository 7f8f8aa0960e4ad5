"""Load OpenAI guided-diffusion checkpoints (e.g. ImageNet ``256x256_diffusion.pt``) into our UNet.

The paper's models start from OpenAI's class-conditional ImageNet model: the 1000-class label
embedding is dropped (MVTec models use 15 classes) and the feature head is new. Loading is
therefore strict on every key and shape except those two, and reports what it skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from diffad.io import read_state_dict

__all__ = [
    "GUIDED_DIFFUSION_URLS",
    "load_guided_diffusion_checkpoint",
    "download_guided_diffusion_checkpoint",
    "resolve_init_checkpoint",
    "MissingInitCheckpoint",
    "read_state_dict",
]

GUIDED_DIFFUSION_URLS = {
    "256x256_diffusion": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion.pt",  # online
    "256x256_diffusion_uncond": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",  # online
}

LABEL_EMBEDDING_KEY = "label_emb.weight"
FEATURE_HEAD_PREFIX = "feature_head."
_SHOW = 5  # offending keys listed in an error message


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def load_guided_diffusion_checkpoint(
    model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu"
) -> dict:
    """Copy a guided-diffusion state dict into ``model``; return ``{"loaded", "skipped", "new"}``.

    Strict on every key and shape, with two allowed exceptions:

    * ``label_emb.weight`` whose class count differs from the model's, or that the model
      (unconditional) lacks, is *skipped*; a model's label embedding that the file lacks
      (unconditional checkpoint) is *new*. Either way the model keeps its own initialisation.
    * ``feature_head.*`` parameters absent from the file are *new* (OpenAI's models have none).

    Any other missing, unexpected or mis-shaped key raises ``ValueError`` naming the keys and
    the file; nothing is copied in that case.
    """
    path = Path(path)
    source = read_state_dict(path, map_location=map_location)
    target = model.state_dict()

    skipped: list[str] = []
    new: list[str] = []
    to_load: dict[str, torch.Tensor] = {}

    unexpected = [k for k in source if k not in target]
    missing = [k for k in target if k not in source]
    if LABEL_EMBEDDING_KEY in unexpected:
        unexpected.remove(LABEL_EMBEDDING_KEY)
        skipped.append(LABEL_EMBEDDING_KEY)
    for key in list(missing):
        if key == LABEL_EMBEDDING_KEY or key.startswith(FEATURE_HEAD_PREFIX):
            missing.remove(key)
            new.append(key)

    mismatched = []
    for key, tensor in source.items():
        if key not in target:
            continue
        if tuple(tensor.shape) != tuple(target[key].shape):
            if key == LABEL_EMBEDDING_KEY and tensor.ndim == 2 and tensor.shape[1] == target[key].shape[1]:
                skipped.append(key)
                continue
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(target[key].shape)}")
            continue
        to_load[key] = tensor

    problems = []
    if missing:
        problems.append(f"missing from the file: {_first(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_first(mismatched)}")
    if problems:
        raise ValueError(
            f"checkpoint {path} does not fit this model ({type(model).__name__}); "
            + "; ".join(problems)
            + ". Check that the model config matches the checkpoint's flags."
        )

    model.load_state_dict(to_load, strict=False)
    return {"loaded": len(to_load), "skipped": skipped, "new": new}


class MissingInitCheckpoint(FileNotFoundError):
    """The checkpoint a preset starts from is neither in the cache nor downloadable now.

    In a notebook IPython shows only this message (``_render_traceback_``), not a traceback.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def download_guided_diffusion_checkpoint(
    dest_dir: str | Path, name: str = "256x256_diffusion", timeout: float = 60.0, retries: int = 2
) -> Path:
    """Download one of OpenAI's guided-diffusion checkpoints into ``dest_dir``; return its path.

    Needs internet (about 2.2 GB for the 256x256 models). The transfer resumes where an earlier
    one stopped and is checked against the size the server announces; on the first complete
    download its size and SHA-256 are recorded beside it (``<name>.pt.json``) and every later call
    checks the file against that record, so a file damaged in the cache is never used silently.
    """
    if name not in GUIDED_DIFFUSION_URLS:
        raise ValueError(f"unknown guided-diffusion checkpoint {name!r}; choose one of {sorted(GUIDED_DIFFUSION_URLS)}")
    from diffad.download import download_url, file_hash  # lazy: keeps diffad.models importable on its own

    dest = Path(dest_dir) / f"{name}.pt"
    record = dest.with_name(dest.name + ".json")
    if dest.is_file():
        _check_recorded(dest, record, file_hash)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = Path(download_url(GUIDED_DIFFUSION_URLS[name], dest, desc=f"guided-diffusion {name}",
                             timeout=timeout, retries=retries))
    record.write_text(json.dumps({"url": GUIDED_DIFFUSION_URLS[name], "size": path.stat().st_size,
                                  "sha256": file_hash(path)}, indent=1))
    return path


def _check_recorded(path: Path, record: Path, file_hash) -> None:
    """Check ``path`` against the size and SHA-256 recorded at its download (record one if none)."""
    size = path.stat().st_size
    if not record.is_file():  # a copy placed by hand: trust it once, then hold it to that
        record.write_text(json.dumps({"size": size, "sha256": file_hash(path)}, indent=1))
        return
    expected = json.loads(record.read_text())
    if size != expected["size"] or file_hash(path) != expected["sha256"]:
        raise ValueError(
            f"{path} no longer matches the size and SHA-256 recorded when it was downloaded ({record}); "
            f"it is damaged: delete both files and run again to download it afresh"
        )


def resolve_init_checkpoint(spec: str | Path | None, cache: str | Path | None = None,
                            timeout: float = 20.0) -> Path | None:
    """The file a preset's ``init_checkpoint`` names: None, a path, or an OpenAI checkpoint name.

    A name (``256x256_diffusion``) is looked up in ``<cache>/openai/`` and downloaded there on
    first use; with ``$DIFFAD_SCRATCH`` set (Colab with the cache on Google Drive) and no ``cache``
    named, a copy not already in the cache goes to ``<scratch>/openai/`` instead. When it is not there and cannot be downloaded (offline), one
    :class:`MissingInitCheckpoint` says which checkpoint, its URL, where it is expected and how
    to pass a local copy, within seconds rather than after a long series of retries.
    """
    if spec is None or str(spec) == "":
        return None
    name = str(spec)
    if name not in GUIDED_DIFFUSION_URLS:
        path = Path(name).expanduser()
        if not path.is_file():
            raise MissingInitCheckpoint(
                f"init_checkpoint {name!r} is neither a file nor one of OpenAI's checkpoints "
                f"({', '.join(sorted(GUIDED_DIFFUSION_URLS))})")
        return path
    from diffad.download import DownloadError
    from diffad.io import cache_dir, scratch_dir

    folder = cache_dir(cache) / "openai"
    if cache is None and scratch_dir() is not None and not (folder / f"{name}.pt").is_file():
        folder = scratch_dir() / "openai"  # fetched again in a minute: not worth 2.2 GB of Google Drive
    try:
        return download_guided_diffusion_checkpoint(folder, name, timeout=timeout, retries=0)
    except DownloadError as error:
        raise MissingInitCheckpoint(
            f"the paper preset starts from OpenAI's ImageNet diffusion checkpoint {name!r}, which is not at "
            f"{folder / (name + '.pt')} and could not be downloaded from {GUIDED_DIFFUSION_URLS[name]} ({error}). "
            f"Download it there by hand (about 2.2 GB), or pass a local copy with "
            f"`--set init_checkpoint=PATH` (Python: init_checkpoint=PATH); init_checkpoint=None trains from "
            f"random weights, which is not what the authors did"
        ) from None
