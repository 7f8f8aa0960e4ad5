"""Build the book with its chapters executed several at a time (a Sphinx extension).

Jupyter Book 1 executes a book's notebooks one after another: ``jupyter-book build`` has no jobs
option, and a chapter spends much of its time in Python on one core (figures, metrics, the
bootstrap) while the other cores wait. ``_config.yml`` loads this module as a Sphinx extension
(``sphinx: extra_extensions``). Just before Sphinx reads the pages, it runs the chapters that
Jupyter Book would execute itself (those whose code cells its execution cache,
``_build/.jupyter_cache``, does not hold), ``diffad_book_jobs`` at a time, each kernel in the
chapter's folder with an equal share of the cores as torch threads, and stores each executed
notebook in that cache as Jupyter Book does. Jupyter Book then reads them from its cache: the
pages are the same, an unchanged rebuild executes nothing, and ``jupyter-book clean`` clears
them as before.

The chapters start longest first, by the seconds the last build here took (its record,
``_build/diffad_chapter_times.json``, with each chapter's and each code cell's seconds), else by
those in the repository (``diffad_chapter_times``, default ``book/chapter_times.json``, a copy of
such a record), else in the book's order: a long chapter started last would leave the other cores
idle at the end. A chapter whose notebook metadata names others under ``diffad: after:`` (chapter
14 reads chapter 11b's models) starts once they are done.

Chapters that run at once share diffad's cache (datasets, models, scored maps) through its locks
(:func:`diffad.io.exclusive`): what one builds, another waits for and reads. A chapter that fails
here is not stored, so Jupyter Book runs it again itself and reports the error as it always does.

``diffad_book_jobs`` (``sphinx: config:`` in ``_config.yml``), else ``$DIFFAD_BOOK_JOBS``, else
the machine's cores, at most :data:`MAX_JOBS`; 1 leaves execution to Jupyter Book alone.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path, PurePosixPath

MAX_JOBS = 4  # a chapter's kernel peaks at 0.9-1.4 GB: four fit a laptop
RECORD_NAME = "diffad_chapter_times.json"  # each build's times, in _build beside the html
TIMES_HINT = "book/chapter_times.json"  # a clean build's order: a copy of a record, in the repository


def book_jobs(configured=None, environ=None) -> int:
    """How many chapters run at once: ``configured``, else ``$DIFFAD_BOOK_JOBS``, else the cores
    (at most :data:`MAX_JOBS`)."""
    environ = os.environ if environ is None else environ
    value = configured if configured is not None else environ.get("DIFFAD_BOOK_JOBS")
    if value is None or value == "":
        return max(1, min(MAX_JOBS, os.cpu_count() or 1))
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip().lstrip("-").isdigit())
    if not whole:
        raise ValueError(f"diffad_book_jobs / DIFFAD_BOOK_JOBS must be a whole number, got {value!r}")
    jobs = int(value)
    if jobs < 1:
        raise ValueError(f"diffad_book_jobs / DIFFAD_BOOK_JOBS must be at least 1, got {jobs}")
    return jobs


def threads_per_chapter(jobs: int, cores: int | None = None) -> int:
    """Torch threads for each of ``jobs`` kernels running at once: an equal share of the cores."""
    return max(1, (cores or os.cpu_count() or 1) // jobs)


def _share_threads(threads: int) -> None:
    """In a worker before its kernel starts: the kernel inherits these (unless already set)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))


def _execute(path: str, timeout: int | None, allow_errors: bool):
    """Execute one notebook in its folder; (executed notebook or None, seconds, error text, seconds
    of each code cell in order)."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution

    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    saved = [cell.metadata.get("execution") for cell in code]
    result = single_nb_execution(notebook, cwd=str(Path(path).parent), timeout=timeout,
                                 allow_errors=allow_errors, meta_override=True, record_timing=True)
    cells = cell_seconds(notebook)
    for cell, timing in zip(code, saved):  # the cache matches a chapter by its cells' metadata too
        cell.metadata.pop("execution", None)
        if timing is not None:
            cell.metadata["execution"] = timing
    if result.err is not None:
        return None, result.time, f"{type(result.err).__name__}: {result.err}", cells
    return nbformat.writes(notebook), result.time, None, cells


def cell_seconds(notebook) -> list[float]:
    """Seconds each code cell of an executed notebook took (nbclient's timing record; 0 where none)."""
    from datetime import datetime

    seconds = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        timing = cell.metadata.get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and end:
            seconds.append(round((datetime.fromisoformat(end.replace("Z", "+00:00"))
                                  - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds(), 2))
        else:
            seconds.append(0.0)
    return seconds


def chapter_name(path) -> str:
    """A chapter's name in the times and the ``after`` lists: its file name without the suffix."""
    return Path(path).stem


def chapters_read_first(path) -> list[str]:
    """The chapters whose results this one reads (its notebook metadata's ``diffad: after:``): run
    before it, not beside it, where the build or the tests could otherwise start both at once and
    leave one core waiting on the other's locks."""
    import json

    metadata = json.loads(Path(path).read_text()).get("metadata", {})
    return list(metadata.get("diffad", {}).get("after", []))


def read_times(*files) -> dict[str, float]:
    """Seconds per chapter from the first of ``files`` that exists (a build's record, as
    :func:`execute_chapters` writes it): the hint that orders the next build."""
    import json

    for file in files:
        if file is not None and Path(file).is_file():
            chapters = json.loads(Path(file).read_text()).get("chapters", {})
            return {name: float(entry["seconds"]) for name, entry in chapters.items()}
    return {}


def next_chapter(waiting: list[str], running: list[str], expected: dict[str, float],
                 read_first=chapters_read_first) -> str | None:
    """The chapter to start now, of those ``waiting`` whose ``read_first`` chapters (by default
    :func:`chapters_read_first`, read from the notebook) are neither waiting nor ``running`` (done,
    or not built this time): the one expected to take longest, so that a long chapter does not start
    last while the other cores go idle. A chapter without a time counts as the median one; ties go
    in the book's order. None while no chapter is ready."""
    known = sorted(expected[chapter_name(p)] for p in waiting if chapter_name(p) in expected)
    median = known[len(known) // 2] if known else 0.0
    busy = {chapter_name(p) for p in (*waiting, *running)}
    ready = [p for p in waiting if not busy.intersection(read_first(p))]
    if not ready:
        return None
    return max(ready, key=lambda p: expected.get(chapter_name(p), median))


def chapters_to_execute(cache, paths, exclude_patterns=()) -> list[str]:
    """The notebooks among ``paths`` that Jupyter Book would execute: not excluded from execution
    and without a record of their code in the execution cache."""
    import nbformat

    pending = []
    for path in paths:
        if any(PurePosixPath(Path(path).as_posix()).match(pattern) for pattern in exclude_patterns):
            continue
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            pending.append(str(path))
    return pending


def execute_chapters(cache, paths: list[str], jobs: int, timeout: int | None = None, allow_errors: bool = False,
                     log=print, expected: dict[str, float] | None = None, record=None) -> dict[str, str]:
    """Execute ``paths`` ``jobs`` at a time, in the order :func:`next_chapter` picks from the
    ``expected`` seconds, and store each that succeeds in the jupyter-cache ``cache``; returns
    {path: error} for those that failed (left for Jupyter Book to run again). ``record``, a JSON
    file, receives the seconds of each chapter and of each of its code cells."""
    import nbformat
    from jupyter_cache.base import CacheBundleIn

    expected = expected or {}
    after = {path: chapters_read_first(path) for path in paths}  # each notebook read once, not per pick
    failed, times = {}, {}
    waiting, running = list(paths), {}
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(jobs, initializer=_share_threads,
                                                initargs=(threads_per_chapter(jobs),)) as pool:
        while waiting or running:
            while len(running) < jobs and waiting:
                path = next_chapter(waiting, list(running.values()), expected, after.__getitem__)
                if path is None and running:
                    break
                path = path or waiting[0]  # chapters that name each other as read first: the book's order
                waiting.remove(path)
                running[pool.submit(_execute, path, timeout, allow_errors)] = path
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                path = running.pop(future)
                try:
                    executed, seconds, error, cells = future.result()
                except Exception as exception:  # the worker itself failed (a kernel that would not start)
                    executed, seconds, error, cells = None, 0.0, f"{type(exception).__name__}: {exception}", []
                times[chapter_name(path)] = {"seconds": round(seconds, 1), "cells": cells}
                if error is not None:
                    failed[path] = error
                    log(f"{Path(path).name} failed after {seconds:.1f} s ({error}); Jupyter Book runs it again")
                    continue
                cache.cache_notebook_bundle(CacheBundleIn(nbformat.reads(executed, as_version=4), path,
                                                          data={"execution_seconds": seconds}),
                                            check_validity=False, overwrite=True)
                log(f"executed {Path(path).name} in {seconds:.1f} s")
    wall = time.perf_counter() - start
    log(f"{len(paths)} chapters, {jobs} at a time: {wall:.1f} s")
    if record is not None:
        _write_record(Path(record), times, jobs, wall)
    return failed


def _write_record(path: Path, times: dict, jobs: int, wall: float) -> None:
    """The build's times (JSON), over those of the chapters an earlier build ran and this one did not."""
    import json

    from diffad.io import atomic_write

    chapters = json.loads(path.read_text()).get("chapters", {}) if path.is_file() else {}
    chapters.update(times)
    record = {"jobs": jobs, "threads_each": threads_per_chapter(jobs), "last_wall_seconds": round(wall, 1),
              "chapters": dict(sorted(chapters.items()))}
    atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())


def _execute_before_reading(app, env, docnames) -> None:
    """Sphinx's env-before-read-docs: run the chapters about to be read that need executing."""
    from jupyter_cache import get_cache
    from sphinx.util import logging

    config = getattr(env, "mystnb_config", None)
    if config is None or config.execution_mode != "cache":
        return
    jobs = book_jobs(app.config.diffad_book_jobs)
    paths = [str(env.doc2path(name)) for name in docnames if str(env.doc2path(name)).endswith(".ipynb")]
    cache = get_cache(config.execution_cache_path)
    pending = chapters_to_execute(cache, paths, config.execution_excludepatterns)
    if jobs < 2 or len(pending) < 2:
        return
    logger = logging.getLogger(__name__)
    logger.info(f"diffad: executing {len(pending)} chapters, {jobs} at a time, "
                f"{threads_per_chapter(jobs)} torch thread(s) each")
    record = Path(app.outdir).parent / RECORD_NAME
    expected = read_times(record, Path(app.srcdir) / app.config.diffad_chapter_times)
    execute_chapters(cache, pending, jobs, config.execution_timeout, config.execution_allow_errors,
                     log=lambda line: logger.info(f"diffad: {line}"), expected=expected, record=record)


def setup(app):
    """Sphinx's entry point."""
    app.add_config_value("diffad_book_jobs", None, "env")
    app.add_config_value("diffad_chapter_times", TIMES_HINT, "env")
    app.connect("env-before-read-docs", _execute_before_reading, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
