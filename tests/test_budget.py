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
    assert 4.0 < plan.model_bytes / size.parameters < 4.01  # fit's model.pt: the EMA in float32
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
    assert "disk: checkpoint 8.85 GB, model.pt 2.21 GB" in plan.describe()


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
    _free_space(monkeypatch, 20_000_000)
    monkeypatch.setattr(train, "training_step", lambda *a, **k: pytest.fail("a step ran"))
    out = tmp_path / "runs" / "brick"  # not made yet: the free space is its parent's
    with pytest.raises(InsufficientDiskSpace) as error:
        fit(tiny_builtin, "brick", out, tiny_preset, progress=False)
    message = str(error.value)
    print(message)
    assert isinstance(error.value, OSError) and "\n" not in message
    needed = plan_training(tiny_preset, "cpu", estimate=False).disk_bytes_per_category
    assert f"needs about {needed / 1e9:.3g} GB" in message and "0.02 GB are free" in message
    assert str(out) in message and f"disk of {tmp_path}" in message and "DIFFAD_CACHE" in message
    assert not out.exists()


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
    assert "disk: checkpoint" in line and f"GB free at {tmp_path}" in line
