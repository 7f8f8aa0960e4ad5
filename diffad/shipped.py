"""The trained models that ship with diffad, found in the package or fetched from the repository.

The repository keeps every shipped model in ``diffad/resources/checkpoints/`` (the cpu preset's
model of each built-in and development category, the variants chapters 10b and 13 compare, the
unified models of chapter 11b, chapter 15's own-object model). ``manifest.json`` beside them lists
each one: its size and SHA-256, and what it was trained on (preset name, categories, the
fingerprint of its training fields), so a model is found by its settings without reading it.

The wheel that ``pip install`` gets carries only :data:`IN_WHEEL` (pyproject's
``exclude-package-data`` leaves the rest out, to keep it small): a checkpoint that is not in the
installed package is fetched once from :data:`REPOSITORY_URL` into ``<cache>/shipped/``, its size
and SHA-256 checked against the manifest (:func:`shipped_file`). From a clone of the repository
every file is there and nothing is fetched. Tests never fetch from the internet.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffad.io import cache_dir

__all__ = ["SHIPPED", "MANIFEST", "REPOSITORY_URL", "IN_WHEEL", "manifest", "shipped_file", "find_shipped",
           "manifest_entry", "write_manifest", "raw_url", "MissingShippedModel"]

SHIPPED = Path(__file__).parent / "resources" / "checkpoints"
MANIFEST = SHIPPED / "manifest.json"
# The book's repository: _config.yml's repository.url, copied here for an installed diffad without the
# repository around it (the Colab, Binder and repository buttons, the fetch of shipped models), and
# literally into every chapter's Colab install cell, which runs before diffad is installed.
# `python -m diffad.studies.book set-repository-url URL` changes all of them.
REPOSITORY_URL = "https://github.com/diffad/diffad"
# The branch the shipped models are fetched from.
REPOSITORY_REF = "main"
# What the wheel carries: the cpu preset's model of each built-in category, which the chapters and
# `python -m diffad evaluate` read first (pyproject.toml's exclude-package-data leaves out the rest).
IN_WHEEL = ("cpu-brick.pt", "cpu-capsule.pt", "cpu-cup.pt", "cpu-grass.pt", "cpu-gravel.pt", "cpu-nut.pt",
            "cpu-retina.pt")


class MissingShippedModel(FileNotFoundError):
    """A shipped model that is neither in the installed package nor fetchable from the repository."""


def raw_url(name: str, repository: str = REPOSITORY_URL, ref: str = REPOSITORY_REF) -> str:
    """Where the repository serves the shipped file ``name`` (GitHub's raw files)."""
    owner_and_name = repository.removeprefix("https://github.com/").removesuffix(".git").strip("/")
    return f"https://raw.githubusercontent.com/{owner_and_name}/{ref}/diffad/resources/checkpoints/{name}"


def manifest(path: Path | None = None) -> dict[str, dict]:
    """File name -> ``size``, ``sha256``, ``preset``, ``categories``, ``training_fingerprint``
    (``path``: default :data:`MANIFEST`)."""
    return json.loads(Path(path or MANIFEST).read_text())


def find_shipped(preset_name: str, categories: list[str], training_fingerprint: str,
                 entries: dict[str, dict] | None = None) -> str | None:
    """The name of the shipped model of ``preset_name`` on exactly ``categories`` with these training fields
    (:func:`diffad.presets.training_fingerprint`), or None: the preset's own model ``<preset>-<categories>.pt``
    first, then its variants ``<preset>-<categories>-<fingerprint>.pt``, matched by what the manifest records
    they were trained with, never by name alone."""
    entries = manifest() if entries is None else entries
    run = f"{preset_name}-{'+'.join(categories)}"
    candidates = [f"{run}.pt", *sorted(name for name in entries if name.startswith(f"{run}-"))]
    for name in candidates:
        entry = entries.get(name)
        if entry and entry["categories"] == list(categories) and entry["training_fingerprint"] == training_fingerprint:
            return name
    return None


def shipped_file(name: str, cache=None, timeout: float = 60.0) -> Path:
    """The shipped file ``name``: in the package where it is there, else fetched once from the repository
    into ``<cache>/shipped/`` (resumable; size and SHA-256 checked against the manifest)."""
    local = SHIPPED / name
    if local.is_file():
        return local
    entry = manifest().get(name)
    if entry is None:
        raise MissingShippedModel(f"{name} is not a model shipped with diffad (see {MANIFEST})")
    from diffad.download import DownloadError, download_url

    dest = cache_dir(cache) / "shipped" / name
    url = raw_url(name)
    try:
        return download_url(url, dest, expected_size=entry["size"], sha256=entry["sha256"], desc=name,
                            timeout=timeout, retries=1)
    except DownloadError as error:
        raise MissingShippedModel(
            f"the shipped model {name} is not in this installed diffad (the wheel carries only the cpu models of "
            f"the built-in categories) and could not be fetched from {url} ({error}); install diffad from a clone "
            f"of the repository, or put the file at {dest}") from error


def manifest_entry(path: Path) -> dict:
    """A shipped file's manifest entry, computed from the file itself."""
    from diffad.download import file_hash
    from diffad.models.denoiser import TrainedModel
    from diffad.presets import training_fingerprint

    model = TrainedModel.load(path)
    return {"size": path.stat().st_size, "sha256": file_hash(path), "preset": model.preset.name,
            "categories": list(model.categories), "training_fingerprint": training_fingerprint(model.preset)}


def write_manifest(folder: Path | None = None) -> Path:
    """Write ``manifest.json`` for every ``*.pt`` in ``folder`` (default :data:`SHIPPED`), after adding or
    retraining a shipped model: ``python -c "from diffad.shipped import write_manifest; write_manifest()"``."""
    folder = Path(folder or SHIPPED)
    entries = {path.name: manifest_entry(path) for path in sorted(folder.glob("*.pt"))}
    target = Path(folder) / "manifest.json"
    target.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return target
