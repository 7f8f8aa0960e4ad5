"""The test command's two xdist workers: each chapter's cells stay together and in order, the chapters go
out first and what reads their cache last, the cores are shared."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def root_conftest():
    spec = importlib.util.spec_from_file_location("diffad_root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeItem:
    """What the collection hook reads of a pytest item: its file, node id and markers."""

    def __init__(self, path: str, *markers):
        self.fspath, self.nodeid, self.markers = ROOT / path, f"{path}::test", list(markers)

    def add_marker(self, marker):
        self.markers.append(marker.mark)

    def get_closest_marker(self, name):
        return next((m for m in self.markers if m.name == name), None)


def test_threads_per_worker_shares_the_cores_and_keeps_at_least_one():
    share = root_conftest().threads_per_worker
    assert share(2, 2) == 1 and share(2, 8) == 4 and share(4, 2) == 1 and share(1, 2) == 2
    assert share(0, 2) == 2  # -n 0: one process, every core


def test_the_chapters_are_slow_and_what_reads_their_cache_comes_after_them():
    conftest = root_conftest()
    after = FakeItem("tests/test_portability.py", pytest.mark.after_chapters.mark)
    unit = FakeItem("tests/test_metrics.py")
    retraining = FakeItem("tests/test_quality.py", pytest.mark.slow.mark)
    chapters = [FakeItem("book/01_introduction.ipynb"), FakeItem("book/02_data.ipynb")]
    items = [unit, after, *chapters, retraining]
    conftest.pytest_collection_modifyitems(None, items)
    # the slow unit tests, the chapters in their order, the quick unit tests, after_chapters last
    assert items == [retraining, *chapters, unit, after]
    assert all(c.get_closest_marker("slow") for c in chapters)
    assert not unit.get_closest_marker("slow")


def test_an_after_chapters_test_outside_the_listed_modules_is_an_error():
    conftest = root_conftest()
    stray = FakeItem("tests/test_metrics.py", pytest.mark.after_chapters.mark)
    with pytest.raises(pytest.UsageError, match="AFTER_CHAPTERS_MODULES"):
        conftest.pytest_collection_modifyitems(None, [stray])


def test_each_chapter_is_one_scheduling_unit_handed_out_in_collection_order():
    conftest = root_conftest()

    class Config:  # what xdist's scheduler reads of the config: the workers asked for, the options
        class option:
            loadscopereorder = True

        def getvalue(self, name):
            return {"tx": ["popen"] * 2, "numprocesses": 2, "dist": "load"}.get(name)

    config = Config()
    scheduler = conftest.chapter_scheduler(config)
    assert config.option.loadscopereorder is False  # not largest first: run_order's order
    scopes = {nodeid: scheduler._split_scope(nodeid) for nodeid in (
        "book/01_introduction.ipynb::Cell 0", "book/01_introduction.ipynb::Cell 5",
        "book/14_scorecard.ipynb::Cell 7",
        "tests/test_portability.py::test_iterative_chapters_print_the_same_digits_on_another_configuration",
        "tests/test_metrics.py::test_pro[a]", "tests/test_metrics.py::test_pro[b]")}
    assert scopes["book/01_introduction.ipynb::Cell 0"] == scopes["book/01_introduction.ipynb::Cell 5"]
    assert scopes["book/01_introduction.ipynb::Cell 0"] != scopes["book/14_scorecard.ipynb::Cell 7"]
    # chapter 14 reads chapter 11b's unified model and PaDiMs (its metadata's diffad: after:): one unit
    assert scopes["book/14_scorecard.ipynb::Cell 7"] == scheduler._split_scope("book/11b_unified.ipynb::Cell 3")
    assert scopes["tests/test_portability.py::test_iterative_chapters_print_the_same_digits_on_another_configuration"] \
        == conftest.AFTER_CHAPTERS
    assert scopes["tests/test_metrics.py::test_pro[a]"] != scopes["tests/test_metrics.py::test_pro[b]"]


def test_an_xdist_worker_has_its_share_of_the_cores(monkeypatch):
    conftest = root_conftest()
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setattr(conftest, "_cores", lambda: 8)
    conftest._share_the_cores()
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting wins
    conftest._share_the_cores()
    assert os.environ["OMP_NUM_THREADS"] == "3"
