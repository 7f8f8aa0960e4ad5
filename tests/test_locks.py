"""One cache, several processes: what one builds (a file, a dataset, a model) the others wait for
and read (diffad.io.exclusive, computed_once), instead of building it again or over it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffad.io import atomic_write, computed_once, exclusive, lock_file

# A process that computes ``path`` once through computed_once; its compute says it started, waits
# for the test's "go" file, then records that it ran. It prints what it returned.
COMPUTE = """
import json, sys, time
from pathlib import Path
from diffad.io import computed_once
path, marks = Path(sys.argv[1]), Path(sys.argv[2])
def compute():
    (marks / "started").touch()
    while not (marks / "go").exists():
        time.sleep(0.02)
    with open(marks / "computed", "a") as handle:
        handle.write("once\\n")
    return {"value": 42}
def save(value, path):
    path.write_text(json.dumps(value))
print(computed_once(path, compute, lambda p: json.loads(p.read_text()), save, "computing the answer"))
"""


def start(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_of_two_processes_asking_at_once_one_computes_and_the_other_waits_and_reads(tmp_path):
    target, marks = tmp_path / "cache" / "answer.json", tmp_path / "marks"
    marks.mkdir()
    first = start(COMPUTE, target, marks)
    wait_for(marks / "started", first)  # the first holds the lock and is computing
    second = start(COMPUTE, target, marks)
    # the second says that it waits (on its stderr), then blocks on the lock
    said = [second.stderr.readline() for _ in range(1)]
    while "waiting" not in said[-1] and said[-1]:
        said.append(second.stderr.readline())
    assert said[-1].startswith("diffad: waiting for another process computing the answer"), said
    assert second.poll() is None and not (marks / "computed").exists()
    (marks / "go").touch()
    outs = [process.communicate(timeout=60) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outs
    assert (marks / "computed").read_text() == "once\n"
    assert [out.strip() for out, _ in outs] == ["{'value': 42}"] * 2
    assert json.loads(target.read_text()) == {"value": 42}


def test_a_computed_file_is_read_without_computing(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("7")

    def compute():
        raise AssertionError("computed although the file is there")

    assert computed_once(target, compute, lambda p: json.loads(p.read_text()), None, "x") == 7


def test_a_failed_computation_writes_nothing_and_releases_the_lock(tmp_path):
    target = tmp_path / "x.pt"

    def fail():
        raise RuntimeError("out of memory, say")

    with pytest.raises(RuntimeError, match="out of memory"):
        computed_once(target, fail, torch.load, torch.save, "x")
    assert not target.exists()
    assert computed_once(target, lambda: 3, torch.load, torch.save, "x") == 3  # the lock is free again


def test_one_process_may_nest_the_same_lock(tmp_path):
    with exclusive(tmp_path / "model", "outer"):
        with exclusive(tmp_path / "model", "inner"):  # trained_model holds it around fit, which takes it
            pass


def test_lock_files_live_outside_the_cache_one_per_path(tmp_path):
    a, b = lock_file(tmp_path / "cache" / "a.pt"), lock_file(tmp_path / "cache" / "b.pt")
    assert a != b and a.parent == b.parent and tmp_path not in a.parents
    assert lock_file(tmp_path / "cache" / "a.pt") == a
    with exclusive(tmp_path / "cache" / "a.pt", "a"):
        pass
    assert not (tmp_path / "cache").exists()  # nothing written beside what the lock guards


def test_a_filesystem_without_locks_runs_the_block_unlocked(tmp_path, monkeypatch):
    import filelock

    def unsupported(self, *args, **kwargs):
        raise NotImplementedError("FileSystem does not appear to support flock")

    monkeypatch.setattr(filelock.FileLock, "acquire", unsupported)
    ran = []
    with exclusive(tmp_path / "no-flock-here", "x"):
        ran.append(1)
    assert ran == [1]


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    data = b"weights" * 1000
    written = atomic_write(tmp_path / "out" / "model.pt", data)
    assert written.read_bytes() == data
    assert [p.name for p in written.parent.iterdir()] == ["model.pt"]


BUILD = """
import sys
from diffad.data import make_builtin_dataset
make_builtin_dataset(sys.argv[1], seed=0, image_size=32, n_train=6, n_test_good=2, n_test_per_defect=1,
                     categories=["brick"])
"""


def test_two_processes_building_one_dataset_both_get_it_whole(tmp_path):
    from diffad.data.builtin import MANIFEST_NAME

    processes = [start(BUILD, tmp_path / "builtin") for _ in range(2)]
    outs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outs
    folder = tmp_path / "builtin" / "brick"
    files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert files and all((folder / name).is_file() for name in files)
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == ["brick"]  # no staging left over


# A process that holds the lock of a folder until the test's "go" file appears, then finishes
# what it was making: the payload file copied into the folder.
HOLD = """
import shutil, sys, time
from pathlib import Path
from diffad.io import exclusive
folder, marks, payload = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with exclusive(folder, "building"):
    (marks / "holding").touch()
    while not (marks / "go").exists():
        time.sleep(0.02)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(payload, folder / payload.name)
"""


def test_fit_waits_for_a_run_into_its_folder_and_loads_that_model(tmp_path, tiny_builtin, tiny_preset,
                                                                   tiny_model):
    import threading

    from diffad.train import fit

    out, marks = tmp_path / "run", tmp_path / "marks"
    out.mkdir(), marks.mkdir()
    tiny_model.save(marks / "model.pt")
    holder = start(HOLD, out, marks, marks / "model.pt")  # a run into the folder that finishes meanwhile
    wait_for(marks / "holding", holder)
    threading.Timer(1.0, (marks / "go").touch).start()  # the other run finishes a second from now
    loaded = fit(tiny_builtin, "brick", out, tiny_preset, progress=False)
    assert holder.wait(timeout=60) == 0
    for name, tensor in tiny_model.unet.state_dict().items():  # its model, not one trained here
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]


def test_build_each_takes_the_free_paths_first_then_waits_for_the_one_another_builds(tmp_path):
    import threading

    from diffad.io import build_each

    root, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    (marks / "done").touch()
    holder = start(HOLD, root / "b", marks, marks / "done")
    wait_for(marks / "holding", holder)
    built = []

    def build(folder):
        built.append((folder.name, (marks / "go").exists()))
        folder.mkdir(parents=True)
        (folder / "done").touch()

    threading.Timer(1.0, (marks / "go").touch).start()
    build_each([root / name for name in "abc"], lambda folder: (folder / "done").is_file(), build, "building")
    assert holder.wait(timeout=60) == 0
    assert built == [("a", False), ("c", False)]  # both while the other process still held "b"
    assert all((root / name / "done").is_file() for name in "abc")
