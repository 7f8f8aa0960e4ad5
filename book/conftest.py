"""nbval's notebook cells under pytest: the slow tier, and all chapters in one pytest-xdist worker."""

import pytest


def pytest_itemcollected(item):
    """Every notebook cell is in the slow tier, like retraining and the book build (a hook of this
    folder's conftest sees only the cells under it)."""
    if item.path.suffix == ".ipynb":
        item.add_marker(pytest.mark.slow)


def pytest_xdist_make_scheduler(config, log):
    """pyproject's ``-n 2``: the chapters go to one worker as one unit, in the order of the book,
    so that they share book/cache (models, scores) without two chapters writing one file at once;
    each unit test is a unit of its own, spread over the workers. The largest unit, the chapters,
    is sent first. (Not ``--dist loadgroup``: pytest-xdist 3.8 renames a grouped test through
    ``Item._nodeid``, which pytest 9 no longer reads, so its groups come apart.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ChaptersTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "book" if nodeid.split("::", 1)[0].endswith(".ipynb") else nodeid

    return ChaptersTogether(config, log)
