"""diffad.process: a chapter's kernel and the diffad command exit without the last full collection."""

import subprocess
import sys

# runs after diffad's handler (atexit runs the last registered first): was the heap frozen by then?
REPORT = "import atexit, gc\natexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", REPORT + code], capture_output=True, text=True, check=True).stdout


def test_without_the_call_nothing_is_frozen_at_exit():
    assert "frozen at exit: False" in run("import diffad.process")


def test_the_heap_is_frozen_at_exit_and_the_handler_registered_once():
    code = ("import atexit\nfrom diffad.process import skip_final_collection\nbefore = atexit._ncallbacks()\n"
            "skip_final_collection(); skip_final_collection()\nprint('handlers added:', atexit._ncallbacks() - before)\n")
    out = run(code)
    assert "handlers added: 1" in out and "frozen at exit: True" in out


def test_the_diffad_command_exits_without_the_last_collection():
    out = run("from diffad.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n")
    assert "usage:" in out and "frozen at exit: True" in out


def test_a_chapters_setup_asks_for_it(monkeypatch, tmp_path):
    from diffad.studies import book

    calls = []
    monkeypatch.setattr(book, "skip_final_collection", lambda: calls.append(1))
    monkeypatch.setenv("DIFFAD_CACHE", str(tmp_path / "unused"))  # restored after the test: setup exports it
    book.setup("cpu", data_root=tmp_path, cache=tmp_path / "cache")
    assert calls == [1]
