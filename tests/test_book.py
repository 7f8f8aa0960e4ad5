"""The built book: every chapter page renders with its figures and a Colab button to its notebook.

Builds the HTML from the notebooks' stored outputs (nbval checks elsewhere that they still
run), then opens each page in headless Chromium (Debian's package, installed when missing).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chapters() -> list[str]:
    """The notebooks listed in _toc.yml, as paths relative to the repository (no suffix)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [f for f in files if (ROOT / f"{f}.ipynb").is_file()]


@pytest.fixture(scope="session")
def chromium():
    path = shutil.which("chromium")
    if path is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        path = shutil.which("chromium")
    assert path, "chromium could not be installed"
    return path


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # render the stored outputs
    config_path = out / "_config.yml"
    config_path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--path-output", str(out),
         "--config", str(config_path)],
        check=True, capture_output=True, text=True,
    )
    return out / "_build" / "html"


def dom(chromium: str, page: Path, tmp_path: Path) -> str:
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    )
    return result.stdout


@pytest.mark.slow
def test_every_chapter_page_renders(built_book, chromium, tmp_path):
    names = chapters()
    assert len(names) >= 1
    for name in names:
        page = built_book / f"{name}.html"
        assert page.is_file(), f"{name}.html was not built"
        html = dom(chromium, page, tmp_path)
        notebook = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        title = next(line for c in notebook.cells if c.cell_type == "markdown" for line in c.source.splitlines()
                     if line.startswith("# "))[2:].strip()
        assert title.split()[-1] in html, f"{name}: title {title!r} missing"
        figures = sum(1 for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if "image/png" in o.get("data", {}))
        images = len(re.findall(r"<img[^>]+src=\"[^\"]*_images/[^\"]+\"", html))
        assert images >= figures, f"{name}: {figures} figures in the notebook, {images} shown"
        colab = re.findall(r"https://colab\.research\.google\.com/github/[^\"]+", html)
        assert colab and colab[0].endswith(f"/blob/main/{name}.ipynb"), f"{name}: Colab button {colab[:1]}"
