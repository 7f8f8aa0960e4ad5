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
    """Execute one notebook in its folder; (executed notebook or None, seconds, error text)."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution

    notebook = nbformat.read(path, as_version=4)
    result = single_nb_execution(notebook, cwd=str(Path(path).parent), timeout=timeout,
                                 allow_errors=allow_errors, meta_override=True)
    if result.err is not None:
        return None, result.time, f"{type(result.err).__name__}: {result.err}"
    return nbformat.writes(notebook), result.time, None


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
                     log=print) -> dict[str, str]:
    """Execute ``paths`` ``jobs`` at a time and store each that succeeds in the jupyter-cache
    ``cache``; returns {path: error} for those that failed (left for Jupyter Book to run again)."""
    import nbformat
    from jupyter_cache.base import CacheBundleIn

    failed = {}
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(jobs, initializer=_share_threads,
                                                initargs=(threads_per_chapter(jobs),)) as pool:
        futures = [pool.submit(_execute, path, timeout, allow_errors) for path in paths]
        for future, path in zip(futures, paths):  # in the order given
            try:
                executed, seconds, error = future.result()
            except Exception as exception:  # the worker itself failed (a kernel that would not start)
                executed, seconds, error = None, 0.0, f"{type(exception).__name__}: {exception}"
            if error is not None:
                failed[path] = error
                log(f"{Path(path).name} failed after {seconds:.1f} s ({error}); Jupyter Book runs it again")
                continue
            cache.cache_notebook_bundle(CacheBundleIn(nbformat.reads(executed, as_version=4), path,
                                                      data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)
            log(f"executed {Path(path).name} in {seconds:.1f} s")
    log(f"{len(paths)} chapters, {jobs} at a time: {time.perf_counter() - start:.1f} s")
    return failed


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
    execute_chapters(cache, pending, jobs, config.execution_timeout, config.execution_allow_errors,
                     log=lambda line: logger.info(f"diffad: {line}"))


def setup(app):
    """Sphinx's entry point."""
    app.add_config_value("diffad_book_jobs", None, "env")
    app.connect("env-before-read-docs", _execute_before_reading, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
