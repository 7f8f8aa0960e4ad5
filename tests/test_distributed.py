"""Several processes on the CPU (torchrun, gloo): one model over 2 ranks trains what one process
trains, a run resumes with another number of processes, a rank that dies or hangs stops the
others, and ``reproduce`` spreads the categories over the ranks.

Each torchrun start costs about 10 s on 2 cores (two interpreters importing torch); the
processes run with one thread each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from diffad import distributed
from diffad.evaluate import read_results_csv, reproduce
from diffad.train import CHECKPOINT_NAME, MODEL_NAME, fit

from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(**overrides) -> list[str]:
    return [arg for name, value in {**TINY_OVERRIDES, **overrides}.items() for arg in ("--set", f"{name}={value!r}")]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _torchrun(*args, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "diffad", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _train_args(root, out, *categories, **overrides) -> list:
    return ["train", "--data-root", root, "--out", out, "--preset", "cpu",
            *[a for c in categories for a in ("--category", c)], *_sets(**overrides)]


def _max_difference(ours: dict, theirs: dict) -> float:
    """Max absolute difference of two state dicts."""
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


def _differences(run: Path, reference: dict) -> tuple[float, float]:
    """Max relative loss difference and max absolute difference of the EMA weights, between the
    ``model.pt`` of a finished run and the reference's (a finished run keeps no checkpoint)."""
    model = torch.load(run / MODEL_NAME, weights_only=False)
    ours, theirs = [h["loss"] for h in model["history"]], [h["loss"] for h in reference["history"]]
    assert len(ours) == len(theirs)
    loss = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    return loss, _max_difference(model["unet"], reference["unet"])


@contextmanager
def _one_thread():
    """Here as in the ranks: one thread (so the sums run in the same order, and 2 cores are not oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference(root, out: Path, categories, preset, checkpoint_at: int | None = None) -> tuple[dict, dict | None]:
    """One process's run: its finished ``model.pt``, and its checkpoint at step ``checkpoint_at`` (the
    trained weights besides the EMA, which a finished run no longer keeps; resuming from it is exact)."""
    checkpoint = None
    with _one_thread():
        if checkpoint_at is not None:
            fit(root, categories, out, preset, progress=False, stop_after=checkpoint_at)
            checkpoint = torch.load(out / CHECKPOINT_NAME, weights_only=False)
        fit(root, categories, out, preset, progress=False)
    return torch.load(out / MODEL_NAME, weights_only=False), checkpoint


@pytest.mark.slow  # starts processes that train and score: the full run's tier
def test_two_ranks_train_what_one_process_trains(tiny_builtin, tiny_preset, tmp_path):
    reference, _ = _reference(tiny_builtin, tmp_path / "one", "brick", tiny_preset)
    result = _torchrun(*_train_args(tiny_builtin, tmp_path / "two", "brick"))
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 alone prints the plan and the summary, and writes the files: the finished model, its checkpoint gone.
    assert result.stdout.count("train brick: cpu") == 1 and "DDP over 2 processes, batch 4 = 2 x 2" in result.stdout
    assert result.stdout.count("trained ['brick']: 6 steps") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [MODEL_NAME]
    # The trained weights of two ranks' steps are compared in the next test, at a checkpoint.
    loss, ema = _differences(tmp_path / "two", reference)
    print(f"1 vs 2 processes: loss {loss:.2e} (relative), EMA {ema:.2e} (absolute)")
    assert loss < TOLERANCE and ema < TOLERANCE


@pytest.mark.slow  # starts processes that train and score: the full run's tier
def test_a_unified_run_resumes_with_another_number_of_processes(tiny_builtin, tiny_preset, tmp_path):
    categories = ["brick", "nut"]
    reference, at_step_4 = _reference(tiny_builtin, tmp_path / "one", categories, tiny_preset, checkpoint_at=4)
    out = tmp_path / "mixed"
    with _one_thread():
        fit(tiny_builtin, categories, out, tiny_preset, progress=False, stop_after=2)  # steps 1-2: one process
    result = _torchrun(*_train_args(tiny_builtin, out, *categories), "--stop-after", 2)  # 3-4: two
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped early" in result.stdout and not (out / MODEL_NAME).exists()
    state = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 4 and set(state["rng"]) == {"generator", "torch", "numpy", "python"}
    weights = _max_difference(state["unet"], at_step_4["unet"])
    with _one_thread():
        resumed = fit(tiny_builtin, categories, out, tiny_preset, progress=False)  # 5-6: one again
    assert resumed.num_classes == 2 and len(resumed.history) == 6
    loss, ema = _differences(out, reference)
    print(f"1, 2, 1 processes vs 1: loss {loss:.2e} (relative), weights at step 4 {weights:.2e}, "
          f"EMA {ema:.2e} (absolute)")
    assert loss < TOLERANCE and weights < TOLERANCE and ema < TOLERANCE


def test_a_batch_that_does_not_split_is_refused(tiny_builtin, tiny_preset, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert distributed.launched() and distributed.world_size() == 3
    with pytest.raises(ValueError, match="batch_size 4 does not split over 3 processes"):
        fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    assert not any(tmp_path.iterdir())


def test_timeouts_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_seconds() == 12.5
    monkeypatch.setenv(distributed.WAIT_ENV, "soon")
    with pytest.raises(ValueError, match="DIFFAD_DDP_WAIT takes seconds"):
        distributed.timeout_seconds(distributed.WAIT_ENV)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.is_distributed() and distributed.is_main()
    with distributed.process_group("cpu") as device:  # not under torchrun: nothing to join
        assert device == torch.device("cpu") and not torch.distributed.is_initialized()


@pytest.mark.slow  # starts processes that train and score: the full run's tier
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_stops_the_other(tiny_builtin, tmp_path, how):
    """Two ranks started by hand (torchrun's agent would stop the survivor itself): rank 1 is
    killed, or stopped, mid-training; rank 0 exits with a message within the timeout."""
    timeout = 8
    port = _free_port()
    args = [sys.executable, "-m", "diffad", *_train_args(tiny_builtin, tmp_path, "brick", train_steps=100_000,
                                                         lr_anneal_steps=100_000, checkpoint_every=2)]
    ranks = []
    try:
        for rank in range(2):
            env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), DIFFAD_DDP_TIMEOUT=str(timeout), DIFFAD_DDP_WAIT=str(timeout))
            with open(tmp_path / f"rank{rank}.log", "w") as log:  # a file: a full pipe would block the rank
                ranks.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 180
        while not (tmp_path / CHECKPOINT_NAME).exists():  # training is under way
            assert time.monotonic() < deadline and ranks[0].poll() is None, (tmp_path / "rank0.log").read_text()
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        ranks[0].wait(timeout=timeout + 60)
        elapsed = time.monotonic() - start
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = (tmp_path / "rank0.log").read_text()
    print(f"rank 1 {how}: rank 0 exited {ranks[0].returncode} after {elapsed:.1f} s:", err.strip().splitlines()[-1])
    assert ranks[0].returncode == 2, err[-2000:]
    assert "diffad train (rank 0 of 2): error: rank 0 of 2: lost contact with another rank" in err
    assert "DIFFAD_DDP_" in err and "resumes from its last checkpoint" in err
    assert elapsed < timeout + 20, elapsed  # at most one timeout, and the group's teardown


@pytest.mark.slow  # starts processes that train and score: the full run's tier
def test_reproduce_spreads_the_categories_over_the_ranks(tiny_builtin, tmp_path):
    out = tmp_path / "two"
    args = ["reproduce", "--data-root", tiny_builtin, "--out", out, "--preset", "cpu", "--no-baselines",
            "--no-figures", "--category", "brick", "--category", "nut", *_sets()]
    result = _torchrun(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 1] nut done" in result.stdout and "[rank 1] brick" not in result.stdout
    assert result.stdout.count("| brick |") == 1 and result.stdout.count("results in") == 1  # rank 0 prints
    rows = read_results_csv(out / "results.csv")
    assert [(r["category"], r["method"]) for r in rows] == [
        (c, m) for c in ("brick", "nut") for m in ("ensemble", "kl", "rgb", "feature")]
    assert "| nut |" in (out / "table1.md").read_text()
    # Each category trained alone on its rank: the same numbers as one process doing both.
    with _one_thread():
        single = reproduce(tiny_builtin, tmp_path / "one", "cpu", categories=["brick", "nut"], baselines=False,
                           figures=False, progress=False, **TINY_OVERRIDES)
    for ours, theirs in zip(rows, single):
        assert ours == pytest.approx(theirs, abs=1e-3)
    # A rerun skips the finished categories: their recorded metrics are read back as they are.
    done = out / "nut" / "metrics.json"
    recorded = json.loads(done.read_text())
    recorded[0]["pro"] = 0.123456
    done.write_text(json.dumps(recorded))
    models = {c: os.path.getmtime(out / c / "model" / MODEL_NAME) for c in ("brick", "nut")}
    again = _torchrun(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train brick" not in again.stdout
    assert read_results_csv(out / "results.csv")[4]["pro"] == pytest.approx(0.123456)
    assert models == {c: os.path.getmtime(out / c / "model" / MODEL_NAME) for c in ("brick", "nut")}


def test_plan_spreads_the_table_over_gpus(capsys):
    from diffad.cli import main

    tiny = ["--preset", "cpu", "--set", "unet='tiny'", "--set", "image_size=32", "--set", "batch_size=4",
            "--gpu-memory", "80", "--compute-capability", "8.0"]
    assert main(["plan", *tiny, "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["gpus"] is None and alone["table_rounds"] == 15 and "categories" not in alone["summary"]
    assert main(["plan", *tiny, "--gpus", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {k: plan[k] for k in ("gpus", "table_categories", "table_models", "table_rounds")} == {
        "gpus": 8, "table_categories": 15, "table_models": 15, "table_rounds": 2}  # ceil(15 / 8)
    assert plan["hours_for_table"] == pytest.approx(2 * plan["hours_per_category"])
    assert plan["peak_bytes"] == alone["peak_bytes"] and plan["precision"] == "bf16"  # the old keys stay
    assert "the table (15 categories, one model each) on 8 GPUs: 2 rounds" in plan["summary"]
    # One unified model of the 15 categories: DDP over the GPUs that split its batch of 4.
    assert main(["plan", *tiny, "--gpus", "8", "--categories", "15"]) == 0
    assert "the unified model of 15 categories on 8 GPUs: DDP over 4 (batch 4 split)" in capsys.readouterr().out
    assert main(["plan", *tiny, "--gpus", "0"]) == 2
    assert "gpus must be 1 or more" in capsys.readouterr().err
