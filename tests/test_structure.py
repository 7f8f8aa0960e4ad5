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
    for module in ("diffad.metrics", "diffad.device", "diffad.io", "diffad.checks", "diffad.smoothing"):
        loaded = _modules_imported_by(module) - {"diffad", module}
        assert not loaded, (module, loaded)
