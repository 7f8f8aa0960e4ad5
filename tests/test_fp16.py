"""fp16 done right: a non-finite step under a GradScaler is skipped (the scale lowered, the optimizer
and the EMA left as they were) and counted, never an error; without a scaler a non-finite loss
still raises; and the training loop reads tensors on the host only when it logs.

The non-finite value is forced on the CPU by a forward hook that makes the UNet's output infinite
(what an fp16 overflow in the forward pass does). The run-level tests put a GradScaler on fp32
arithmetic (CPU fp16 is slow); the skip logic is the same, and one unit test runs real fp16 autocast.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

import diffad
from diffad import train
from diffad.device import Precision
from diffad.presets import get_preset
from diffad.train import (CHECKPOINT_NAME, Batch, TrainedModel, build_diffusion, build_unet, fit, make_optimizer,
                          skipped_in, training_step)

INF = float("inf")


def _poison(unet, when):
    """Make the UNet's output infinite on the forward calls ``when(call_number)`` picks (from 1)."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
        if when(calls[0]):
            out, features = output
            return out * INF, features
        return output

    return unet.register_forward_hook(hook)


def _step_parts(fused: bool = False):
    preset = get_preset("cpu", unet="tiny", image_size=32, batch_size=4)
    torch.manual_seed(0)
    unet = build_unet(preset, 8, None)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = (torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True) if fused
                 else make_optimizer(unet, preset, "cpu"))
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = Batch(x0, torch.randint(1000, (4,)), torch.randn_like(x0), torch.randn(4, 8, 8, 8))
    return unet, ema, optimizer, build_diffusion(preset), batch


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _differ(a: dict, b: dict) -> bool:
    return any(a[k].is_floating_point() and not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision,fused", [(Precision.FP32, False), (Precision.FP32, True), (Precision.FP16, False)],
                         ids=["fp32-foreach", "fp32-fused", "fp16-autocast"])
def test_a_non_finite_step_under_a_grad_scaler_is_skipped_not_raised(precision, fused):
    unet, ema, optimizer, diffusion, batch = _step_parts(fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    kwargs = dict(lr=1e-3, feature_loss_weight=1.0, grad_clip=1.0, precision=precision, scaler=scaler,
                  ema=ema, ema_rate=0.9)  # check_finite left at its default, True: the scaler decides
    training_step(unet, optimizer, diffusion, batch, **kwargs)  # the optimizer's state exists from here
    weights, averaged, adam = _state(unet), _state(ema), copy.deepcopy(optimizer.state_dict())
    scale = scaler.get_scale()

    handle = _poison(unet, lambda call: True)
    losses = training_step(unet, optimizer, diffusion, batch, **kwargs)  # no exception
    handle.remove()
    assert not torch.isfinite(losses["loss"]) and losses["skipped"].item() == 1.0
    assert _same(_state(unet), weights), "a skipped step moved the weights"
    assert _same(_state(ema), averaged), "a skipped step moved the EMA"
    assert scaler.get_scale() == scale * 0.5
    steps = [s["step"] for s in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(steps, [s["step"] for s in adam["state"].values()]))

    losses = training_step(unet, optimizer, diffusion, batch, **kwargs)  # a normal step after it
    assert torch.isfinite(losses["loss"]) and losses["skipped"].item() == 0.0
    now = _state(unet)
    assert _differ(now, weights)
    expected = {k: averaged[k].lerp(now[k], 0.1) for k in averaged if averaged[k].is_floating_point()}
    assert all(torch.allclose(ema.state_dict()[k], v, rtol=0, atol=1e-7) for k, v in expected.items())
    assert _differ(_state(ema), averaged)


@pytest.mark.parametrize("scaler", [None, "disabled"])
def test_without_a_scaler_a_non_finite_loss_raises(scaler):
    unet, ema, optimizer, diffusion, batch = _step_parts()
    if scaler == "disabled":
        scaler = torch.amp.GradScaler("cpu", enabled=False)
    weights = _state(unet)
    _poison(unet, lambda call: True)
    with pytest.raises(FloatingPointError, match=r"training loss became (inf|nan); lower lr \(now 0.001\)"):
        training_step(unet, optimizer, diffusion, batch, lr=1e-3, feature_loss_weight=1.0, grad_clip=1.0,
                      scaler=scaler, ema=ema, ema_rate=0.9)
    assert _same(_state(unet), weights)


class _Bar:
    """Stands in for tqdm and keeps every progress postfix."""

    postfixes: list = []

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, ordered_dict=None, **kwargs):
        _Bar.postfixes.append({**(ordered_dict or {}), **kwargs})

    def close(self):
        pass


@pytest.fixture
def poisoned_runs(monkeypatch):
    """fit with a GradScaler on fp32 arithmetic, a fake progress bar, and every UNet it builds
    poisoned on the forward calls while ``flag["on"]``."""
    flag = {"on": False}
    build = train.build_unet

    def build_poisoned(*args, **kwargs):
        unet = build(*args, **kwargs)
        _poison(unet, lambda call: flag["on"])
        return unet

    monkeypatch.setattr(train, "build_unet", build_poisoned)
    monkeypatch.setattr(train, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "postfixes", [])
    return flag


def test_a_run_skips_and_counts_the_step_keeps_the_count_over_resume(tiny_builtin, tiny_preset, tmp_path,
                                                                      monkeypatch, poisoned_runs):
    monkeypatch.setattr(Precision, "needs_grad_scaler", property(lambda self: True))
    out, ckpt = tmp_path / "run", tmp_path / "run" / CHECKPOINT_NAME

    fit(tiny_builtin, "brick", out, tiny_preset, progress=False, stop_after=2)
    before = torch.load(ckpt, weights_only=False)
    assert before["scaler"] is not None and skipped_in(before["history"]) == 0

    poisoned_runs["on"] = True  # step 3: the UNet's output is infinite
    model = fit(tiny_builtin, "brick", out, tiny_preset, progress=False, stop_after=1)
    skipped = torch.load(ckpt, weights_only=False)
    assert skipped["step"] == 3 and skipped["history"][-1]["skipped"] is True
    assert skipped["history"][-1]["loss"] == INF or skipped["history"][-1]["loss"] != skipped["history"][-1]["loss"]
    assert _same(skipped["unet"], before["unet"]) and _same(skipped["ema"], before["ema"])
    assert skipped["scaler"]["scale"] == before["scaler"]["scale"] * 0.5
    assert skipped_in(skipped["history"]) == 1 and model.skipped_steps == 1
    assert _Bar.postfixes[-1]["skipped"] == 1

    poisoned_runs["on"] = False  # step 4, after a resume: a real step again
    model = fit(tiny_builtin, "brick", out, tiny_preset, progress=False, stop_after=1)
    after = torch.load(ckpt, weights_only=False)
    assert after["history"][-1]["skipped"] is False and after["history"][-1]["loss"] < INF
    assert _differ(after["unet"], skipped["unet"]) and _differ(after["ema"], skipped["ema"])
    assert skipped_in(after["history"]) == 1 and model.skipped_steps == 1  # counted once, kept over resume
    assert _Bar.postfixes[-1]["skipped"] == 1
    assert [h["step"] for h in after["history"]] == [1, 2, 3, 4]


def test_without_a_scaler_a_run_raises_before_a_checkpoint_holds_the_weights(tiny_builtin, tiny_preset, tmp_path,
                                                                                poisoned_runs):
    poisoned_runs["on"] = True
    with pytest.raises(FloatingPointError, match=r"training loss became (inf|nan) at step 1; lower lr"):
        fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # the first checkpoint (step 3) was never written


def test_records_without_the_skipped_field_still_load(tiny_builtin, tiny_preset, tmp_path):
    fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False, stop_after=3)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert [h["skipped"] for h in state["history"]] == [False] * 3
    for record in state["history"]:  # as a checkpoint written before the field was kept
        del record["skipped"]
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    model = fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    assert len(model.history) == tiny_preset.train_steps and model.skipped_steps == 0
    shipped = Path(diffad.__file__).parent / "resources" / "checkpoints" / "cpu-brick.pt"
    assert TrainedModel.load(shipped).skipped_steps == 0


def test_the_loop_reads_tensors_on_the_host_only_when_it_logs(tiny_builtin, tiny_preset, tmp_path, monkeypatch):
    """No .item(), float(t), bool(t), .tolist() in the training loop and step: only log() reads values.

    On a GPU each such read waits for the device. Counted here in diffad/train.py and diffad/step.py;
    the diffusion's range check of CPU timesteps reads them (free on the CPU) and asserts on the device
    on a GPU.
    """
    from diffad import step

    package = {train.__file__, step.__file__}
    reads, where = [], {"step": False}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if where["step"] and caller in package:
                reads.append((name, caller, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        counting(name)

    def inside(method, flag):
        original = getattr(train._TrainingRun, method)

        def wrapped(self, *args, **kwargs):
            before, where["step"] = where["step"], flag
            try:
                return original(self, *args, **kwargs)
            finally:
                where["step"] = before

        monkeypatch.setattr(train._TrainingRun, method, wrapped)

    inside("train", True)
    inside("log", False)
    inside("save", False)
    logged = []
    log = train._TrainingRun.log
    monkeypatch.setattr(train._TrainingRun, "log", lambda self, pending, bar: (logged.append(self.step),
                                                                               log(self, pending, bar)))
    monkeypatch.setattr(train, "LOG_EVERY", 2)
    model = fit(tiny_builtin, "brick", tmp_path, tiny_preset, progress=False)
    assert reads == [], sorted(set(reads))
    assert logged == [2, 3, 4, 6]  # every LOG_EVERY steps and at each checkpoint (every 3, and the end)
    assert [h["step"] for h in model.history] == list(range(1, 7))
