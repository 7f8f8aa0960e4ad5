"""Where a clean build of the book spends its time: chapter by chapter and by kind of work.

    python benchmarks/profile_book.py [CHAPTER ...] [--cache DIR] [--json OUT] [--interval 0.02]
    python benchmarks/profile_book.py --compare BEFORE.json AFTER.json


Runs each chapter's code cells in order, in this process (an IPython shell, as a kernel would,
with a fresh namespace per chapter and the working directory ``book/``), against an empty cache
(a new temporary folder unless ``--cache`` names one: pass the same folder twice to time an
unchanged rebuild). A sampling thread reads the main thread's stack every ``--interval`` seconds
and files the sample under one kind of work (``KINDS``): training, data building and the
bootstrap are filed by their outermost frame (a training step's UNet pass is training); the other
kinds by the innermost frame that names one (a PaDiM fit's backbone pass is a backbone pass).
Prints a table of seconds per chapter and kind, and writes it as JSON for a before/after ratio;
``--compare`` prints that ratio (after / before) from two such files, by chapter and by kind.
Whole-process figures (min/median/max over runs) come from timing ``jupyter-book build .``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (kind, test on one frame's (file, qualified function name)); "outer" kinds win wherever they are
# on the stack: ImageBootstrap's methods and the paired intervals are "bootstrap", not PRO or AUROC.
OUTER = (
    ("training", lambda f, n: f.endswith("diffad/train.py") and n == "fit"),
    ("data building", lambda f, n: "/diffad/data/" in f and n.startswith("make_")),
    ("bootstrap", lambda f, n: "bootstrap" in n.lower() or "ImageBootstrap" in n),
)
INNER = (
    ("UNet passes", lambda f, n: f.endswith("diffad/models/unet.py")),
    ("backbone passes", lambda f, n: f.endswith("diffad/backbones.py") or "/timm/" in f),
    ("PatchCore coreset", lambda f, n: f.endswith("patchcore.py") and n.startswith("greedy_coreset")),
    ("baselines (fit/predict)", lambda f, n: "/diffad/baselines/" in f),
    ("PRO", lambda f, n: f.endswith("diffad/metrics.py") and "pro" in n),
    ("AUROC and other metrics", lambda f, n: f.endswith("diffad/metrics.py") or "/sklearn/metrics/" in f),
    ("figures", lambda f, n: "/matplotlib/" in f or "/PIL/PngImagePlugin" in f),
    ("reading images", lambda f, n: "/PIL/" in f or "/imageio/" in f or n in ("load_image", "read_image")),
    ("loading checkpoints", lambda f, n: "torch/serialization" in f),
    ("imports", lambda f, n: "<frozen importlib" in f),
)
KINDS = [k for k, _ in OUTER] + [k for k, _ in INNER] + ["other"]


def classify(stack: list[tuple[str, str]]) -> str:
    """The kind of work of one sample; ``stack`` lists (file, qualified name) from the innermost frame out."""
    for kind, test in OUTER:
        if any(test(f, n) for f, n in stack):
            return kind
    for f, n in stack:
        for kind, test in INNER:
            if test(f, n):
                return kind
    return "other"


class Sampler:
    """Samples the main thread's stack on a timer and counts the seconds per kind."""

    def __init__(self, interval: float):
        self.interval, self.counts, self._stop = interval, Counter(), threading.Event()
        self.where = Counter()  # seconds per (kind, innermost diffad function): what a kind is made of
        self._main = threading.main_thread().ident

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            frame = sys._current_frames().get(self._main)
            stack = []
            while frame is not None:
                stack.append((frame.f_code.co_filename, frame.f_code.co_qualname))
                frame = frame.f_back
            kind = classify(stack)
            self.counts[kind] += now - last  # the elapsed time, not the nominal interval
            inner = next((f"{Path(f).stem}.{n}" for f, n in stack if "/diffad/" in f), "-")
            self.where[kind, inner] += now - last
            last = now

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_chapter(shell, path: Path, interval: float) -> dict:
    """Runs one notebook's code cells in ``shell`` and returns its wall time and seconds per kind."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    shell.reset(new_session=True)
    shell.run_cell("import matplotlib; matplotlib.use('Agg')", store_history=False)
    start = time.perf_counter()
    with Sampler(interval) as sampler:
        for index, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
            result = shell.run_cell(cell.source, store_history=False)
            if not result.success:
                raise RuntimeError(f"{path.name}: code cell {index + 1} failed: {result.error_in_exec!r}")
            import matplotlib.pyplot as plt

            plt.close("all")
    wall = time.perf_counter() - start
    kinds = {k: round(v, 1) for k, v in sampler.counts.items()}
    top = [f"{kind}: {inner} {seconds:.1f}" for (kind, inner), seconds in sampler.where.most_common(8)]
    return {"chapter": path.stem, "wall_s": round(wall, 1), "kinds": kinds, "top": top}


def table(rows: list[dict]) -> str:
    used = [k for k in KINDS if any(r["kinds"].get(k, 0) >= 0.5 for r in rows)]
    lines = ["| chapter | wall s | " + " | ".join(used) + " |", "|---" * (len(used) + 2) + "|"]
    for r in rows + [{"chapter": "total", "wall_s": round(sum(r["wall_s"] for r in rows), 1),
                      "kinds": {k: round(sum(r["kinds"].get(k, 0) for r in rows), 1) for k in used}}]:
        lines.append(f"| {r['chapter']} | {r['wall_s']:.0f} | "
                     + " | ".join(f"{r['kinds'].get(k, 0):.0f}" for k in used) + " |")
    return "\n".join(lines)


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}" if before >= 0.5 else "-"


def compare(before: list[dict], after: list[dict]) -> str:
    """Seconds before and after, and their ratio, by chapter and by kind of work (two profiles
    measured on the same machine): markdown."""
    old = {r["chapter"]: r for r in before}
    lines = ["| chapter | before s | after s | after / before |", "|---|---|---|---|"]
    for r in after:
        was = old.get(r["chapter"], {}).get("wall_s", 0.0)
        lines.append(f"| {r['chapter']} | {was:.0f} | {r['wall_s']:.0f} | {_ratio(was, r['wall_s'])} |")
    total_before = sum(old[r["chapter"]]["wall_s"] for r in after if r["chapter"] in old)
    total_after = sum(r["wall_s"] for r in after)
    lines.append(f"| total | {total_before:.0f} | {total_after:.0f} | {_ratio(total_before, total_after)} |")
    lines += ["", "| kind of work | before s | after s | after / before |", "|---|---|---|---|"]
    for kind in KINDS:
        was = sum(r["kinds"].get(kind, 0) for r in before)
        now = sum(r["kinds"].get(kind, 0) for r in after)
        if max(was, now) >= 0.5:
            lines.append(f"| {kind} | {was:.0f} | {now:.0f} | {_ratio(was, now)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="e.g. 10_table1 (default: every chapter in _toc.yml)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="print after/before ratios from two --json files, and profile nothing")
    parser.add_argument("--cache", help="the book's cache folder (default: a new, empty one)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(path).read_text())["rows"] for path in args.compare)
        print(compare(before, after))
        return

    sys.path.insert(0, str(ROOT))  # this checkout's diffad, installed or not
    from diffad.studies.book import chapters

    names = chapters(ROOT)
    if args.chapters:
        names = [n for n in names if any(Path(n).name.startswith(c) for c in args.chapters)]
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="diffad-book-cache-"))
    os.environ["DIFFAD_CACHE"] = str(cache.resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT / "book")

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    rows = []
    for name in names:
        row = run_chapter(shell, ROOT / f"{name}.ipynb", args.interval)
        rows.append(row)
        print(f"{row['chapter']}: {row['wall_s']:.0f} s  {row['kinds']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"cache": str(cache), "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
