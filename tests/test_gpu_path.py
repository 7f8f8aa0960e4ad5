"""The paper preset's code path, run here on the CPU: OpenAI initialisation, precision, checkpoints.

A fake guided-diffusion checkpoint (the paper UNet's keys and shapes at a reduced width and
image size) is served from a loopback HTTP server; nothing reaches the internet.
"""

import io
import json
import time
from pathlib import Path

import pytest
import torch
from download_server import LoopbackServer, clear_proxy_environment

from diffad import io as diffad_io
from diffad.cli import main
from diffad.evaluate import evaluate_category
from diffad.models import GUIDED_DIFFUSION_URLS, MissingInitCheckpoint, create_unet, resolve_init_checkpoint
from diffad.presets import get_preset
from diffad.train import CHECKPOINT_NAME, MODEL_NAME, fit, plan_training

NAME = "256x256_diffusion"
# The paper's UNet (channel_mult 1,1,2,2,4,4, attention at 32/16/8 of 256 px, 64 channels per head,
# scale-shift norm, res-block up/down-sampling, learned variance) at 64 channels and 64 px: the
# same code path at 1/16 of the width, because 24 GB of RAM and 2 cores cannot train 554M
# parameters in a test.
REDUCED = dict(image_size=64, unet_overrides={"model_channels": 64})


def _fake_openai_checkpoint() -> bytes:
    """A state dict in guided-diffusion's format: 1000-class label embedding, no feature head."""
    torch.manual_seed(123)
    unet = create_unet("paper", image_size=64, model_channels=64, num_classes=1000, feature_channels=None)
    buffer = io.BytesIO()
    torch.save(unet.state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def openai_bytes():
    return _fake_openai_checkpoint()


@pytest.fixture
def hub(monkeypatch, openai_bytes, tmp_path):
    """OpenAI's URL pointed at a loopback server holding the fake checkpoint; the cache in tmp_path."""
    clear_proxy_environment(monkeypatch)
    monkeypatch.setenv("DIFFAD_CACHE", str(tmp_path / "cache"))
    with LoopbackServer() as server:
        server.files[f"{NAME}.pt"] = openai_bytes
        monkeypatch.setitem(GUIDED_DIFFUSION_URLS, NAME, server.url(f"{NAME}.pt"))
        yield server


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """OpenAI's URL pointed at a closed loopback port: what a machine without internet sees."""
    clear_proxy_environment(monkeypatch)
    monkeypatch.setenv("DIFFAD_CACHE", str(tmp_path / "cache"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(GUIDED_DIFFUSION_URLS, NAME, f"http://127.0.0.1:{port}/{NAME}.pt")


def test_paper_preset_starts_from_openai_weights():
    assert get_preset("paper").init_checkpoint == NAME
    assert get_preset("cpu").init_checkpoint is None


def test_checkpoint_is_fetched_once_and_checked_on_every_use(hub, tmp_path, openai_bytes):
    path = resolve_init_checkpoint(NAME)
    assert path == tmp_path / "cache" / "openai" / f"{NAME}.pt" and path.read_bytes() == openai_bytes
    record = json.loads(path.with_name(path.name + ".json").read_text())
    assert record["size"] == len(openai_bytes) and len(record["sha256"]) == 64
    assert resolve_init_checkpoint(NAME) == path
    assert len(hub.requests) == 1  # the second use read the cache
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # damaged in the cache (same size)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="no longer matches the size and SHA-256"):
        resolve_init_checkpoint(NAME)


def test_with_a_scratch_disk_the_checkpoint_is_fetched_there_not_into_the_cache(hub, tmp_path, monkeypatch):
    """Colab with the cache on Google Drive: 2.2 GB fetched again in a minute stay off Drive; a copy
    already in the cache is still used."""
    monkeypatch.setenv("DIFFAD_SCRATCH", str(tmp_path / "scratch"))
    path = resolve_init_checkpoint(NAME)
    assert path == tmp_path / "scratch" / "openai" / f"{NAME}.pt" and path.is_file()
    cached = tmp_path / "cache" / "openai" / f"{NAME}.pt"
    cached.parent.mkdir(parents=True)
    for name in (path.name, path.name + ".json"):
        (cached.parent / name).write_bytes((path.parent / name).read_bytes())
    assert resolve_init_checkpoint(NAME) == cached and len(hub.requests) == 1


def test_offline_stops_within_seconds_with_one_message(offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(MissingInitCheckpoint) as error:
        resolve_init_checkpoint(NAME)
    assert time.monotonic() - start < 15
    message = str(error.value)
    for part in (NAME, GUIDED_DIFFUSION_URLS[NAME], str(tmp_path / "cache" / "openai" / f"{NAME}.pt"),
                 "--set init_checkpoint=PATH"):
        assert part in message
    assert error.value._render_traceback_() == [f"MissingInitCheckpoint: {message}"]  # what Jupyter shows


def test_cli_train_offline_exits_with_the_message_and_no_traceback(offline, tmp_path, capsys):
    code = main(["train", "--data-root", str(tmp_path), "--category", "brick", "--out", str(tmp_path / "run"),
                 "--preset", "paper"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert NAME in err and "--set init_checkpoint=PATH" in err


def test_a_local_copy_is_taken_and_a_missing_path_named(tmp_path, openai_bytes):
    local = tmp_path / "mine.pt"
    local.write_bytes(openai_bytes)
    assert resolve_init_checkpoint(str(local)) == local
    assert resolve_init_checkpoint(None) is None
    with pytest.raises(MissingInitCheckpoint, match="nope.pt"):
        resolve_init_checkpoint(str(tmp_path / "nope.pt"))


def test_atomic_save_checks_free_space_first(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    diffad_io.atomic_save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()

    class Usage:
        free = 1000

    monkeypatch.setattr(diffad_io.shutil, "disk_usage", lambda folder: Usage)
    with pytest.raises(diffad_io.InsufficientDiskSpace, match=str(tmp_path)) as error:
        diffad_io.atomic_save({"w": torch.zeros(1_000_000)}, path)
    assert "needs about 20,857,216 bytes" in str(error.value) and "1,000 bytes" in str(error.value)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_checkpoints_load_memory_mapped(tmp_path):
    path = diffad_io.atomic_save({"w": torch.arange(1000.0)}, tmp_path / "c.pt")
    state = diffad_io.load_torch_file(path)
    assert torch.equal(state["w"], torch.arange(1000.0))
    maps = Path("/proc/self/maps")
    if maps.is_file():  # Linux: the file is mapped into this process, not copied into its heap
        assert str(path) in maps.read_text()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        diffad_io.load_torch_file(path)


@pytest.mark.slow
def test_fp16_with_grad_scaler_trains_and_resumes_exactly(tiny_builtin, tiny_preset, tmp_path):
    """The T4's precision, on CPU autocast: finite losses, the scaler saved and restored."""
    preset = tiny_preset.replace(precision="fp16", train_steps=3, lr_anneal_steps=3)  # CPU fp16 is slow
    whole = fit(tiny_builtin, "brick", tmp_path / "whole", preset, progress=False)
    part = fit(tiny_builtin, "brick", tmp_path / "split", preset, progress=False, stop_after=2)
    state = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=False)
    assert state["scaler"]["scale"] > 0
    resumed = fit(tiny_builtin, "brick", tmp_path / "split", preset, progress=False)
    assert len(part.history) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in whole.history)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


@pytest.mark.slow
def test_checkpointing_and_ema_on_the_host_change_memory_not_results(tiny_builtin, tiny_preset, tmp_path):
    plain = fit(tiny_builtin, "brick", tmp_path / "plain", tiny_preset, progress=False)
    lean = fit(tiny_builtin, "brick", tmp_path / "lean", tiny_preset.replace(gradient_checkpointing=True,
                                                                             ema_device="cpu"), progress=False)
    for key, value in plain.unet.state_dict().items():
        torch.testing.assert_close(lean.unet.state_dict()[key], value, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def builtin_64(tmp_path_factory):
    from diffad.data import make_builtin_dataset

    return make_builtin_dataset(tmp_path_factory.mktemp("builtin64"), seed=0, image_size=64, n_train=8,
                                n_test_good=2, n_test_per_defect=1, categories=["brick"])


@pytest.mark.slow
def test_paper_code_path_end_to_end(hub, builtin_64, tmp_path, openai_bytes, capsys):
    """Initialise from the (fake) OpenAI checkpoint, plan, train, stop, resume, score, evaluate."""
    preset = get_preset(
        "paper", **REDUCED, backbone="tf_efficientnet_lite0", train_steps=2, lr_anneal_steps=2,
        checkpoint_every=1, val_fraction=0.25, test_timesteps=(5, 50), score_batch_size=4)
    plan = plan_training(preset, memory_gib=15, compute_capability=(7, 5))
    assert plan.fits and plan.precision.value == "fp16"
    out = tmp_path / "run"
    first = fit(builtin_64, "brick", out, preset, progress=True, stop_after=1)
    assert "fp32, no gradient checkpointing" in capsys.readouterr().out  # the plan, printed (CPU here)
    assert len(first.history) == 1 and (out / CHECKPOINT_NAME).is_file() and not (out / MODEL_NAME).exists()
    model = fit(builtin_64, "brick", out, preset, progress=False)
    assert len(model.history) == 2 and (out / MODEL_NAME).is_file()
    assert len(hub.requests) == 1  # downloaded once, not again on resume
    # Started from OpenAI's weights (moved at most by two small AdamW steps), not from a fresh init.
    openai = torch.load(io.BytesIO(openai_bytes), weights_only=True)
    weights = model.unet.state_dict()
    assert torch.allclose(weights["input_blocks.0.0.weight"], openai["input_blocks.0.0.weight"], atol=1e-3)
    assert weights["label_emb.weight"].shape[0] == 1  # re-initialised for the one category
    # The saved model holds the EMA weights only: no optimizer state.
    saved = torch.load(out / MODEL_NAME, weights_only=False)
    assert "optimizer" not in saved and "ema" not in saved
    result = evaluate_category(model, builtin_64, "brick", baselines=False)
    methods = {row["method"]: row for row in result.rows}
    assert {"ensemble", "kl", "feature"} <= set(methods)
    assert all(0.0 <= methods[m]["pixel_auroc"] <= 1.0 for m in methods)
