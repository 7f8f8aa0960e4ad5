"""The device plan of a training run, beside the device code: precision, gradient checkpointing, where
the EMA lives, the estimated peak memory and time on a GPU, and the disk its files need.

:func:`plan_training` makes each choice a preset leaves open ("auto", None), for the GPU present or
one described (a Colab T4: 15 GiB, compute capability 7.5), by running one real
:func:`diffad.step.training_step` on fake tensors (no GPU, no weights) and counting the UNet's
parameters on the meta device. ``python -m diffad plan`` prints it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from diffad.backbones import FeatureExtractor
from diffad.device import (CUDA_BLOCK_BYTES, GIB, Accelerator, PeakMemory, Precision, accelerator_of,
                           choose_precision, cpu_has_native_bf16)
from diffad.io import space_to_write
from diffad.models.denoiser import build_diffusion, build_feature_extractor, build_unet, feature_grid
from diffad.presets import Preset, get_preset
from diffad.step import Batch, make_optimizer, training_step

__all__ = ["TrainingPlan", "StateSize", "plan_training", "estimate_training_step", "choose_model_dtype", "GB"]

# What share of a chip's peak FLOP/s a training step of this UNet reaches: an assumption for the
# plan's time estimate, to be replaced by the figure benchmarks/gpu_check.py measures.
ASSUMED_UTILISATION = 0.35
# Left free on a GPU for the CUDA context, cuDNN workspaces and the allocator's fragmentation.
GPU_RESERVE_BYTES = GIB
# The categories of MVTec-AD: the models of the paper's Table 1, one per category.
TABLE_CATEGORIES = 15
# What torch.save writes beyond the tensors' bytes (measured on the tiny, cpu and a 15M-parameter UNet):
# per tensor its zip entry, alignment and pickled reference (320 to 390 bytes), per step of the history
# its record (60), and a few KiB once (the random states, the preset).
SAVED_BYTES_PER_TENSOR = 350
SAVED_BYTES_PER_STEP = 64
SAVED_FIXED_BYTES = 16 << 10
GB = 10**9  # disk sizes in decimal GB, as disks and Google Drive state them


@dataclass(frozen=True)
class StateSize:
    """A UNet's state as a plan counts it, on the meta device (nothing allocated): one copy of its
    weights, and what AdamW keeps beside each parameter (two moments of its dtype and a step count)."""

    parameters: int  # elements of the trainable parameters
    parameter_bytes: int  # their bytes, at their dtypes
    parameter_tensors: int
    state_bytes: int  # the state dict (parameters and persistent buffers): one saved copy of the weights
    state_tensors: int

    @classmethod
    def of(cls, module: torch.nn.Module) -> "StateSize":
        params = [p for p in module.parameters() if p.requires_grad]
        state = module.state_dict().values()
        return cls(sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params), len(params),
                   sum(t.numel() * t.element_size() for t in state), len(state))


def saved_file_bytes(tensor_bytes: int, tensors: int, history_steps: int) -> int:
    """The size of a torch.save file of ``tensors`` tensors (``tensor_bytes``) and a history of that many steps."""
    return (tensor_bytes + tensors * SAVED_BYTES_PER_TENSOR + history_steps * SAVED_BYTES_PER_STEP
            + SAVED_FIXED_BYTES)


@dataclass(frozen=True)
class TrainingPlan:
    """How a training step runs on a device, chosen to fit, with its estimated memory and time."""

    preset: Preset
    device: str  # "cuda" or "cpu"
    accelerator: Accelerator | None
    precision: Precision
    gradient_checkpointing: bool
    ema_device: str  # "device" or "cpu"
    peak_bytes: int | None = None  # estimated peak of one training step (None: not estimated)
    flops_per_step: int | None = None
    num_classes: int = 1  # classes of the model: more than 1, a unified model of that many categories
    gpus: int | None = None  # GPUs the whole table is planned on (None: not asked)
    table_categories: int = TABLE_CATEGORIES  # categories of the table, one model each unless unified
    unet_size: StateSize | None = None  # the planned UNet's parameters and state (None: not counted)
    checkpoint_format: str = "exact"  # of checkpoint.pt: "exact" or "compact" (the run chooses "auto"'s at start)
    model_dtype: str = "float32"  # of model.pt's weights: "float32" or "float16"
    native_bf16: bool = False  # a CPU plan: this CPU has bf16 instructions (cpu_has_native_bf16)

    @property
    def channels_last(self) -> bool:
        """Channels-last wherever the UNet runs in a half precision: CUDA's tensor cores, and a CPU's
        oneDNN (bf16 on 2 cores with AMX, back to back: 0.41 s per cpu-preset step in channels-last,
        0.45 s in NCHW). An fp32 run keeps NCHW: on a CPU channels-last is slower there (1.02
        s against 0.91 s) and its sums differ, so a retrained model would not match the shipped one."""
        return self.precision is not Precision.FP32

    @property
    def suggests_bf16(self) -> bool:
        """A CPU run in fp32 by "auto" on a CPU with bf16 instructions: bf16 is the faster opt-in there.
        Not chosen for the user, since the shipped models and every pinned number are fp32's."""
        return (self.device == "cpu" and self.native_bf16 and self.precision is Precision.FP32
                and self.preset.precision == "auto")

    @property
    def budget_bytes(self) -> int | None:
        return None if self.accelerator is None else self.accelerator.memory_bytes - GPU_RESERVE_BYTES

    @property
    def fits(self) -> bool | None:
        if self.peak_bytes is None or self.budget_bytes is None:
            return None
        return self.peak_bytes <= self.budget_bytes

    @property
    def seconds_per_step(self) -> float | None:
        peak = self.accelerator.peak_flops_for(self.precision) if self.accelerator else None
        if not peak or not self.flops_per_step:
            return None
        return self.flops_per_step / (peak * ASSUMED_UTILISATION)

    def describe(self) -> str:
        """One line, e.g. ``T4 15.0 GiB sm_75: fp16 autocast + GradScaler, gradient checkpointing, EMA on
        the device; est. peak 11.3 of 14.0 GiB; est. 0.8 s/step, 2.2 h for 10000 steps; disk: checkpoint
        8.85 GB, model.pt 2.21 GB, 17.9 GB free per model, 48.9 GB for the table's 15 models``."""
        acc = self.accelerator
        where = "cpu" if acc is None else (f"{acc.name} {acc.memory_gib:.1f} GiB "
                                           f"sm_{acc.compute_capability[0]}{acc.compute_capability[1]}")
        precision = "fp32" if self.precision is Precision.FP32 else f"{self.precision.value} autocast"
        if self.precision.needs_grad_scaler:
            precision += " + GradScaler"
        parts = [precision, "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"]
        if self.device == "cuda":
            parts.append("EMA on the GPU" if self.ema_device == "device" else "EMA on the host")
        line = f"{where}: {', '.join(parts)}"
        if self.suggests_bf16:
            line += (" (this CPU has native bf16: --set precision=bf16 trains nearly twice as fast, "
                     "to other weights than fp32's)")
        if self.peak_bytes is not None:
            line += f"; est. peak {self.peak_bytes / GIB:.1f} GiB"
            if self.budget_bytes is not None:
                line += f" of {self.budget_bytes / GIB:.1f} GiB" + ("" if self.fits else " (does NOT fit)")
        if self.seconds_per_step is not None:
            line += (f"; est. {self.seconds_per_step:.2f} s/step, {self.hours_per_model:.1f} h for "
                     f"{self.preset.train_steps} steps")
        if self.gpus is not None and self.hours_for_table is not None:
            gpus = f"{self.gpus} GPU" + ("s" if self.gpus > 1 else "")
            if self.unified:
                line += (f"; the unified model of {self.num_classes} categories on {gpus}: DDP over "
                         f"{self.table_ranks} (batch {self.preset.batch_size} split), "
                         f"est. {self.hours_for_table:.1f} h")
            else:
                line += (f"; the table ({self.table_categories} categories, one model each) on {gpus}: "
                         f"{self.table_rounds} round{'s' if self.table_rounds > 1 else ''}, "
                         f"est. {self.hours_for_table:.1f} h")
        if self.unet_size is not None:
            compact = ""
            if self.preset.checkpoint_format == "auto" and self.checkpoint_format == "exact":
                compact = (f" (compact {self.checkpoint_bytes_for('compact') / GB:.2f} GB, "
                           f"{self.disk_bytes_needed(checkpoint_format='compact') / GB:.1f} GB free)")
            line += (f"; disk: {self.checkpoint_format} checkpoint {self.checkpoint_bytes / GB:.2f} GB, model.pt "
                     f"{self.model_bytes / GB:.2f} GB ({self.model_dtype}), {self.disk_bytes_per_category / GB:.1f} GB "
                     f"free per model{compact}")
            if not self.unified:
                line += f", {self.disk_bytes_for_table / GB:.1f} GB for the table's {self.table_categories} models"
        return line

    @property
    def unified(self) -> bool:
        return self.num_classes > 1

    @property
    def checkpoint_bytes(self) -> int | None:
        """The resumable ``checkpoint.pt`` of a finished run, in the plan's :attr:`checkpoint_format`."""
        return self.checkpoint_bytes_for(self.checkpoint_format)

    def checkpoint_bytes_for(self, checkpoint_format: str) -> int | None:
        """``checkpoint.pt`` of a finished run in a format: AdamW's step per parameter, the random states and
        the history, and "exact": the UNet, its EMA and AdamW's two moments in float32 (the autocast
        precisions change the arithmetic, not the weights), about 16 bytes per parameter; "compact": the
        UNet in float32 (the weights training goes on from), the EMA in float16, the moments in bfloat16,
        about 10 bytes per parameter."""
        size = self.unet_size
        if size is None:
            return None
        if checkpoint_format == "compact":
            tensor_bytes = size.state_bytes + size.state_bytes // 2 + size.parameter_bytes
        else:
            tensor_bytes = 2 * size.state_bytes + 2 * size.parameter_bytes
        return saved_file_bytes(tensor_bytes + 4 * size.parameter_tensors,
                                2 * size.state_tensors + 3 * size.parameter_tensors, self.preset.train_steps)

    @property
    def model_bytes(self) -> int | None:
        """``model.pt`` as :func:`fit` writes it for a finished run: the EMA weights in :attr:`model_dtype`,
        the feature statistics and the history."""
        size = self.unet_size
        if size is None:
            return None
        weights = size.state_bytes // 2 if self.model_dtype == "float16" else size.state_bytes
        return saved_file_bytes(weights, size.state_tensors + 2, self.preset.train_steps)

    def checkpoint_writes(self, from_step: int = 0) -> int:
        """Checkpoints a run writes from ``from_step`` to its end: every ``checkpoint_every`` steps and at the last."""
        steps, every = self.preset.train_steps, self.preset.checkpoint_every
        if from_step >= steps:
            return 0
        return steps // every - from_step // every + (1 if steps % every else 0)

    def disk_bytes_needed(self, from_step: int = 0, checkpoint_on_disk: int = 0, checkpoint_format: str | None = None,
                          with_model: bool = True) -> int | None:
        """Free disk the rest of a run needs, from ``from_step`` with its checkpoint of ``checkpoint_on_disk``
        bytes already written: exactly what the run's own writes will ask for, so a run that starts can finish.

        A checkpoint is written beside the one it replaces (a temporary file, then a rename), so from the
        second write on the disk holds two checkpoints at once; ``model.pt`` is written beside the last
        checkpoint, which is then deleted. Each write asks for its bytes and a small margin
        (:func:`diffad.io.space_to_write`). From scratch, with two writes or more: two checkpoints and the margin.
        ``checkpoint_format``: the checkpoints' (default the plan's); ``with_model=False``: the checkpoints'
        disk alone (checkpoints kept in a scratch folder, the model written elsewhere).
        """
        if self.unet_size is None:
            return None
        checkpoint, held = self.checkpoint_bytes_for(checkpoint_format or self.checkpoint_format), checkpoint_on_disk
        needed, grown = 0, 0  # grown: how much more the disk holds than now, when the next file is written
        for _ in range(min(self.checkpoint_writes(from_step), 2)):  # a third write needs what the second did
            needed = max(needed, grown + space_to_write(checkpoint))
            grown, held = grown + checkpoint - held, checkpoint
        return max(needed, grown + space_to_write(self.model_bytes)) if with_model else needed

    @property
    def disk_bytes_per_category(self) -> int | None:
        """The free disk one model's training needs at its peak (:meth:`disk_bytes_needed` from scratch)."""
        return self.disk_bytes_needed()

    @property
    def disk_bytes_for_table(self) -> int | None:
        """The free disk the whole table needs: the models already finished kept, beside the runs under way
        (one at a time on one GPU; ``gpus`` at once when ``reproduce`` spreads them), at their peak."""
        if self.unet_size is None:
            return None
        if self.unified:
            return self.disk_bytes_per_category
        runs_at_once, peak = min(self.gpus or 1, self.table_categories), 0
        for done in range(0, self.table_categories, runs_at_once):
            running = min(runs_at_once, self.table_categories - done)
            peak = max(peak, done * self.model_bytes + running * self.disk_bytes_per_category)
        return peak

    @property
    def hours_per_model(self) -> float | None:
        return None if self.seconds_per_step is None else self.seconds_per_step * self.preset.train_steps / 3600

    @property
    def table_ranks(self) -> int:
        """GPUs a unified model trains on: the most, up to ``gpus``, that split its batch evenly."""
        gpus = self.gpus or 1
        return max(n for n in range(1, gpus + 1) if self.preset.batch_size % n == 0)

    @property
    def table_rounds(self) -> int:
        """How many models one GPU trains in turn when the table's models spread over ``gpus`` (reproduce)."""
        return 1 if self.unified else math.ceil(self.table_categories / (self.gpus or 1))

    @property
    def hours_for_table(self) -> float | None:
        """Training time of the whole table: ``table_rounds`` models in turn on the busiest GPU; a unified
        model's steps split over ``table_ranks`` GPUs (ideal scaling: communication left out)."""
        hours = self.hours_per_model
        if hours is None:
            return None
        return hours / self.table_ranks if self.unified else hours * self.table_rounds

    def to_json(self) -> dict:
        acc = self.accelerator
        return {
            "preset": self.preset.replace(precision=self.precision.value, ema_device=self.ema_device,
                                          gradient_checkpointing=self.gradient_checkpointing).to_dict(),
            "device": self.device,
            "accelerator": None if acc is None else {"name": acc.name, "memory_bytes": acc.memory_bytes,
                                                     "compute_capability": list(acc.compute_capability)},
            "precision": self.precision.value, "grad_scaler": self.precision.needs_grad_scaler,
            "gradient_checkpointing": self.gradient_checkpointing, "ema_device": self.ema_device,
            "channels_last": self.channels_last, "peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes,
            "fits": self.fits, "flops_per_step": self.flops_per_step, "seconds_per_step": self.seconds_per_step,
            "assumed_utilisation": ASSUMED_UTILISATION, "native_bf16": self.native_bf16,
            "hours_per_category": self.hours_per_model,
            "num_classes": self.num_classes, "gpus": self.gpus, "table_categories": self.table_categories,
            "table_models": 1 if self.unified else self.table_categories,
            "table_rounds": self.table_rounds, "table_ranks": self.table_ranks if self.unified else 1,
            "hours_for_table": self.hours_for_table,
            "unet_parameters": None if self.unet_size is None else self.unet_size.parameters,
            "checkpoint_format": self.checkpoint_format, "checkpoint_bytes": self.checkpoint_bytes,
            "model_dtype": self.model_dtype, "model_bytes": self.model_bytes,
            "compact_checkpoint_bytes": self.checkpoint_bytes_for("compact"),
            "disk_bytes_per_category_compact": self.disk_bytes_needed(checkpoint_format="compact"),
            "disk_bytes_per_category": self.disk_bytes_per_category, "disk_bytes_for_table": self.disk_bytes_for_table,
            "summary": self.describe(),
        }


def choose_model_dtype(model_dtype: str, precision: Precision) -> str:
    """model.pt's dtype for a preset's ``model_dtype``: "auto" is float16 where the run computes in a half
    precision (fp16 or bf16 autocast rounds the weights to 16 bits in every convolution anyway; float16
    keeps 3 more bits than bf16), else float32. The paper's 554M-parameter EMA: 1.1 GB instead of 2.2."""
    if model_dtype != "auto":
        return model_dtype
    return "float32" if precision is Precision.FP32 else "float16"


def plan_training(preset: str | Preset = "paper", device=None, *, memory_gib: float | None = None,
                  compute_capability: tuple[int, int] | None = None, num_classes: int = 1,
                  feature_channels: int | None = None, estimate: bool = True, gpus: int | None = None,
                  table_categories: int | None = None) -> TrainingPlan:
    """The device plan of a training run: precision, gradient checkpointing, where the EMA lives.

    Each choice the preset leaves open ("auto", None) is made here; the rest are kept as forced.
    On a GPU (the one present, or one described by ``memory_gib`` and ``compute_capability``, e.g.
    15 and (7, 5) for a Colab T4) the candidates are tried cheapest first (no checkpointing with the
    EMA on the device, then checkpointing, then the EMA on the host) and the first whose
    estimated peak fits the memory less 1 GiB is taken. The estimate runs one real
    :func:`training_step` on fake tensors (:func:`estimate_training_step`): no GPU, no weights.
    The UNet's parameters are counted on the meta device, for the plan's file sizes and disk needs.

    ``gpus`` adds the whole table's training time on that many such GPUs (``reproduce`` under
    torchrun): ``table_categories`` (MVTec-AD's 15 by default) models, one per category, spread
    over the GPUs, so ceil(categories / gpus) of them in turn; for a unified model
    (``num_classes`` > 1), one model whose batch DDP splits over the GPUs.
    """
    if gpus is not None and gpus < 1:
        raise ValueError(f"gpus must be 1 or more, got {gpus}")
    if table_categories is not None and table_categories < 1:
        raise ValueError(f"table_categories must be 1 or more, got {table_categories}")
    table = dict(num_classes=num_classes, gpus=gpus,
                 table_categories=num_classes if num_classes > 1 else (table_categories or TABLE_CATEGORIES))
    preset = get_preset(preset)
    accelerator = accelerator_of(device, memory_gib, compute_capability)
    device_type = "cpu" if accelerator is None else "cuda"
    precision = choose_precision(preset.precision, device_type,
                                 accelerator.compute_capability if accelerator else None)
    checkpointing = [False, True] if preset.gradient_checkpointing is None else [bool(preset.gradient_checkpointing)]
    ema_places = ["device", "cpu"] if preset.ema_device == "auto" else [preset.ema_device]
    candidates = [(c, e) for e in ema_places for c in checkpointing]
    if device_type == "cpu":
        candidates = candidates[:1]
    if feature_channels is None:
        feature_channels = FeatureExtractor(preset.backbone, layers=preset.backbone_layers, pretrained=False).out_channels
    with torch.device("meta"):  # counted, not allocated: the paper's UNet has 554M parameters
        unet_size = StateSize.of(build_unet(preset, feature_channels, num_classes if preset.class_cond else None))
    storage = dict(checkpoint_format="compact" if preset.checkpoint_format == "compact" else "exact",
                   model_dtype=choose_model_dtype(preset.model_dtype, precision))
    native_bf16 = device_type == "cpu" and cpu_has_native_bf16()
    plan = None
    for gradient_checkpointing, ema_device in candidates:
        plan = TrainingPlan(preset, device_type, accelerator, precision, gradient_checkpointing, ema_device, **table,
                            unet_size=unet_size, native_bf16=native_bf16, **storage)
        if not estimate:
            return plan
        peak, _ = estimate_training_step(plan, feature_channels, num_classes)
        plan = dataclasses.replace(plan, peak_bytes=peak)
        if plan.fits is not False:
            break
    _, flops = estimate_training_step(plan, feature_channels, num_classes, count_flops=True)
    return dataclasses.replace(plan, flops_per_step=flops)


def estimate_training_step(plan: TrainingPlan, feature_channels: int, num_classes: int = 1,
                           count_flops: bool = False) -> tuple[int, int | None]:
    """Peak bytes on the device, and FLOPs (``count_flops``), of one steady-state :func:`training_step`.

    Runs on fake tensors (``FakeTensorMode``): the optimizer's state is made as a first step
    would make it, then one step is measured with :class:`diffad.device.PeakMemory` (weights, gradients, AdamW state,
    activations, temporaries, the EMA where it lives on the device, the backbone and its
    features when they are computed per batch) and counted with ``FlopCounterMode``. CPU autocast
    stands in for CUDA's (same dtype; its cast lists differ in minor ops); the GradScaler is left
    out (its state is a few scalars, and its overflow check needs real values).
    """
    preset = plan.preset
    with FakeTensorMode():
        unet = build_unet(preset, feature_channels, num_classes if preset.class_cond else None,
                          plan.gradient_checkpointing)
        ema = None  # a second build, not a deepcopy (which would make its own fake mode)
        if plan.ema_device == "device":
            ema = build_unet(preset, feature_channels, num_classes if preset.class_cond else None).requires_grad_(False)
        extractor = None if preset.precompute_features else build_feature_extractor(preset, "cpu", pretrained=False)
        optimizer = make_optimizer(unet, preset, plan.device)
        diffusion = build_diffusion(preset)
        kwargs = dict(lr=preset.lr, feature_loss_weight=preset.feature_loss_weight, grad_clip=preset.grad_clip,
                      precision=plan.precision, ema=ema, ema_rate=preset.ema_rate, check_finite=False)

        def fake_batch() -> Batch:
            b, size, grid = preset.batch_size, preset.image_size, feature_grid(preset)
            x0 = torch.rand(b, 3, size, size) * 2 - 1
            with torch.no_grad():
                target = extractor(x0) if extractor is not None else torch.randn(b, feature_channels, grid, grid)
            y = torch.zeros(b, dtype=torch.long) if preset.class_cond else None
            return Batch(x0, torch.randint(preset.diffusion_steps, (b,)), torch.randn_like(x0), target, y)

        unet.train()
        for param in unet.parameters():  # AdamW's state, as after a first step
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        block = CUDA_BLOCK_BYTES if plan.device == "cuda" else 1
        with PeakMemory(block) as memory:
            memory.track(unet, optimizer, *([ema] if ema is not None else []),
                         *([extractor] if extractor is not None else []))
            training_step(unet, optimizer, diffusion, fake_batch(), **kwargs)
        flops = None
        if count_flops:  # a step of its own: the counter keeps what checkpointing would free
            with FlopCounterMode(display=False) as counter:
                training_step(unet, optimizer, diffusion, fake_batch(), **kwargs)
            flops = counter.get_total_flops()
    return memory.peak_bytes, flops
