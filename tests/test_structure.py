"""The library's shape: short functions, and layers that import only downward."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffad"
LONG_ALLOWED = {("models/unet.py", "__init__")}  # the UNet's constructor mirrors guided-diffusion's


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = (path.relative_to(PACKAGE).as_posix(), node.name)
                if lines > 80 and key not in LONG_ALLOWED:
                    long.append(f"{key[0]}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def _modules_imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('diffad')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_baselines_depend_only_on_backbones_data_and_helpers():
    loaded = _modules_imported_by("diffad.baselines")
    assert not loaded & {"diffad.train", "diffad.scoring", "diffad.evaluate", "diffad.diffusion"}, loaded


def test_low_layers_import_nothing_above_them():
    for module in ("diffad.metrics", "diffad.device", "diffad.io", "diffad.checks", "diffad.smoothing",
                   "diffad.process"):
        loaded = _modules_imported_by(module) - {"diffad", module}
        assert not loaded, (module, loaded)


def _imports_from(module_path: Path, source: str) -> list[tuple[str, list[str]]]:
    """(module, names) of each ``from X import names`` / ``import X`` in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(module_path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == source:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.module == source.rpartition(".")[0]:
            if any(alias.name == source.rpartition(".")[2] for alias in node.names):
                found.append((source, ["*"]))
        elif isinstance(node, ast.Import) and any(alias.name == source for alias in node.names):
            found.append((source, ["*"]))
    return found


def test_train_is_imported_only_by_what_trains():
    """The training loop is a room of its own: a module that reads a model imports it from
    diffad.models (TrainedModel, the builders), the device plan from diffad.device_plan, the step from
    diffad.step; diffad.train is imported only for ``fit``, and never for a helper it imports itself."""
    importers = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names = [name for _, found in _imports_from(path, "diffad.train") for name in found]
        if names and path.name != "train.py":
            importers[path.relative_to(PACKAGE).as_posix()] = set(names)
    print(importers)
    assert all(names <= {"fit", "CHECKPOINT_NAME"} for names in importers.values()), importers
    core = {name for name in importers if not name.startswith("studies/")}
    assert len(core) <= 4, core


# The shell's front end sits above both floors (its `tune` command runs a study); the rest is the core.
FRONT_ENDS = {"cli.py", "__main__.py"}


def test_the_core_never_imports_the_studies():
    """Two floors: the method's core (what a user of the library runs) never imports diffad.studies
    (what the chapters measure and show), neither at the top of a module nor inside a function."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("studies/") or relative in FRONT_ENDS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                       else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "diffad":
                modules = [f"diffad.{alias.name}" for alias in node.names]
            offenders += [f"{relative}:{node.lineno} {m}" for m in modules if m.startswith("diffad.studies")]
    assert not offenders, offenders
    loaded = _modules_imported_by("diffad.evaluate") | _modules_imported_by("diffad.detector")
    assert not {m for m in loaded if m.startswith("diffad.studies")}, loaded
