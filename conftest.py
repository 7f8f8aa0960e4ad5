"""pytest set-up for the whole repository (tests/ and the chapters nbval runs from book/).

The test command runs two pytest-xdist workers (``-n 2`` in pyproject.toml). The chapters run in
order on one worker, followed by the tests that read the cache they fill; the other worker takes
the unit tests as they come. Each worker gets its share of the cores as torch threads.

Why one thread each on two cores: 20 cpu-preset UNet passes take 6.8 s with two threads and 10.6 s
with one (a second thread gives 1.55x, not 2x). Two processes at once take 19.6 s each with two
threads each (slower than 13.6 s one after the other) and 11.0 s each with one thread each. The
rest of the work (Python, NumPy, kernel start-up) runs on one thread anyway.
"""

import os

import pytest

BOOK_GROUP = "book"  # the scheduling unit of the chapters and of the tests that read their cache
# The test modules marked ``after_chapters``: xdist's controller schedules by node id and cannot
# read markers, so these modules go whole to the chapters' worker (a marked test elsewhere is an error).
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


def runs_with_the_chapters(nodeid: str) -> bool:
    """Whether a test (by node id, relative to the repository) runs in the chapters' worker."""
    path = nodeid.split("::", 1)[0]
    return path.endswith(".ipynb") or path in AFTER_CHAPTERS_MODULES


def pytest_collection_modifyitems(config, items):
    """Every notebook cell nbval collects is in the slow tier, like retraining and the book build;
    tests marked ``after_chapters`` run last, after the chapters have filled book/cache."""
    for item in items:
        if is_chapter(item):
            item.add_marker(pytest.mark.slow)
        elif item.get_closest_marker("after_chapters") is not None and not runs_with_the_chapters(item.nodeid):
            raise pytest.UsageError(f"{item.nodeid} is marked after_chapters: add its module to "
                                    f"AFTER_CHAPTERS_MODULES in conftest.py so that it runs in the chapters' worker")
    items.sort(key=lambda item: item.get_closest_marker("after_chapters") is not None)  # stable


def chapters_together_scheduler(config, log=None):
    """xdist's scope scheduling with one scope for the chapters and the after_chapters modules (in
    collection order: the chapters, then those tests) and one per other test. The chapters' scope
    is the largest, so xdist hands it out first."""
    from xdist.scheduler import LoadScopeScheduling

    class ChaptersTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return BOOK_GROUP if runs_with_the_chapters(nodeid) else nodeid

    return ChaptersTogether(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The chapters' scheduling for ``-n N`` with xdist's default ``--dist load``; another ``--dist``
    as asked."""
    if config.getvalue("dist") != "load":
        return None
    return chapters_together_scheduler(config, log)
