"""The shipped models: a manifest that matches the files, a wheel that carries only the cpu models
of the built-in categories, and the rest fetched from the repository (here a loopback server)."""

import fnmatch
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from diffad import shipped
from diffad.presets import get_preset
from diffad.studies import book

from download_server import LoopbackServer, clear_proxy_environment

ROOT = Path(__file__).resolve().parents[1]


def test_the_manifest_records_every_shipped_file_as_it_is():
    files = sorted(path.name for path in shipped.SHIPPED.glob("*.pt"))
    entries = shipped.manifest()
    assert sorted(entries) == files
    for name in files:
        assert entries[name] == shipped.manifest_entry(shipped.SHIPPED / name), name


def _wheel_files() -> list[str]:
    """The shipped .pt files pyproject's package data puts in the wheel, read as setuptools reads it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = config["package-data"]["diffad"]
    exclude = config["exclude-package-data"]["diffad"]
    names = [f"resources/checkpoints/{path.name}" for path in shipped.SHIPPED.glob("*.pt")]
    kept = [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)
            and not any(fnmatch.fnmatch(n, p) for p in exclude)]
    return sorted(n.rsplit("/", 1)[1] for n in kept)


def test_the_wheel_carries_the_cpu_models_of_the_builtin_categories():
    from diffad.data import BUILTIN_CATEGORIES

    assert _wheel_files() == sorted(shipped.IN_WHEEL) == sorted(f"cpu-{c}.pt" for c in BUILTIN_CATEGORIES)


@pytest.mark.slow
def test_the_built_wheel_is_under_30_mb_and_holds_what_the_manifest_says(tmp_path):
    from setuptools import build_meta

    import os
    import shutil

    shutil.rmtree(ROOT / "build", ignore_errors=True)  # build_py keeps stale copies there
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        name = build_meta.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    wheel = tmp_path / name
    size = wheel.stat().st_size
    print(f"{name}: {size / 1e6:.1f} MB")
    assert size < 30e6
    inside = zipfile.ZipFile(wheel).namelist()
    checkpoints = sorted(n.rsplit("/", 1)[1] for n in inside if n.endswith(".pt"))
    assert checkpoints == sorted(shipped.IN_WHEEL)
    assert "diffad/resources/checkpoints/manifest.json" in inside


@pytest.fixture
def installed_from_the_wheel(tmp_path, monkeypatch):
    """A pip-installed diffad: the package holds only IN_WHEEL; the repository (a loopback server) the rest."""
    clear_proxy_environment(monkeypatch)
    monkeypatch.setenv("DIFFAD_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "site-packages" / "checkpoints"
    package.mkdir(parents=True)
    for name in shipped.IN_WHEEL:
        (package / name).symlink_to(shipped.SHIPPED / name)
    monkeypatch.setattr(shipped, "SHIPPED", package)
    with LoopbackServer() as server:
        for path in sorted(Path(shipped.MANIFEST).parent.glob("*.pt")):
            server.files[path.name] = path.read_bytes()
        monkeypatch.setattr(shipped, "raw_url", lambda name: server.url(name))
        yield server


def test_a_variant_missing_from_the_installed_package_is_fetched_once_and_checked(installed_from_the_wheel,
                                                                                 tmp_path):
    from diffad.studies.ablations import variant_study_preset

    cpu = get_preset("cpu")
    assert book.shipped_checkpoint(cpu, ["brick"]) == shipped.SHIPPED / "cpu-brick.pt"  # in the wheel
    assert installed_from_the_wheel.requests == []
    variant = variant_study_preset(cpu).replace(grad_clip=None)
    path = book.shipped_checkpoint(variant, ["brick"])
    assert path.parent == tmp_path / "cache" / "shipped"
    assert path.read_bytes() == (Path(shipped.MANIFEST).parent / path.name).read_bytes()
    assert book.shipped_checkpoint(variant, ["brick"]) == path and len(installed_from_the_wheel.requests) == 1
    assert {"brick", "coin", "tissue"} <= book.shipped_categories(cpu)  # known from the manifest alone


def test_a_damaged_download_is_refused(installed_from_the_wheel, tmp_path):
    name = "cpu-coin.pt"
    installed_from_the_wheel.files[name] = installed_from_the_wheel.files[name][:-10] + b"x" * 10
    with pytest.raises(Exception, match="SHA-256|sha256"):
        shipped.shipped_file(name)
    assert not (tmp_path / "cache" / "shipped" / name).exists()


def test_offline_a_missing_model_names_its_url_and_where_to_put_it(installed_from_the_wheel, monkeypatch):
    monkeypatch.setattr(shipped, "raw_url", lambda name: "http://127.0.0.1:9/" + name)  # nothing listens
    with pytest.raises(shipped.MissingShippedModel) as error:
        shipped.shipped_file("cpu-tissue.pt", timeout=2)
    message = str(error.value)
    assert "http://127.0.0.1:9/cpu-tissue.pt" in message and "put the file at" in message
    assert isinstance(error.value, FileNotFoundError) and sys.exc_info()[0] is None
