"""The built book: every chapter page renders with its figures and a Colab button to its notebook.

Builds the HTML from the notebooks' stored outputs (nbval checks elsewhere that they still
run), then opens each page in headless Chromium (Debian's package, installed when missing).
"""

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
import yaml

from diffad.io import exclusive
from diffad.studies import book

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chapters() -> list[str]:
    """The notebooks listed in _toc.yml, as paths relative to the repository (no suffix)."""
    return book.chapters(ROOT)


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")  # GitHub's runners: Chrome
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _install_chromium() -> str | None:
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                   env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return find_browser()


@pytest.fixture(scope="session")
def chromium():
    path = find_browser()
    if path is None:
        # Each pytest-xdist worker has its own session: both may get here on a fresh machine, and
        # a second apt-get fails at once on the first one's lock (exit 100). One installs; the
        # other waits for it and then finds the browser.
        with exclusive(Path(tempfile.gettempdir()) / "diffad-chromium", "installing chromium"):
            path = find_browser() or _install_chromium()
    assert path, "chromium could not be installed"
    return path


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # render the stored outputs (the book: "cache")
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
        repository = book.repository_url().removeprefix("https://github.com/")
        expected = f"https://colab.research.google.com/github/{repository}/blob/main/{name}.ipynb"
        assert colab and colab[0] == expected, f"{name}: Colab button {colab[:1]}, not {expected}"


def widget_cells_without_a_static_view(html: str) -> tuple[int, list[str]]:
    """The widget cells of a page, and those not followed, before the next widget, by a code cell
    whose output shows a figure or a table outside any collapsed (hidden) part of the page."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    cells = [c for c in soup.select("div.cell") if c.select_one("div.cell_output")]
    missing, widgets = [], 0

    def is_widget(cell):
        return cell.find("script", attrs={"type": WIDGET_VIEW}) is not None

    def shown(cell):
        hidden = {"tag_hide-output", "tag_remove-output"} & set(cell.get("class", []))
        output = cell.select_one("div.cell_output")
        visible = [e for e in output.find_all(["img", "table"]) if e.find_parent("details") is None]
        return not hidden and any(e.name == "table" or "_images/" in e.get("src", "") for e in visible)

    for index, cell in enumerate(cells):
        if not is_widget(cell):
            continue
        widgets += 1
        following = [c for c in cells[index + 1:] if "tag_hide-output" not in c.get("class", [])]
        if not following or is_widget(following[0]) or not shown(following[0]):
            missing.append(cell.get_text(" ", strip=True)[:80])
    return widgets, missing


@pytest.mark.slow
def test_every_widget_is_followed_by_a_figure_or_table_on_the_page(built_book, chromium, tmp_path):
    """A widget needs a kernel; the published page shows what it would, as a figure or a table."""
    widgets = 0
    for name in chapters():
        notebook = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        expected = sum(1 for c in notebook.cells if c.cell_type == "code"
                       for o in c.get("outputs", []) if WIDGET_VIEW in o.get("data", {}))
        if not expected:
            continue
        found, missing = widget_cells_without_a_static_view(dom(chromium, built_book / f"{name}.html", tmp_path))
        assert found == expected, f"{name}: {expected} widgets in the notebook, {found} on the page"
        assert not missing, f"{name}: no figure or table under the widget(s) {missing}"
        widgets += found
    assert widgets >= 4
