"""Training: losses fall, checkpoints are atomic, and an interrupted run resumes exactly."""

import os

import pytest
import torch

from diffad.train import CHECKPOINT_NAME, MODEL_NAME, TrainedModel, atomic_save, ema_rate_at, fit, lr_at


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 on a CPU: autocast and channels-last
def test_interrupted_run_resumes_to_the_same_weights(tiny_builtin, tiny_preset, tmp_path, precision):
    tiny_preset = tiny_preset.replace(precision=precision)
    whole = fit(tiny_builtin, "brick", tmp_path / "whole", tiny_preset, progress=False)
    part = fit(tiny_builtin, "brick", tmp_path / "split", tiny_preset, progress=False, stop_after=4)
    assert len(part.history) == 4 and not (tmp_path / "split" / MODEL_NAME).exists()
    # Step 4 is not a checkpoint step (every 3): the stop itself wrote one at step 4.
    state = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 4
    resumed = fit(tiny_builtin, "brick", tmp_path / "split", tiny_preset, progress=False)
    assert len(resumed.history) == tiny_preset.train_steps
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert _same_weights(resumed.unet, whole.unet)


def test_finished_model_is_loaded_not_retrained(tiny_builtin, tiny_preset, tmp_path):
    first = fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    mtime = os.path.getmtime(tmp_path / MODEL_NAME)
    again = fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    assert os.path.getmtime(tmp_path / MODEL_NAME) == mtime
    assert _same_weights(first.unet, again.unet)
    loaded = TrainedModel.load(tmp_path / MODEL_NAME)
    assert loaded.categories == ["brick"] and loaded.preset == tiny_preset
    # Scoring settings do not touch training: the same model serves them, with the new settings.
    rescored = fit(tiny_builtin, "brick", tmp_path, tiny_preset.replace(alpha=0.2, test_timesteps=(1,)), progress=False)
    assert _same_weights(first.unet, rescored.unet) and rescored.preset.alpha == 0.2
    half = TrainedModel.load(loaded.save(tmp_path / "half.pt", half=True))
    assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(half.unet.state_dict().values(),
                                                               first.unet.state_dict().values()))


def test_other_settings_in_the_same_folder_are_refused(tiny_builtin, tiny_preset, tmp_path):
    fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False, stop_after=1)
    with pytest.raises(ValueError, match="other settings.*lr"):
        fit(tiny_builtin, "brick", tmp_path, tiny_preset.replace(lr=0.5), progress=False)


def test_category_overrides_reach_training(tiny_builtin, tiny_preset, tmp_path):
    preset = tiny_preset.replace(category_overrides={"brick": {"train_steps": 2, "lr_anneal_steps": 2}})
    model = fit(tiny_builtin, "brick", tmp_path / "brick", preset, progress=False)
    assert len(model.history) == 2 and model.preset.train_steps == 2
    assert fit(tiny_builtin, "brick", tmp_path / "brick", preset, progress=False).preset.train_steps == 2  # reloads


def test_unified_model_is_class_conditional(tiny_builtin, tiny_preset, tmp_path):
    model = fit(tiny_builtin, ["brick", "nut"], tmp_path, tiny_preset, progress=False, stop_after=1)
    assert model.num_classes == 2 and model.class_index("nut") == 1
    with pytest.raises(ValueError, match="not on 'grass'"):
        model.class_index("grass")


def test_training_lowers_the_loss(tiny_builtin, tiny_preset, tmp_path):
    preset = tiny_preset.replace(train_steps=40, lr_anneal_steps=40, checkpoint_every=40, lr=2e-3)
    model = fit(tiny_builtin, "brick", tmp_path, preset, progress=False)
    losses = [h["loss"] for h in model.history]
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / MODEL_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*model.pt"):
        TrainedModel.load(tmp_path / MODEL_NAME)
    with pytest.raises(FileNotFoundError, match="no trained model"):
        TrainedModel.load(tmp_path / "missing.pt")


def test_schedules(tiny_preset):
    p = tiny_preset.replace(lr=1.0, lr_anneal_steps=10)
    assert lr_at(0, p) == 1.0 and lr_at(5, p) == 0.5 and lr_at(10, p) == 0.0
    assert ema_rate_at(0, 0.999) == pytest.approx(0.1) and ema_rate_at(10_000, 0.99) == 0.99
