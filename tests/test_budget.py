"""The disk and memory a training run needs, for a free Colab (a 15 GB Google Drive, 12.7 GB of RAM):
the plan sizes the checkpoint and model files and the disk they need at once, a run the disk cannot
carry is refused before its first step, a finished run drops its checkpoint, and a resume holds
the checkpoint's state once in memory."""

import dataclasses
import json

import pytest
import torch

from diffad import io as diffad_io
from diffad import train
from diffad.cli import main
from diffad.device import GIB, PeakMemory
from diffad.io import space_to_write, tensor_bytes
from diffad.train import CHECKPOINT_NAME, MODEL_NAME, InsufficientDiskSpace, fit, plan_training

from conftest import TINY_OVERRIDES


def _free_space(monkeypatch, free: int) -> None:
    class Usage:
        pass

    Usage.free = free
    monkeypatch.setattr(diffad_io.shutil, "disk_usage", lambda folder: Usage)


def test_the_plan_sizes_the_files_a_run_writes(tiny_builtin, tiny_preset, tmp_path):
    plan = plan_training(tiny_preset, "cpu", estimate=False)
    fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False, stop_after=tiny_preset.train_steps - 1)
    checkpoint = (tmp_path / CHECKPOINT_NAME).stat().st_size
    leftover = tmp_path / f"{CHECKPOINT_NAME}.k3x9.tmp"  # a write cut off by a killed runtime
    leftover.write_bytes(b"\0" * 1000)
    fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    model = (tmp_path / MODEL_NAME).stat().st_size
    print(f"checkpoint {checkpoint:,} bytes, planned {plan.checkpoint_bytes:,}; "
          f"model {model:,} bytes, planned {plan.model_bytes:,}")
    assert plan.checkpoint_bytes == pytest.approx(checkpoint, rel=0.03)
    assert plan.model_bytes == pytest.approx(model, rel=0.03)
    # A finished run keeps its model alone: the checkpoint (4 times the model here) and the leftover are gone.
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_NAME]


def test_a_checkpoint_left_beside_a_finished_model_is_dropped(tiny_model, tiny_builtin, tiny_preset, tmp_path):
    tiny_model.save(tmp_path / MODEL_NAME)  # as if cut off between writing model.pt and deleting the checkpoint
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\0" * 1000)
    (tmp_path / f"{MODEL_NAME}.a1b2.tmp").write_bytes(b"\0" * 1000)
    fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_NAME]


def test_the_paper_plan_counts_its_parameters_without_allocating_them():
    with PeakMemory() as memory:
        plan = plan_training("paper", memory_gib=15, compute_capability=(7, 5), feature_channels=272, estimate=False)
    assert memory.peak_bytes < 0.01 * GIB  # counted on the meta device, not built
    size = plan.unet_size
    assert 550e6 < size.parameters < 556e6 and size.state_bytes == 4 * size.parameters  # float32
    assert 16.0 < plan.checkpoint_bytes / size.parameters < 16.01  # UNet, EMA and AdamW's two moments
    assert 2.0 < plan.model_bytes / size.parameters < 2.01  # fit's model.pt: the EMA in float16 (fp16 autocast)
    assert 10.0 < plan.checkpoint_bytes_for("compact") / size.parameters < 10.01  # EMA fp16, moments bf16
    checkpoint, model = plan.checkpoint_bytes, plan.model_bytes
    # Ten checkpoints: from the second on, the old one stays until the new one is complete.
    assert plan.checkpoint_writes() == 10
    assert plan.disk_bytes_per_category == checkpoint + space_to_write(checkpoint)
    assert plan.disk_bytes_for_table == 14 * model + plan.disk_bytes_per_category
    # A resume from step 9000 has one checkpoint on disk and two writes ahead; from step 10000, only the model.
    assert plan.disk_bytes_needed(9000, checkpoint) == space_to_write(checkpoint)
    assert plan.disk_bytes_needed(10_000, checkpoint) == space_to_write(model)
    # A single write from scratch: the checkpoint, then the model beside it.
    once = dataclasses.replace(plan, preset=plan.preset.replace(checkpoint_every=20_000))
    assert once.checkpoint_writes() == 1
    assert once.disk_bytes_per_category == once.checkpoint_bytes + space_to_write(once.model_bytes)
    # Four GPUs train four categories at once (reproduce under torchrun), 4 + 4 + 4 + 3: the third round's
    # four runs beside the eight models before them take the most.
    four = plan_training("paper", memory_gib=15, compute_capability=(7, 5), feature_channels=272, estimate=False,
                         gpus=4)
    assert four.disk_bytes_for_table == 8 * four.model_bytes + 4 * four.disk_bytes_per_category
    unified = plan_training("paper", memory_gib=15, compute_capability=(7, 5), feature_channels=272,
                            estimate=False, num_classes=15)
    assert unified.disk_bytes_for_table == unified.disk_bytes_per_category
    assert "disk: exact checkpoint 8.85 GB, model.pt 1.11 GB (float16)" in plan.describe()
    # A free Colab's Drive (12 GB free) holds one category with compact checkpoints, not with exact ones.
    assert plan.disk_bytes_needed(checkpoint_format="compact") < 12e9 < plan.disk_bytes_per_category


def test_plan_command_reports_the_disk(capsys):
    code = main(["plan", "--preset", "cpu", "--set", "unet='tiny'", "--set", "image_size=32",
                 "--gpu-memory", "15", "--compute-capability", "7.5", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("checkpoint_bytes", "model_bytes", "disk_bytes_per_category", "disk_bytes_for_table",
                "unet_parameters"):
        assert isinstance(out[key], int) and out[key] > 0, key
    assert out["disk_bytes_for_table"] > out["disk_bytes_per_category"] > 2 * out["checkpoint_bytes"]
    assert "hours_per_category" in out and "hours_for_table" in out
    assert "GB free per model" in out["summary"]


def test_a_run_the_disk_cannot_carry_is_refused_before_its_first_step(tiny_builtin, tiny_preset, tmp_path,
                                                                     monkeypatch):
    plan = plan_training(tiny_preset, "cpu", estimate=False)
    exact, compact = plan.disk_bytes_per_category, plan.disk_bytes_needed(checkpoint_format="compact")
    _free_space(monkeypatch, compact - 1)
    monkeypatch.delenv("DIFFAD_SCRATCH", raising=False)
    monkeypatch.setattr(train, "training_step", lambda *a, **k: pytest.fail("a step ran"))
    out = tmp_path / "runs" / "brick"  # not made yet: the free space is its parent's
    with pytest.raises(InsufficientDiskSpace) as error:
        fit(tiny_builtin, "brick", out, tiny_preset, progress=False)
    message = str(error.value)
    print(message)
    assert isinstance(error.value, OSError) and "\n" not in message
    free = f"{(compact - 1) / 1e9:.3g} GB are free"
    assert f"exact checkpoints of {plan.checkpoint_bytes / 1e9:.3g} GB need about {exact / 1e9:.3g} GB" in message
    assert f"compact checkpoints of {plan.checkpoint_bytes_for('compact') / 1e9:.3g} GB need about " \
           f"{compact / 1e9:.3g} GB and {free}" in message
    assert str(out) in message and f"disk of {tmp_path}" in message and "DIFFAD_CACHE" in message
    assert "DIFFAD_SCRATCH" in message and not out.exists()


def test_cli_train_reports_a_full_disk_in_one_line(tiny_builtin, tmp_path, monkeypatch, capsys):
    _free_space(monkeypatch, 1_000_000)
    sets = [arg for name, value in TINY_OVERRIDES.items() for arg in ("--set", f"{name}={value!r}")]
    code = main(["train", "--data-root", str(tiny_builtin), "--category", "brick", "--out", str(tmp_path / "run"),
                 "--preset", "cpu", *sets])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("diffad train: error: not enough free disk space to train into")


def test_a_resume_needs_only_the_rest_of_the_run(tiny_builtin, tiny_preset, tmp_path, monkeypatch):
    fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False, stop_after=4)
    plan = plan_training(tiny_preset, "cpu", estimate=False)
    needed = plan.disk_bytes_needed(4, (tmp_path / CHECKPOINT_NAME).stat().st_size)
    assert needed < plan.disk_bytes_per_category  # one checkpoint is there already
    _free_space(monkeypatch, needed)
    model = fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    assert len(model.history) == tiny_preset.train_steps


def test_a_resume_holds_the_checkpoint_once_when_mmap_is_refused(tiny_builtin, tiny_preset, tmp_path, monkeypatch):
    """Restoring into models built first held them beside the loaded file: 1.8 times its state here."""
    # A UNet whose state (61 MB) outweighs the backbone's, so the window measures the model's state.
    preset = tiny_preset.replace(unet_overrides={"model_channels": 64})
    fit(tiny_builtin, "brick", tmp_path, preset, progress=False, stop_after=1)

    real_load = torch.load

    def refusing_mmap(*args, mmap=None, **kwargs):  # as a Google Drive (FUSE) mount may answer
        if mmap:
            raise RuntimeError("unable to mmap 61000000 bytes from file <checkpoint.pt>: No such device (19)")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(diffad_io.torch, "load", refusing_mmap)
    memory, seen = PeakMemory(), {}
    real_load_file, real_restore = train.load_torch_file, train._TrainingRun.restore

    def load_file(*args, **kwargs):  # from here to the end of restore(): live tensor bytes above those before
        seen["before"] = memory.current_bytes
        memory.reset_peak()
        state = real_load_file(*args, **kwargs)
        seen["state"] = tensor_bytes(state)
        memory.track(state)
        return state

    def restore(self, *args, **kwargs):
        real_restore(self, *args, **kwargs)
        seen["peak"] = memory.peak_bytes

    monkeypatch.setattr(train, "load_torch_file", load_file)
    monkeypatch.setattr(train._TrainingRun, "restore", restore)
    with memory:
        model = fit(tiny_builtin, "brick", tmp_path, preset, progress=False, stop_after=0)
    assert len(model.history) == 1
    extra = seen["peak"] - seen["before"]
    print(f"state {seen['state'] / 1e6:.1f} MB, peak during the resume {extra / 1e6:.1f} MB "
          f"({extra / seen['state']:.2f}x)")
    assert extra <= 1.1 * seen["state"]


def test_a_run_prints_its_plan_with_the_free_space_where_it_writes(tiny_builtin, tiny_preset, tmp_path, capsys):
    fit(tiny_builtin, "brick", tmp_path / "run", tiny_preset, progress=True, stop_after=1)
    line = next(text for text in capsys.readouterr().out.splitlines() if text.startswith("train brick:"))
    assert "disk: exact checkpoint" in line and f"GB free at {tmp_path}" in line


def _free_space_by_folder(monkeypatch, free: dict) -> None:
    """Each folder's disk has the free bytes of the first key it lies under (a Drive, a local disk)."""
    def usage(folder):
        class Usage:
            pass

        Usage.free = next(value for key, value in free.items() if str(folder).startswith(str(key)))
        return Usage

    monkeypatch.setattr(diffad_io.shutil, "disk_usage", usage)


def test_a_disk_too_small_for_exact_checkpoints_gets_compact_ones_that_resume(tiny_builtin, tiny_preset, tmp_path,
                                                                            monkeypatch, capsys):
    """A free Colab's Drive in small: room for two compact checkpoints, not two exact ones. The run writes
    compact checkpoints (the EMA in float16, AdamW's moments in bfloat16), resumes from one and ends
    within float16's rounding of the run that was never interrupted."""
    monkeypatch.delenv("DIFFAD_SCRATCH", raising=False)
    plan = plan_training(tiny_preset, "cpu", estimate=False)
    compact = plan.disk_bytes_needed(checkpoint_format="compact")
    assert compact < plan.disk_bytes_per_category  # (the tiny files are mostly the write margin)
    whole = fit(tiny_builtin, "brick", tmp_path / "whole", tiny_preset, progress=False)

    _free_space(monkeypatch, compact)
    out = tmp_path / "drive"
    fit(tiny_builtin, "brick", out, tiny_preset, progress=False, stop_after=3)
    assert "checkpoints of brick: compact" in capsys.readouterr().out
    state = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert state["checkpoint_format"] == "compact" and state["step"] == 3
    assert {v.dtype for v in state["ema"].values() if v.is_floating_point()} == {torch.float16}
    assert {v.dtype for v in state["unet"].values() if v.is_floating_point()} == {torch.float32}
    moments = [m[k] for m in state["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert {m.dtype for m in moments} == {torch.bfloat16}
    assert (out / CHECKPOINT_NAME).stat().st_size == pytest.approx(plan.checkpoint_bytes_for("compact"), rel=0.03)

    resumed = fit(tiny_builtin, "brick", out, tiny_preset, progress=False)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history]
    assert resumed.history[:3] == whole.history[:3]  # bit for bit up to the checkpoint
    for name, weight in whole.unet.state_dict().items():
        if weight.is_floating_point():  # then within the rounding that compact moments and EMA bring
            torch.testing.assert_close(resumed.unet.state_dict()[name], weight, rtol=2e-2, atol=2e-3)
    assert [p.name for p in out.iterdir()] == [MODEL_NAME]


def test_checkpoints_go_to_the_scratch_disk_when_the_cache_cannot_hold_them(tiny_builtin, tiny_preset, tmp_path,
                                                                           monkeypatch, capsys):
    """Colab: Google Drive holds the finished models but not one more run's checkpoints; they go to the
    runtime's own disk ($DIFFAD_SCRATCH), model.pt to Drive, and nothing is left on the scratch disk."""
    drive, scratch = tmp_path / "drive", tmp_path / "local"
    drive.mkdir(), scratch.mkdir()  # two mounted disks
    monkeypatch.setenv("DIFFAD_SCRATCH", str(scratch))
    plan = plan_training(tiny_preset, "cpu", estimate=False)
    _free_space_by_folder(monkeypatch, {drive: space_to_write(plan.model_bytes), scratch: 10**12, tmp_path: 0})
    out = drive / "brick"
    fit(tiny_builtin, "brick", out, tiny_preset, progress=False, stop_after=3)
    assert "on this machine's disk, lost if it resets" in capsys.readouterr().out
    assert not (out / CHECKPOINT_NAME).exists()
    (checkpoint,) = scratch.glob(f"runs/brick-*/{CHECKPOINT_NAME}")
    assert torch.load(checkpoint, weights_only=False)["checkpoint_format"] == "exact"
    model = fit(tiny_builtin, "brick", out, tiny_preset, progress=False)  # finds it there and resumes
    assert len(model.history) == tiny_preset.train_steps and (out / MODEL_NAME).is_file()
    assert not checkpoint.exists()


def test_model_pt_in_float16_is_the_model_the_run_returns(tiny_builtin, tiny_preset, tmp_path):
    preset = tiny_preset.replace(model_dtype="float16")
    trained = fit(tiny_builtin, "brick", tmp_path, preset, progress=False)
    state = torch.load(tmp_path / MODEL_NAME, weights_only=False)
    assert {v.dtype for v in state["unet"].values() if v.is_floating_point()} == {torch.float16}
    assert (tmp_path / MODEL_NAME).stat().st_size == pytest.approx(
        plan_training(preset, "cpu", estimate=False).model_bytes, rel=0.03)
    loaded = train.TrainedModel.load(tmp_path / MODEL_NAME)
    for name, weight in loaded.unet.state_dict().items():
        assert weight.dtype == torch.float32 and torch.equal(weight, trained.unet.state_dict()[name]), name
    # "auto": float16 where the run computes in a half precision, float32 on a CPU (the shipped models)
    assert plan_training(tiny_preset, "cpu", estimate=False).model_dtype == "float32"
    gpu = plan_training(tiny_preset, memory_gib=15, compute_capability=(8, 0), estimate=False)
    assert gpu.precision.value == "bf16" and gpu.model_dtype == "float16"
