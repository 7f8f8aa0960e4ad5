"""The book's numbers are pinned by nbval, not ignored.

nbval compares every code cell's new outputs with the stored ones: stdout/stderr text and each
MIME type of display_data/execute_result outputs (text/plain, text/markdown, text/html, ...);
figures (image/png, image/jpeg) and widget model ids are never compared. Before comparing, it
runs book/nbval_sanitize.cfg's regex replacements on both sides. So a metric (a markdown table,
a printed AUROC) is checked to the precision the sanitizer leaves, and the tag
``nbval-ignore-output`` is for what no sanitizer can make stable.

Fast: reads the stored notebooks and the sanitizer file; no notebook runs.
"""

import ast
import inspect
import json
import re
import textwrap
import tomllib
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbval.plugin import IPyNbCell, IPyNbFile, get_sanitize_patterns, metadata_tags, nocolors

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
SANITIZE_CFG = BOOK / "nbval_sanitize.cfg"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))

# What nbval reads as "do not compare this cell's outputs" (tags and source comments).
NOT_COMPARED = {tag for tag, option in metadata_tags.items() if option in (("check", False), "skip")}
NOT_COMPARED_COMMENTS = re.compile(r"^\s*#\s*(NBVAL_IGNORE_OUTPUT|PYTEST_VALIDATE_IGNORE_OUTPUT|NBVAL_SKIP)\b",
                                   re.MULTILINE)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# Why a cell may keep nbval-ignore-output: its stored output shows one of these.
VOLATILE = {
    # the cache and data folders: differ per machine and per DIFFAD_CACHE
    "path": re.compile(r"(?<![\w.<>])/(?:[\w.\-]+/)+[\w.\-]+"),
    "timing": re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|s|sec|seconds|min|minutes|h|hours)\b(?! */)"
                         r"|\b\d+:\d\d(?::\d\d)?\b|\bit/s\b|\bs/it\b|\belapsed\b"),
    "progress bar": re.compile(r"\d+%\|[^|\n]*\|"),
    "memory size": re.compile(r"\b\d+(?:\.\d+)? ?[KMGT]i?B\b"),
}
# An interactive widget (ipywidgets.interactive, or a box with an Output widget): nbclient
# stores what its Output widget shows in the widget state, not in the cell's outputs, but under
# nbval (no widget front end) the same prints and figures arrive as ordinary cell outputs, so
# the stored and new outputs never have the same fields. Checked on a two-cell notebook.
WIDGET_REASON = "widget: Output-widget content is cell output under nbval, widget state in the stored notebook"

# Cells ignored for a reason none of the patterns above shows: a fragment of the cell's
# source -> the reason, one line each.
ALLOWED = {
    'results = {"gradient denoising": trajectory.result}':
        "chapter 8's table: the gradient-denoising row comes from 150 normalised steps, which amplify "
        "rounding until its third digit depends on the CPU and the thread count even in float64; the "
        "next cell prints what the chapter concludes from the table, and that is compared",
}

# A metric in an output: AUROC (pixel_auroc, image AUROC) or PRO.
METRIC = re.compile(r"auroc|\bpro\b", re.IGNORECASE)


def code_cells():
    """(notebook name, nbval's cell number, cell) for every code cell of the book."""
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)  # as nbval reads it: multiline text joined
        number = 0
        for cell in notebook.cells:
            if cell["cell_type"] == "code":
                yield path.name, number, cell
                number += 1


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value if isinstance(value, str) else json.dumps(value)


def output_texts(cell, widgets: bool = True) -> list[str]:
    """The text nbval compares in a cell's stored outputs (streams, text/* MIME types)."""
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            texts.append(_text(output["text"]))
        elif output["output_type"] == "error":
            texts.append(f"{output['ename']}: {output['evalue']}")
        elif "data" in output and (widgets or WIDGET_VIEW not in output["data"]):
            texts += [_text(v) for k, v in output["data"].items() if k.startswith("text/")]
    return texts


def not_compared(cell) -> bool:
    tags = set(cell.get("metadata", {}).get("tags", []))
    return bool(tags & NOT_COMPARED) or bool(NOT_COMPARED_COMMENTS.search(_text(cell["source"])))


def ignore_reason(cell) -> str | None:
    """Why this cell's outputs cannot be compared, or None: they can, and should be."""
    source = _text(cell["source"])
    for fragment, reason in ALLOWED.items():
        if fragment in source:
            return reason
    if any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", [])):
        return WIDGET_REASON
    text = "\n".join(output_texts(cell))
    for name, pattern in VOLATILE.items():
        if pattern.search(text):
            return f"{name}: {pattern.search(text).group(0)!r}"
    return None


IGNORED = [(name, number, cell) for name, number, cell in code_cells() if not_compared(cell)]


@pytest.mark.parametrize("name, number, cell", IGNORED, ids=[f"{n}::Cell {i}" for n, i, _ in IGNORED])
def test_an_ignored_cell_has_a_reason(name, number, cell):
    assert ignore_reason(cell) is not None, (
        f"{name} cell {number} is tagged nbval-ignore-output, but its output shows no path, timing, "
        f"progress bar, memory size or widget: remove the tag (book/nbval_sanitize.cfg pins its "
        f"numbers), or add a sanitizer, or a line to ALLOWED with the reason.\n{output_texts(cell)}"
    )


def test_no_metric_is_ignored():
    ignored_metrics = [
        f"{name} cell {number}: {METRIC.search(text).group(0)!r} in {text[:80]!r}"
        for name, number, cell in IGNORED
        for text in output_texts(cell, widgets=False)
        if METRIC.search(text)
    ]
    assert not ignored_metrics, "metrics must be compared, not ignored:\n" + "\n".join(ignored_metrics)


def test_ignored_cells_are_few():
    """The setup cell (paths) of each chapter and the interactive widgets, nothing else."""
    reasons = [ignore_reason(cell) or "" for _, _, cell in IGNORED]
    paths = sum(r.startswith("path") for r in reasons)
    assert paths <= len(NOTEBOOKS) and len(IGNORED) - paths <= 6, reasons


# --------------------------------------------------------------------------- the sanitizer


PATTERNS = get_sanitize_patterns(SANITIZE_CFG.read_text(encoding="utf-8"))


def sanitize(text: str) -> str:
    """What nbval does to each compared string (IPyNbCell.sanitize)."""
    for regex, replace in PATTERNS:
        text = re.sub(regex, replace, text)
    return text


def test_nbval_reads_every_sanitizer():
    sections = re.findall(r"^\[(.+)\]$", SANITIZE_CFG.read_text(encoding="utf-8"), re.MULTILINE)
    assert len(PATTERNS) == len(sections) == len(set(sections)) >= 8
    assert len({regex for regex, _ in PATTERNS}) == len(PATTERNS)  # nbval keys them by regex
    for regex, _ in PATTERNS:
        re.compile(regex)


def test_the_tests_use_this_sanitizer():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--nbval-sanitize-with=book/nbval_sanitize.cfg" in options["addopts"].split()


@pytest.mark.parametrize("stored, sanitized", [
    # metrics: kept to 0.001, the precision of the book's tables
    ("| kl | 0.989 | 0.981 | 0.993 |", "| kl | 0.989 | 0.981 | 0.993 |"),
    ("pro: best alpha 0.9 (0.9816); KL only: 0.98154", "pro: best alpha 0.9 (0.981); KL only: 0.981"),
    ("pixel_auroc: KL - RGB = +0.0011", "pixel_auroc: KL - RGB = +0.001"),
    # ... and to four significant digits: a loss or a ratio is not pinned to 1e-5 of its value
    ("| gradient denoising | 0.180 | 15.4768 | 62.020 | 107.2485 | 7.562 |",
     "| gradient denoising | 0.180 | 15.47 | 62.02 | 107.2 | 7.562 |"),
    ("loss 1234.56, 98.9 / 100.0, KL up to 17.73", "loss 1234, 98.9 / 100.0, KL up to 17.73"),
    ("| brick | 98.9 / 98.1 / 99.3 | (93.0, 81.5) | -18.2 |", "| brick | 98.9 / 98.1 / 99.3 | (93.0, 81.5) | -18.2 |"),
    ("<td style=\"padding: 0.15em 0.8em\">94.4</td>", "<td style=\"padding: 0.15em 0.8em\">94.4</td>"),
    ("Egyptian cat 0.79, tiger cat 0.09", "Egyptian cat 0.79, tiger cat 0.09"),
    ("lr 1.20e-04, 6.13e-05, eps=1e-05", "lr 1.20e-04, <1e-4, eps=1e-05"),
    ("largest |KL - (mismatch + weighted error)| = 1.81e-05 bits",
     "largest |KL - (mismatch + weighted error)| = <1e-4 bits"),
    ("<Figure size 1400x200 with 7 Axes>", "<Figure size 1400x200 with 7 Axes>"),
    ("552,970,006 parameters; 5 categories; 10 steps", "552,970,006 parameters; 5 categories; 10 steps"),
    # volatile text
    ("data /work/main/book/cache/builtin (5 categories); cache /work/main/book/cache",
     "data PATH (5 categories); cache PATH"),
    ("data /home/runner/work/diffad/diffad/book/cache/builtin (5 categories); cache /content/x/tmp",
     "data PATH (5 categories); cache PATH"),
    ("<function f at 0x7f3a2b10c040>", "<function f at 0xADDR>"),
    ("score: 100%|██████████| 12/12 [00:03<00:00,  3.91it/s]", "score: PROGRESS"),
    ("train brick:  40%|████      | 80/200 [01:02:03<1:33:04, 1.02s/it, loss=0.41]", "train brick:  PROGRESS"),
    ("37it [00:01, 30.1it/s]", "37it PROGRESS"),
    ("fitted in 12.3 s; est. 0.74 s/step, 2.1 h; 150 ms; 3.5 min", "fitted in N s; est. N s/step, N h; N ms; N min"),
    ("est. peak 11.3 GiB of 14.0 GiB; archive 5.26 GB", "est. peak N GiB of N GiB; archive 5.26 GB"),
])
def test_sanitizer(stored, sanitized):
    assert sanitize(stored) == sanitized


@pytest.mark.parametrize("one, other, equal", [
    ("pro 0.98165", "pro 0.98161", True),  # float noise below 0.001
    ("pro 0.98165", "pro 0.98065", False),
    ("| kl | 0.989 |", "| kl | 0.988 |", False),
    ("| brick | 98.9 / 98.1 / 99.3 |", "| brick | 98.9 / 98.2 / 99.3 |", False),
    ("KL - RGB = +0.0011", "KL - RGB = -0.0011", False),
    ("inside / outside 15.476, PaDiM loss 62.020", "inside / outside 15.479, PaDiM loss 62.028", True),
    ("inside / outside 15.476", "inside / outside 15.486", False),
    ("1.81e-05 bits", "2.6e-06 bits", True),
    ("1.81e-05 bits", "1.2e-04 bits", False),
    ("took 3.1 s, 12.3 GiB, [00:03<00:00, 3.91it/s]", "took 18 s, 9.0 GiB, [00:07<00:00, 1.51it/s]", True),
])
def test_what_compares_equal(one, other, equal):
    assert (sanitize(one) == sanitize(other)) is equal


# --------------------------------------------------------------------------- nbval itself


def nbval_skipped_keys(nbdime: bool = False) -> tuple[str, ...]:
    """The output keys and MIME types nbval does not compare, read from its IPyNbFile.__init__."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(IPyNbFile.__init__)))
    base = extra = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "self.skip_compare":
            if isinstance(node.value, ast.Tuple):
                base = ast.literal_eval(node.value)
            elif isinstance(node.value, ast.BinOp):
                extra = ast.literal_eval(node.value.right)
    assert base is not None and extra is not None, "nbval's IPyNbFile.__init__ changed: read it again"
    return base if nbdime else base + extra


def test_nbval_compares_tables_not_figures():
    skipped = nbval_skipped_keys()
    assert not {"text/plain", "text/markdown", "text/html", "text/latex", "stdout", "stderr", "data"} & set(skipped)
    assert {"image/png", "image/jpeg", WIDGET_VIEW, "execution_count", "metadata"} <= set(skipped)


def nbval_compare(test: list[dict], stored: list[dict]) -> bool:
    """nbval's own IPyNbCell.compare_outputs, with this sanitizer, on two lists of outputs."""
    cell = SimpleNamespace(colors=nocolors, format_output_compare=lambda *args: None,
                           parent=SimpleNamespace(skip_compare=nbval_skipped_keys(),
                                                  sanitize_patterns=OrderedDict(PATTERNS)))
    cell.sanitize = lambda s: IPyNbCell.sanitize(cell, s)
    as_nodes = lambda outputs: [nbformat.from_dict(o) for o in outputs]  # noqa: E731
    return IPyNbCell.compare_outputs(cell, as_nodes(test), as_nodes(stored))


def markdown_output(table: str) -> dict:
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/markdown": table, "text/plain": "<IPython.core.display.Markdown object>"}}


def test_nbval_compares_a_markdown_table_after_sanitizing():
    stored = [markdown_output("| method | pro |\n|---|---|\n| kl | 0.9816 |"),
              {"output_type": "stream", "name": "stdout", "text": "PRO 98.2\n"}]
    noise = [markdown_output("| method | pro |\n|---|---|\n| kl | 0.9819 |"),
             {"output_type": "stream", "name": "stdout", "text": "PRO 98.2\n"}]
    changed = [markdown_output("| method | pro |\n|---|---|\n| kl | 0.9826 |"), stored[1]]
    percent = [stored[0], {"output_type": "stream", "name": "stdout", "text": "PRO 98.3\n"}]
    assert nbval_compare(noise, stored)
    assert not nbval_compare(changed, stored)
    assert not nbval_compare(percent, stored)
    png = dict(stored[0], data={**stored[0]["data"], "image/png": "iVBORw0KGgo="})
    assert nbval_compare([png, stored[1]], [dict(png, data={**png["data"], "image/png": "AAAA"}), stored[1]])


def jitter(text: str) -> str:
    """Float noise: every digit after a number's third decimal changed."""
    return re.sub(r"(\d\.\d{3})(\d+)", lambda m: m.group(1) + "".join(str((int(d) + 7) % 10) for d in m.group(2)),
                  text)


COMPARED = [(name, number, cell) for name, number, cell in code_cells()
            if not not_compared(cell) and any(METRIC.search(t) or re.search(r"\d\.\d{4}", t)
                                              for t in output_texts(cell))]


@pytest.mark.parametrize("name, number, cell", COMPARED, ids=[f"{n}::Cell {i}" for n, i, _ in COMPARED])
def test_the_book_outputs_survive_float_noise(name, number, cell):
    """nbval passes a stored output against itself with noise past the third decimal."""
    stored = cell["outputs"]
    noisy = json.loads(jitter(json.dumps(stored)))
    assert nbval_compare(noisy, stored), f"{name} cell {number}"


def with_first_decimal_changed(outputs: list[dict]) -> list[dict] | None:
    """The outputs with the first decimal digit of their first printed number changed, or None."""
    changed = json.loads(json.dumps(outputs))
    for output in changed:
        fields = [(output, "text")] if output["output_type"] == "stream" else [
            (output["data"], key) for key in output.get("data", {}) if key.startswith("text/")]
        for holder, key in fields:
            match = re.search(r"\d\.(\d)", holder[key])
            if match:
                digit = str((int(match.group(1)) + 1) % 10)
                holder[key] = holder[key][: match.start(1)] + digit + holder[key][match.end(1):]
                return changed
    return None


def test_the_book_pins_its_metrics():
    """The chapters' metric tables and prints are compared: a change at 0.1 fails."""
    pinned = [(name, number, cell) for name, number, cell in COMPARED
              if any(METRIC.search(t) for t in output_texts(cell, widgets=False))]
    assert len(pinned) >= 25, [(name, number) for name, number, _ in pinned]
    for name, number, cell in pinned:
        changed = with_first_decimal_changed(cell["outputs"])
        if changed is not None:
            assert not nbval_compare(changed, cell["outputs"]), f"{name} cell {number}"
