"""pytest set-up for the whole repository (tests/ and the chapters nbval runs from book/).

The test command runs two pytest-xdist workers (``-n 2`` in pyproject.toml). Each chapter is one
unit of work (its cells run in order, in one kernel, on one worker). Work goes out to whichever
worker is free in this order (``run_order``): the slow unit tests, the chapters in the book's
order, the quick unit tests, then the tests that read the cache the chapters filled. Chapters that
run at once share book/cache through diffad's locks (``diffad.io.exclusive``): what one builds,
the other waits for and reads. Each worker gets its share of the cores as torch threads.

Why one thread each on two cores: 20 cpu-preset UNet passes take 6.8 s with two threads and 10.6 s
with one (a second thread gives 1.55x, not 2x). Two processes at once take 19.6 s each with two
threads each (slower than 13.6 s one after the other) and 11.0 s each with one thread each. The
rest of the work (Python, NumPy, kernel start-up) runs on one thread anyway.
"""

import functools
import os
from pathlib import Path

import pytest

AFTER_CHAPTERS = "after chapters"  # the scheduling unit of the tests that read the chapters' cache
# The test modules marked ``after_chapters``: xdist's controller schedules by node id and cannot
# read markers, so these modules are named here (a marked test elsewhere is an error).
AFTER_CHAPTERS_MODULES = ("tests/test_portability.py",)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by nbval's kernels too: no hub there either


def _cores() -> int:
    """The cores this process may run on (a container's CPU affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int) -> int:
    """Torch threads for each of ``workers`` pytest-xdist workers on ``cores`` cores: an equal share, at least one."""
    return max(1, cores // max(1, workers))


def _share_the_cores() -> None:
    """In an xdist worker, set the thread variables (a user's own setting wins) before torch is
    imported; nbval's kernels and the tests' subprocesses inherit them."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = str(threads_per_worker(int(workers), _cores()))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, threads)


_share_the_cores()


def is_chapter(item: pytest.Item) -> bool:
    """Whether an item is a notebook cell that nbval collected from a chapter."""
    return str(item.fspath).endswith(".ipynb")


def scheduling_scope(nodeid: str) -> str:
    """The unit of work a test belongs to (by node id, relative to the repository): its chapter for
    a notebook cell (or the chapter its notebook names first under ``diffad: after:``, which computes
    what it reads: one worker runs both, that one first, rather than two at once with one waiting on
    the other's locks), one unit for the after_chapters modules, itself for any other test."""
    path = nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        return _chapter_scope(path)
    return AFTER_CHAPTERS if path in AFTER_CHAPTERS_MODULES else nodeid


@functools.lru_cache(maxsize=None)
def _chapter_scope(path: str) -> str:
    from diffad.studies.book_build import chapters_read_first

    notebook = Path(__file__).parent / path
    first = chapters_read_first(notebook) if notebook.is_file() else []
    return str(Path(path).with_name(first[0] + ".ipynb")) if first else path


def run_order(item: pytest.Item) -> int:
    """Where an item goes in the run: the slow tests first (retraining a shipped model takes 330 s
    on one thread: started last, it would leave a worker alone with it at the end), then the
    chapters in the book's order, then the quick unit tests, then the tests marked
    ``after_chapters`` (test_portability runs two threads: it should find the other worker idle)."""
    if is_chapter(item):
        return 1
    if item.get_closest_marker("after_chapters") is not None:
        return 3
    return 0 if item.get_closest_marker("slow") is not None else 2


def pytest_collection_modifyitems(config, items):
    """Every notebook cell nbval collects is in the slow tier, like retraining and the book build;
    the items are sorted by ``run_order``: the tests marked ``after_chapters`` last, once book/cache
    is filled."""
    for item in items:
        if is_chapter(item):
            item.add_marker(pytest.mark.slow)
        elif item.get_closest_marker("after_chapters") is not None and scheduling_scope(item.nodeid) != AFTER_CHAPTERS:
            raise pytest.UsageError(f"{item.nodeid} is marked after_chapters: add its module to "
                                    f"AFTER_CHAPTERS_MODULES in conftest.py so that it is scheduled after the chapters")
    items.sort(key=run_order)  # stable: the chapters in the book's order, their cells in order


def chapter_scheduler(config, log=None):
    """xdist's scope scheduling with one scope per chapter, one for the after_chapters modules and
    one per other test, handed out in ``run_order`` (the collection's order) rather than largest first."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep run_order

    class ChapterByChapter(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_scope(nodeid)

    return ChapterByChapter(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The chapters' scheduling for ``-n N`` with xdist's default ``--dist load``; another ``--dist``
    as asked."""
    if config.getvalue("dist") != "load":
        return None
    return chapter_scheduler(config, log)
