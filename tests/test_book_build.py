"""diffad.studies.book_build: the chapters executed several at a time into Jupyter Book's own
execution cache, which Jupyter Book then reads instead of executing them one by one."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from diffad.studies import book_build

ROOT = Path(__file__).resolve().parents[1]


def notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_jobs_come_from_the_config_then_the_environment_then_the_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert book_build.book_jobs(3, {"DIFFAD_BOOK_JOBS": "2"}) == 3
    assert book_build.book_jobs(None, {"DIFFAD_BOOK_JOBS": "2"}) == 2
    assert book_build.book_jobs(None, {}) == book_build.MAX_JOBS
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert book_build.book_jobs(None, {"DIFFAD_BOOK_JOBS": ""}) == 2


@pytest.mark.parametrize("value", ["two", 0, "-1", 1.5])
def test_a_wrong_number_of_jobs_is_an_error_naming_the_setting(value):
    with pytest.raises(ValueError, match="diffad_book_jobs / DIFFAD_BOOK_JOBS"):
        book_build.book_jobs(value, {})


def test_each_chapter_gets_an_equal_share_of_the_cores():
    assert book_build.threads_per_chapter(2, 2) == 1
    assert book_build.threads_per_chapter(4, 16) == 4
    assert book_build.threads_per_chapter(4, 2) == 1


def test_the_longest_ready_chapter_starts_next_and_a_chapter_waits_for_what_it_reads(tmp_path):
    first, long, short, reader = (str(notebook(tmp_path / f"{name}.ipynb", "1"))
                                  for name in ("first", "long", "short", "reader"))
    reads_long = nbformat.read(reader, as_version=4)
    reads_long.metadata["diffad"] = {"after": ["long"]}
    nbformat.write(reads_long, reader)
    expected = {"first": 10.0, "long": 100.0, "short": 5.0, "reader": 500.0}
    waiting = [first, long, short, reader]
    assert book_build.chapters_read_first(reader) == ["long"] and book_build.chapters_read_first(first) == []
    assert book_build.next_chapter(waiting, [], expected) == long  # reader waits for long
    assert book_build.next_chapter([first, short, reader], [long], expected) == first
    assert book_build.next_chapter([short, reader], [long], expected) == short
    assert book_build.next_chapter([reader], [long], expected) is None  # nothing ready: wait
    assert book_build.next_chapter([reader], [], expected) == reader
    circular = nbformat.read(long, as_version=4)  # long and reader each read the other first
    circular.metadata["diffad"] = {"after": ["reader"]}
    nbformat.write(circular, long)
    assert book_build.next_chapter([long, reader], [], expected) is None
    from jupyter_cache import get_cache

    lines = []
    book_build.execute_chapters(get_cache(tmp_path / "cache"), [long, reader], jobs=2, timeout=120, log=lines.append)
    # one after the other in the book's order, not stuck
    assert [line.split(" in ")[0] for line in lines[:2]] == ["executed long.ipynb", "executed reader.ipynb"]
    # no times (a first build): the book's order; a chapter without one counts as the median
    assert book_build.next_chapter([first, long, short], [], {}) == first
    assert book_build.next_chapter([first, long, short], [], {"first": 1.0, "short": 9.0, "long": 3.0}) == short
    # long has no time: it counts as the median of the others, 9 here, and a tie goes in the book's order
    assert book_build.next_chapter([first, long, short], [], {"first": 1.0, "short": 9.0}) == long
    assert book_build.next_chapter([first, short, long], [], {"first": 1.0, "short": 9.0}) == short
    assert book_build.next_chapter([first, long, short], [], {"first": 4.0, "short": 0.5}) == first


def test_times_come_from_the_first_record_that_exists(tmp_path):
    import json

    hint = tmp_path / "hint.json"
    hint.write_text(json.dumps({"chapters": {"a": {"seconds": 3.5, "cells": [1.0, 2.5]}}}))
    assert book_build.read_times(tmp_path / "missing.json", hint) == {"a": 3.5}
    assert book_build.read_times(tmp_path / "missing.json") == {}


def test_chapters_run_at_once_are_stored_in_the_cache_and_a_failure_is_left_out(tmp_path):
    import json

    from jupyter_cache import get_cache

    cache = get_cache(tmp_path / ".jupyter_cache")
    first = notebook(tmp_path / "a.ipynb", "import os\nprint('a', 6 * 7)")
    second = notebook(tmp_path / "b.ipynb", "from pathlib import Path\nprint(Path.cwd().name)")
    broken = notebook(tmp_path / "c.ipynb", "1 / 0")
    saved = nbformat.read(second, as_version=4)  # a timing record from an earlier run, kept as it is
    saved.cells[0].metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    nbformat.write(saved, second)
    paths = book_build.chapters_to_execute(cache, [first, second, broken])
    assert paths == [str(first), str(second), str(broken)]
    lines = []
    record = tmp_path / "_build" / book_build.RECORD_NAME
    failed = book_build.execute_chapters(cache, paths, jobs=2, timeout=120, log=lines.append, record=record)
    assert list(failed) == [str(broken)] and "ZeroDivisionError" in failed[str(broken)], lines
    times = json.loads(record.read_text())["chapters"]
    assert sorted(times) == ["a", "b", "c"] and len(times["a"]["cells"]) == 1  # one code cell each
    assert book_build.read_times(record) == {name: times[name]["seconds"] for name in "abc"}
    assert book_build.chapters_to_execute(cache, [first, second, broken]) == [str(broken)]
    stored = cache.merge_match_into_notebook(nbformat.read(second, as_version=4))[1]
    assert stored.cells[0].outputs[0]["text"] == f"{tmp_path.name}\n"  # ran in the chapter's folder
    assert any("c.ipynb failed" in line for line in lines) and "3 chapters, 2 at a time" in lines[-1]


def test_a_chapter_excluded_from_execution_is_not_run(tmp_path):
    from jupyter_cache import get_cache

    cache = get_cache(tmp_path / ".jupyter_cache")
    path = notebook(tmp_path / "slow.ipynb", "print(1)")
    assert book_build.chapters_to_execute(cache, [path], ["*slow.ipynb"]) == []


@pytest.mark.slow
def test_jupyter_book_reads_the_chapters_from_the_cache_instead_of_running_them(tmp_path):
    source = tmp_path / "mini"
    source.mkdir()
    for name in ("one", "two"):
        notebook(source / f"{name}.ipynb", f"# {name}", f"print('{name} says', 20 + len('{name}'))")
    (source / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "one",
                                                     "chapters": [{"file": "two"}]}))
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    mini = {"title": "mini", "execute": config["execute"], "sphinx": {"extra_extensions":
            config["sphinx"]["extra_extensions"], "config": {"diffad_book_jobs": 2}}}
    (source / "_config.yml").write_text(yaml.safe_dump(mini))
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(source), "--path-output", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "diffad: executing 2 chapters, 2 at a time" in first.stdout
    assert "Executing notebook" not in first.stdout  # Jupyter Book ran neither itself
    assert first.stdout.count("Using cached notebook") == 2
    html = (tmp_path / "_build" / "html" / "two.html").read_text()
    assert "two says 23" in html
    (source / "two.ipynb").touch()  # read again, still cached: nothing runs
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0 and "diffad: executing" not in again.stdout
