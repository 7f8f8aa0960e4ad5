"""Training: the denoiser learns normal images, and their backbone features, from noisy ones.

One step draws a batch of normal images x0 and timesteps t, noises them to x_t and runs the
UNet once. Its diffusion output gives guided-diffusion's hybrid loss (epsilon MSE plus the
variational bound for the learned variance); its feature head, trained to predict the
backbone's features of the clean x0 from x_t, adds ``feature_loss_weight`` times an MSE.

AdamW with the learning rate annealed linearly to 0, an EMA of the weights (the EMA weights
are what scoring uses), gradient clipping, bf16 autocast and channels-last on CUDA; fp16 with a
GradScaler below compute capability 8.0, where a step with non-finite gradients is skipped and
counted (``skipped`` in the history), not an error, and the EMA moves only after a real step.
The loop reads its losses on the host every ``LOG_EVERY`` steps, not every step.
Checkpoints hold model, EMA, optimizer, step and every random state, and are written
atomically (a temporary file, then a rename): a run interrupted and resumed ends with the same
weights as one that was not. A finished run keeps ``model.pt`` and deletes its checkpoint; a run
that the free disk could not carry to its end is refused before its first step
(:class:`InsufficientDiskSpace`, sized by :meth:`TrainingPlan.disk_bytes_needed`).

Under ``torchrun --nproc_per_node N`` one model trains with DistributedDataParallel: every rank
draws the preset's whole batch from the same seeded stream and trains on its N-th of it, so N
processes compute what one does, up to the order of floating-point sums (see :func:`fit`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from diffad import distributed
from diffad.backbones import FeatureExtractor
from diffad.checks import check_images
from diffad.data import MVTecAD, to_diffusion_range
from diffad.device import (CUDA_BLOCK_BYTES, GIB, Accelerator, PeakMemory, Precision, accelerator_of,
                           choose_precision, pick_device)
from diffad.diffusion import GaussianDiffusion
from diffad.io import (InsufficientDiskSpace, atomic_save, free_disk_bytes, load_torch_file, scratch_dir,
                       space_to_write)
from diffad.models import create_unet, load_guided_diffusion_checkpoint, resolve_init_checkpoint
from diffad.presets import SCORING_FIELDS, Preset, get_preset, training_differences

__all__ = ["fit", "training_step", "plan_training", "TrainingPlan", "StateSize", "TrainedModel", "pick_device",
           "atomic_save", "InsufficientDiskSpace"]

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
# The training loop reads its losses on the host every LOG_EVERY steps (and before each checkpoint
# and at the end of a call), not every step: reading a tensor's value waits for the device.
LOG_EVERY = 10
LOSS_NAMES = ("loss", "mse", "vb", "feature")


def build_diffusion(preset: Preset, respacing: str = "") -> GaussianDiffusion:
    """The Gaussian diffusion of a preset; ``respacing`` e.g. "250" for the scoring schedule."""
    return GaussianDiffusion.from_config(
        steps=preset.diffusion_steps,
        noise_schedule=preset.noise_schedule,
        learn_sigma=True,
        timestep_respacing=respacing,
    )


def build_feature_extractor(preset: Preset, device=None, pretrained: bool = True) -> FeatureExtractor:
    """The frozen backbone whose features of the clean image the feature head learns."""
    extractor = FeatureExtractor(
        preset.backbone,
        layers=preset.backbone_layers,
        grid_size=preset.image_size // 4,
        input_size=preset.backbone_input_size,
        pretrained=pretrained,
        imagenet_normalize=preset.backbone_normalization,
    )
    return extractor.to(pick_device(device))


def build_unet(preset: Preset, feature_channels: int, num_classes: int | None, gradient_checkpointing: bool = False):
    """The ADM UNet of a preset, with a feature head of ``feature_channels`` outputs.

    ``gradient_checkpointing`` recomputes each block's activations in the backward pass
    (non-reentrant, so it is safe under autocast): the same weights and gradients, far less memory.
    """
    overrides = dict(preset.unet_overrides)
    if gradient_checkpointing:
        overrides["use_checkpoint"] = True
    return create_unet(
        preset.unet,
        image_size=preset.image_size,
        num_classes=num_classes,
        feature_channels=feature_channels,
        **overrides,
    )


@dataclass
class TrainedModel:
    """A trained denoiser with everything scoring needs: preset, categories, EMA weights."""

    preset: Preset
    categories: list[str]
    unet: torch.nn.Module
    feature_channels: int
    history: list[dict] = field(default_factory=list)
    feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # per-channel (mean, std) of targets

    def scored_as(self, preset: Preset) -> TrainedModel:
        """This model with ``preset``'s scoring settings (``SCORING_FIELDS``), the same weights.

        A checkpoint records the preset of its training day, scoring settings included; a model
        is scored with the settings asked for now, as :func:`fit` does for a finished run.
        """
        scoring = {name: getattr(preset, name) for name in SCORING_FIELDS}
        return dataclasses.replace(self, preset=self.preset.replace(**scoring))

    def feature_target(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features as the feature head was trained to predict them."""
        return standardize(features, self.feature_stats)

    @property
    def num_classes(self) -> int | None:
        return len(self.categories) if self.preset.class_cond else None

    @property
    def skipped_steps(self) -> int:
        """Steps the GradScaler skipped (fp16: non-finite gradients), from the history."""
        return skipped_in(self.history)

    def class_index(self, category: str) -> int:
        if category not in self.categories:
            raise ValueError(f"this model was trained on {self.categories}, not on {category!r}")
        return self.categories.index(category)

    def unet_kwargs(self, category: str | None, batch: int, device=None) -> dict:
        """The UNet's class-label argument ``{"y": ...}`` for a class-conditional model, else ``{}``."""
        if not self.num_classes:
            return {}
        if category is None:
            raise ValueError(f"this model is conditioned on the category: pass category= one of {self.categories}")
        return {"y": torch.full((batch,), self.class_index(category), dtype=torch.long, device=device)}

    def save(self, path: str | Path, half: bool = False) -> Path:
        """Write the EMA weights and settings (atomically); ``half`` stores the weights as float16."""
        weights = self.unet.state_dict()
        if half:
            weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        state = {
            "preset": self.preset.to_dict(),
            "categories": self.categories,
            "feature_channels": self.feature_channels,
            "unet": weights,
            "history": self.history,
            "feature_stats": self.feature_stats,
        }
        return atomic_save(state, path)

    @classmethod
    def load(cls, path: str | Path, device=None) -> "TrainedModel":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trained model at {path}; train one with diffad.train.fit")
        state = load_torch_file(path)
        if "unet" not in state or "preset" not in state:
            raise ValueError(f"{path} is not a diffad model file (a training checkpoint? use fit to resume it)")
        preset = Preset.from_dict(state["preset"])
        unet = build_unet(preset, state["feature_channels"], len(state["categories"]) if preset.class_cond else None)
        unet.load_state_dict(state["unet"])
        unet.to(pick_device(device)).eval()
        return cls(preset, list(state["categories"]), unet, state["feature_channels"], state.get("history", []),
                   state.get("feature_stats"))


def skipped_in(history: list[dict]) -> int:
    """How many steps of a training history the GradScaler skipped; records from before the
    ``skipped`` field was kept (older checkpoints and models) count as real steps."""
    return sum(1 for record in history if record.get("skipped"))


def load_training_images(data_root, categories: list[str], preset: Preset) -> tuple[torch.Tensor, torch.Tensor]:
    """All normal training images of the categories in [-1, 1], and their category indices.

    ``data_root`` is an MVTec-layout folder, or a reader with a ``dataset(category, split, preset)``
    method (:class:`diffad.data.folder.ImageFolder`, a plain folder of photos)."""
    images, labels = [], []
    for index, category in enumerate(categories):
        if hasattr(data_root, "dataset"):
            dataset = data_root.dataset(category, "train", preset)
        else:
            dataset = MVTecAD(data_root, category, split="train", image_size=preset.image_size,
                              val_fraction=preset.val_fraction, seed=preset.seed, image_resize=preset.image_resize)
        x, _, _ = dataset.stack()
        images.append(to_diffusion_range(x))
        labels.append(torch.full((len(x),), index, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def compute_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Backbone features of images in [-1, 1], in batches."""
    device = next(extractor.parameters()).device
    return torch.cat([extractor(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of (N, C, h, w) features."""
    return features.mean(dim=(0, 2, 3)), features.std(dim=(0, 2, 3)).clamp_min(1e-6)


def standardize(features: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """z-score each channel with training statistics; ``stats=None`` leaves features raw (the paper)."""
    if stats is None:
        return features
    mean, std = (s.to(features.device)[None, :, None, None] for s in stats)
    return (features - mean) / std


def _rng_states(generator: torch.Generator, device: torch.device | None = None) -> dict:
    states = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        if distributed.launched():  # one process per GPU: its own stream, no context made on the others
            if device is not None and device.type == "cuda":
                states["cuda_device"] = torch.cuda.get_rng_state(device)
        else:
            states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(generator: torch.Generator, states: dict, device: torch.device | None = None) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if not torch.cuda.is_available():
        return
    if distributed.launched():
        if device is not None and device.type == "cuda":
            saved = states.get("cuda") or []
            state = states.get("cuda_device")
            if state is None and saved:
                state = saved[min(device.index or 0, len(saved) - 1)]
            if state is not None:
                torch.cuda.set_rng_state(state, device)
    elif states.get("cuda"):
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])  # a machine with fewer GPUs
    elif states.get("cuda_device") is not None:
        torch.cuda.set_rng_state(states["cuda_device"])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float,
               skipped: torch.Tensor | None = None) -> None:
    """ema <- rate * ema + (1 - rate) * model, parameter by parameter (the EMA may live on the host).

    ``skipped``, a 0-d tensor that is 1 when the optimizer did not step (a GradScaler skipped it),
    turns the update into ema <- ema there, decided on the device: the weight of the model becomes
    0 and ``lerp_`` leaves every (finite) EMA value as it is, with no host synchronisation. Without
    it, the update is the plain one, unchanged. (An EMA on the host copies the weights there every
    step, which waits for the GPU: the plan puts it there only when the GPU's memory is short.)
    """
    weight = 1.0 - rate
    if skipped is not None:
        first = next(ema.parameters())
        weight = ((1.0 - skipped.float()) * weight).to(first.device, first.dtype)
    for target, source in zip(ema.parameters(), model.parameters()):
        target.lerp_(source.detach().to(target.device), weight)


def ema_rate_at(step: int, rate: float, warmup: bool = True) -> float:
    """EMA warm-up: early on the average follows the weights closely, then settles at ``rate``.

    Without warm-up (the authors' trainer) the rate is ``rate`` from the first step, so the
    average keeps the starting weights' share ``rate ** step`` for longer.
    """
    return min(rate, (1.0 + step) / (10.0 + step)) if warmup else rate


def lr_at(step: int, preset: Preset) -> float:
    """Learning rate annealed linearly from ``lr`` to 0 over ``lr_anneal_steps``."""
    if preset.lr_anneal_steps <= 0:
        return preset.lr
    return preset.lr * max(0.0, 1.0 - step / preset.lr_anneal_steps)


def make_optimizer(unet: torch.nn.Module, preset: Preset, device_type: str) -> torch.optim.AdamW:
    """AdamW; on a GPU the fused kernel, which updates in place without a temporary copy of the
    weights (the for-each kernel's copy is 2 GiB for the paper model)."""
    return torch.optim.AdamW(unet.parameters(), lr=preset.lr, weight_decay=preset.weight_decay,
                             fused=True if device_type == "cuda" else None)


@dataclass
class Batch:
    """One training batch on the device: clean images in [-1, 1], timesteps (original steps), noise,
    the feature head's targets, and class labels (None for an unconditional model)."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor | None = None


def training_step(unet, optimizer, diffusion: GaussianDiffusion, batch: Batch, *, lr: float,
                  feature_loss_weight: float, grad_clip: float | None, precision: Precision = Precision.FP32,
                  scaler=None, ema: torch.nn.Module | None = None, ema_rate: float = 0.0,
                  channels_last: bool = False, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """One optimisation step: noise x0 to x_t, one UNet pass, hybrid + feature loss, AdamW, EMA.

    ``precision`` sets the autocast dtype of the UNet's pass (the losses are computed in fp32).
    ``scaler`` (a ``torch.amp.GradScaler``, for fp16) scales the loss; a step whose gradients are
    not finite (as a non-finite loss makes them) is *skipped*, never an error: the scaler lowers
    its scale, the optimizer does not step and the EMA does not move (the authors' trainer, too,
    updates the EMA only after a real step). Without a scaler (fp32, bf16) ``check_finite``
    raises ``FloatingPointError`` on a non-finite loss; that check reads the loss on the host
    (a synchronisation), so :func:`fit` passes ``check_finite=False`` and checks the losses it
    logs instead.

    Returns the step's losses as 0-d tensors, and with a scaler ``skipped`` (1.0 for a skipped
    step, else 0.0), all on the device (no host synchronisation), so :func:`fit`, the benchmarks
    and the memory plan (on fake tensors) run exactly this code.
    """
    if scaler is not None and not scaler.is_enabled():
        scaler = None  # a disabled scaler scales nothing and skips nothing
    x_t = diffusion.q_sample(batch.x0, batch.t, noise=batch.noise)
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr
    dtype = precision.autocast_dtype
    with torch.autocast(batch.x0.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        output, features = unet(x_t, batch.t, y=batch.y, return_features=True)
    losses = diffusion.training_losses_from_output(output.float(), batch.x0, x_t, batch.t, batch.noise)
    feature_loss = F.mse_loss(features.float(), batch.target)
    loss = losses["loss"].mean() + feature_loss_weight * feature_loss
    if check_finite and scaler is None and not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}; lower lr (now {lr:g})")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
    skipped = None
    if scaler is not None:
        scaler.step(optimizer)
        # Whether the scaler skipped the step, kept as a device tensor (reading it on the host would
        # wait for the device): the found-inf flag that unscale_ recorded and that step() (no
        # optimizer step) and update() (a lower scale) act on, taken before update() clears it.
        # Comparing the scale before and after update() would say the same less directly. One
        # device per process, so one flag; under DDP the same on every rank (all-reduced gradients).
        skipped = (sum(scaler._found_inf_per_device(optimizer).values()) > 0).float()
        scaler.update()
    else:
        optimizer.step()
    if ema is not None:
        update_ema(ema, unet, ema_rate, skipped)
    result = {"loss": loss.detach(), "mse": losses["mse"].mean().detach(), "vb": losses["vb"].mean().detach(),
              "feature": feature_loss.detach()}
    if skipped is not None:
        result["skipped"] = skipped
    return result


def draw_batch(generator: torch.Generator, n_images: int, batch_size: int, max_t: int, image_shape) -> tuple:
    """Indices of the batch's images, its timesteps and its noise, all from ``generator`` (on the CPU)."""
    idx = torch.randint(n_images, (batch_size,), generator=generator)
    t = torch.randint(max_t, (batch_size,), generator=generator)
    noise = torch.randn((batch_size, *image_shape), generator=generator)
    return idx, t, noise


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

    @property
    def channels_last(self) -> bool:
        return self.device == "cuda" and self.precision is not Precision.FP32

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
            "assumed_utilisation": ASSUMED_UTILISATION,
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
    if preset.ema_device not in ("auto", "device", "cpu"):
        raise ValueError(f"ema_device must be 'auto', 'device' or 'cpu', got {preset.ema_device!r}")
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
    plan = None
    for gradient_checkpointing, ema_device in candidates:
        plan = TrainingPlan(preset, device_type, accelerator, precision, gradient_checkpointing, ema_device, **table,
                            unet_size=unet_size, **storage)
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
            b, size, grid = preset.batch_size, preset.image_size, preset.image_size // 4
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


def fit(
    data_root,
    categories: str | list[str],
    out_dir,
    preset: str | Preset = "cpu",
    device=None,
    progress: bool = True,
    stop_after: int | None = None,
    ddp: bool | None = None,
    **overrides,
) -> TrainedModel:
    """Train (or resume, or load) a denoiser on the normal images of one or more categories.

    ``out_dir`` receives ``checkpoint.pt`` every ``checkpoint_every`` steps and ``model.pt`` (EMA
    weights) at the end; a finished ``model.pt`` is loaded instead of retraining, a checkpoint
    resumed. Several categories train one unified, class-conditional model. ``stop_after``
    ends the run early after that many steps in this call (for demonstrations and tests of resume);
    its checkpoint stays for the next call.
    Before training, the device plan (precision, gradient checkpointing, where the EMA lives,
    estimated peak memory on a GPU, the disk it needs) is printed.

    Disk, for a Colab whose Google Drive has a few GB free: a finished run keeps only ``model.pt``
    (float16 where the run computed in a half precision: the preset's ``model_dtype``). Once it is
    written (atomically), the resumable ``checkpoint.pt`` (weights, EMA and AdamW's two moments) is
    deleted, and so is one left beside a finished model by a run cut off in between, with any
    temporary file of an interrupted write. Before the first step the run chooses its checkpoints'
    format and folder (:func:`choose_checkpoint_storage`: exact ones in ``out_dir``, else compact ones
    there, else in ``$DIFFAD_SCRATCH``), or is refused with :class:`InsufficientDiskSpace` (an
    OSError) naming what each needs and what is free, rather than failing at a later checkpoint.

    Memory on resume: the models are built from the checkpoint's own tensors, not built and then
    overwritten, so host memory holds the checkpoint's state once, also where it cannot be
    memory-mapped (a Google Drive mount) and the file is read whole (:meth:`_TrainingRun.restore`).

    Several processes (``ddp``; None: whenever torchrun started this one among several) train
    one model with DistributedDataParallel, each on ``cuda:LOCAL_RANK`` (NCCL) or the CPU
    (gloo). The global batch stays the preset's ``batch_size``, which must divide by the number
    of processes: every rank draws the whole batch from the same seeded generator (so the stream
    stays the same on all of them) and trains on its share, rank r on the r-th. DDP averages the
    gradients, which gives the single-process gradient; the recorded losses are the global means.
    Rank 0 alone prints and writes checkpoints and ``model.pt`` while the others wait. A checkpoint
    holds the unwrapped model and the shared generator's state, so a run resumes with any number
    of processes. A rank that dies or hangs stops the others with
    :class:`diffad.distributed.PeerLost` (see ``DIFFAD_DDP_TIMEOUT``) rather than a hang.
    """
    if ddp is None:
        ddp = distributed.launched()
    if not ddp:
        return _fit(data_root, categories, out_dir, preset, device, progress, stop_after, False, overrides)
    batch_size = get_preset(preset, **overrides).for_categories(categories).batch_size
    if batch_size % distributed.world_size():  # before the group: every rank says so and stops
        raise ValueError(
            f"batch_size {batch_size} does not split over {distributed.world_size()} processes: start torchrun "
            f"with a --nproc_per_node that divides it, or --set batch_size= a multiple of it")
    with distributed.process_group(device) as device, distributed.peer_errors("training"):
        return _fit(data_root, categories, out_dir, preset, device, progress, stop_after,
                    distributed.is_distributed(), overrides)


def _fit(data_root, categories, out_dir, preset, device, progress, stop_after, ddp: bool, overrides) -> TrainedModel:
    categories = [categories] if isinstance(categories, str) else list(categories)
    if not categories:
        raise ValueError("no category to train on")
    preset = get_preset(preset, **overrides).for_categories(categories)
    if len(categories) > 1 and not preset.class_cond:
        preset = preset.replace(class_cond=True)  # one model for several categories needs the label
    out_dir, device = Path(out_dir), pick_device(device)
    model_path = out_dir / MODEL_NAME
    writer = not ddp or distributed.is_main()
    if model_path.is_file():
        trained = TrainedModel.load(model_path, device)
        _check_same_run(trained.preset, trained.categories, preset, categories, model_path)
        if writer:  # a run cut off between writing model.pt and deleting its checkpoint
            _remove_resumable_state(out_dir)
        trained.preset = preset  # same training; the scoring settings asked for now
        return trained
    resuming = find_checkpoint(out_dir) is not None
    if ddp:  # one download per cache: rank 0 first, the others then find the file
        init = None if resuming else distributed.in_turn(lambda: resolve_init_checkpoint(preset.init_checkpoint))
    else:
        init = None if resuming else resolve_init_checkpoint(preset.init_checkpoint)  # fails fast offline
    run = _TrainingRun.start(data_root, categories, preset, device, init, progress, ddp, out_dir)
    run.train(preset.train_steps if stop_after is None else min(preset.train_steps, run.step + stop_after),
              progress)
    trained = TrainedModel(preset, categories, run.ema, run.extractor.out_channels, run.history, run.stats)
    if run.step >= preset.train_steps and run.rank == 0:
        trained.save(model_path, half=run.plan.model_dtype == "float16")
        if run.plan.model_dtype == "float16":  # the model returned now is the one model.pt gives later
            _round_to_half(trained.unet)
        _remove_resumable_state(out_dir)  # the finished model replaces it, a quarter of its size or less
    if ddp:
        distributed.wait_for_all("rank 0 writing model.pt")
    return trained


def _remove_resumable_state(out_dir: Path) -> None:
    """Delete the checkpoint of a finished run (in ``out_dir`` or its scratch folder), and temporary files
    of writes that were cut off."""
    for place in checkpoint_places(out_dir):
        (place / CHECKPOINT_NAME).unlink(missing_ok=True)
        _remove_interrupted_writes(place)


def _remove_interrupted_writes(out_dir: Path) -> None:
    """Delete what atomic writes of the checkpoint or model cut off in the middle left behind (a killed
    runtime): temporary files as large as the checkpoint, which nothing reads."""
    for name in (CHECKPOINT_NAME, MODEL_NAME):
        for leftover in out_dir.glob(f"{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def scratch_checkpoint_dir(out_dir: str | Path) -> Path | None:
    """Where a run into ``out_dir`` keeps its checkpoints when ``out_dir``'s disk cannot hold them:
    ``$DIFFAD_SCRATCH/runs/<folder name>-<hash of its path>`` (:func:`diffad.io.scratch_dir`), else None."""
    scratch = scratch_dir()
    if scratch is None:
        return None
    out = Path(out_dir).expanduser().absolute()
    return scratch / "runs" / f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"


def checkpoint_places(out_dir: str | Path) -> list[Path]:
    """The folders a run into ``out_dir`` may keep its checkpoint in: ``out_dir``, then its scratch folder."""
    scratch = scratch_checkpoint_dir(out_dir)
    return [Path(out_dir)] + ([scratch] if scratch is not None else [])


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The resumable checkpoint of a run into ``out_dir`` (the newer, where both places hold one), or None."""
    found = [place / CHECKPOINT_NAME for place in checkpoint_places(out_dir) if (place / CHECKPOINT_NAME).is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def choose_checkpoint_storage(plan: TrainingPlan, out_dir: Path, existing: Path | None = None,
                              from_step: int = 0) -> tuple[str, Path]:
    """The format and folder of a run's checkpoints, chosen before its first step so the rest of it fits:
    ``(checkpoint_format, folder)``, else :class:`InsufficientDiskSpace` (an OSError) naming each need.

    The preset's ``checkpoint_format`` "auto" tries, in order: exact checkpoints in ``out_dir``; compact ones
    there (a free Colab's Google Drive holds these: 11.1 GB for the paper preset against 17.9); exact, then
    compact, ones in the scratch folder (:func:`scratch_checkpoint_dir`, on the machine's own disk, where a
    disconnect loses them) with ``model.pt`` still written to ``out_dir``. A named format tries only itself.
    A resumed run keeps its checkpoint's folder. Needs are :meth:`TrainingPlan.disk_bytes_needed`, free space
    that of each folder's disk; without this, a run short of space would fail at a checkpoint hours in.
    """
    formats = ("exact", "compact") if plan.preset.checkpoint_format == "auto" else (plan.preset.checkpoint_format,)
    places = [existing.parent] if existing is not None else checkpoint_places(out_dir)
    on_disk = existing.stat().st_size if existing is not None else 0
    model_free, model_folder = free_disk_bytes(out_dir)
    tried = []
    for place in places:
        here = place.absolute() == out_dir.absolute()
        free, folder = free_disk_bytes(place)
        for checkpoint_format in formats:
            needed = plan.disk_bytes_needed(from_step, on_disk, checkpoint_format, with_model=here)
            if needed is None:
                return checkpoint_format, place
            model_fits = here or model_free >= space_to_write(plan.model_bytes)
            if free >= needed and model_fits:
                return checkpoint_format, place
            size = plan.checkpoint_bytes_for(checkpoint_format) / GB
            tried.append(f"{checkpoint_format} checkpoints of {size:.3g} GB need about {needed / GB:.3g} GB "
                         f"and {free / GB:.3g} GB are free on the disk of {folder}")
            if free >= needed:
                tried[-1] = (f"{checkpoint_format} checkpoints fit {folder}, but model.pt needs "
                             f"{space_to_write(plan.model_bytes) / GB:.3g} GB and {model_free / GB:.3g} GB are free "
                             f"on the disk of {model_folder}")
    model = f"model.pt of {plan.model_bytes / GB:.3g} GB"
    raise InsufficientDiskSpace(
        f"not enough free disk space to train into {out_dir}: the rest of this run needs two checkpoints at once "
        f"while one replaces the other, then {model} ({'; '.join(tried)}); free some space there, or train into "
        f"a folder on a larger disk (another out_dir or --out, or DIFFAD_CACHE pointed elsewhere for the book's "
        f"cache, or DIFFAD_SCRATCH set to a folder on the machine's disk for the checkpoints)")


def compact_state(ema: dict, optimizer: dict) -> tuple[dict, dict]:
    """A checkpoint's EMA in float16 and AdamW's moments in bfloat16 (their range: a squared gradient
    can be far below float16's smallest number); the UNet's own weights, which training goes on from,
    stay float32 (10 bytes per parameter instead of 16). Resuming casts them back (:func:`_as_float32`,
    and AdamW's ``load_state_dict`` casts its state to the parameters' dtype)."""
    ema = {k: v.half() if v.is_floating_point() else v for k, v in ema.items()}
    state = {index: {k: v.to(torch.bfloat16) if k in ("exp_avg", "exp_avg_sq") else v for k, v in moments.items()}
             for index, moments in optimizer["state"].items()}
    return ema, {**optimizer, "state": state}


@torch.no_grad()
def _round_to_half(module: torch.nn.Module) -> None:
    """Round a module's floating weights to float16's values, in place, keeping their dtype."""
    for tensor in module.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.half())


def _as_float32(weights: dict) -> dict:
    """A state dict with its half-precision floats in float32 (a compact checkpoint's EMA); float32 as is."""
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in weights.items()}


class _TrainingRun:
    """The state of one training run (models, optimizer, data, random streams) and its loop."""

    @classmethod
    def start(cls, data_root, categories, preset: Preset, device: torch.device, init, progress: bool,
              ddp: bool = False, out_dir: Path | None = None):
        """A run ready for its next step: fresh (from ``init`` weights, or a new initialisation), or resumed
        from the checkpoint of a run into ``out_dir`` (:func:`find_checkpoint`). Rank 0 chooses where and how
        its checkpoints are written (:func:`choose_checkpoint_storage`), or refuses it if no disk could hold
        the rest. Without ``out_dir``, nothing is read or written."""
        self = cls()
        self.preset, self.categories, self.device = preset, categories, device
        self.ddp = ddp
        self.rank, self.world = (distributed.rank(), distributed.world_size()) if ddp else (0, 1)
        self.share = preset.batch_size // self.world  # images of each rank's part of the batch
        torch.manual_seed(preset.seed)
        self.generator = torch.Generator().manual_seed(preset.seed)
        self.images, self.labels = load_training_images(data_root, categories, preset)
        self.extractor = build_feature_extractor(preset, device)
        self.num_classes = len(categories) if preset.class_cond else None
        # Each GPU holds its share of the batch: the memory estimate is made for that.
        plan_preset = preset if self.world == 1 else preset.replace(batch_size=self.share)
        self.plan = plan_training(plan_preset, device, num_classes=self.num_classes or 1,
                                  feature_channels=self.extractor.out_channels, estimate=device.type == "cuda")
        if progress and self.rank == 0:
            line = f"train {'+'.join(categories)}: {self.plan.describe()}"
            if out_dir is not None:  # where the checkpoints and the model go, and the room there
                free, folder = free_disk_bytes(out_dir)
                line += f"; {free / GB:.1f} GB free at {folder}"
            if ddp:
                line += (f"; DDP over {self.world} processes, batch {preset.batch_size} = "
                         f"{self.world} x {self.share}")
            print(line)
        self.ema_device = device if self.plan.ema_device == "device" else torch.device("cpu")
        self.scaler = torch.amp.GradScaler(device.type) if self.plan.precision.needs_grad_scaler else None
        self.step, self.history, self.skipped_steps = 0, [], 0
        state, existing = None, None if out_dir is None else find_checkpoint(out_dir)
        if existing is not None:
            state = self.read_checkpoint(existing)
        self.ckpt_path = None
        if out_dir is not None and self.rank == 0:
            for place in checkpoint_places(out_dir):
                _remove_interrupted_writes(place)
            checkpoint_format, place = choose_checkpoint_storage(self.plan, Path(out_dir), existing,
                                                                 0 if state is None else state["step"])
            self.plan = dataclasses.replace(self.plan, checkpoint_format=checkpoint_format)
            self.ckpt_path = place / CHECKPOINT_NAME
            if checkpoint_format != "exact" or place != Path(out_dir):
                print(self.storage_note(Path(out_dir)))
        if state is None:
            self.unet = build_unet(preset, self.extractor.out_channels, self.num_classes,
                                   self.plan.gradient_checkpointing)
            if init is not None:
                load_guided_diffusion_checkpoint(self.unet, init)
            self.unet.to(device)
            self.ema = copy.deepcopy(self.unet).requires_grad_(False).to(self.ema_device)
            self.optimizer = make_optimizer(self.unet, preset, device.type)
        else:
            self.restore(state)
            del state
        if self.plan.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.diffusion = build_diffusion(preset)
        self.targets = compute_features(self.extractor, self.images) if preset.precompute_features else None
        self.stats = None
        if preset.standardize_features:
            features = self.targets if self.targets is not None else compute_features(self.extractor, self.images)
            self.stats = feature_statistics(features)
            self.targets = standardize(self.targets, self.stats) if self.targets is not None else None
        # The statistics on the device once, not copied there for every batch.
        self.device_stats = None if self.stats is None else tuple(s.to(device) for s in self.stats)
        return self

    def storage_note(self, out_dir: Path) -> str:
        """One line on checkpoints that are not exact ones beside the model: what a resume from them means."""
        plan, where = self.plan, self.ckpt_path.parent
        parts = [f"checkpoints of {'+'.join(self.categories)}: {plan.checkpoint_format}, "
                 f"{plan.checkpoint_bytes / GB:.2f} GB each, in {where}"]
        if plan.checkpoint_format == "compact":
            parts.append("the EMA in float16 and AdamW's moments in bfloat16: a resume goes on from the same "
                         "weights and batches, within float16's rounding of the EMA, not bit for bit")
        if where != out_dir:
            parts.append(f"on this machine's disk, lost if it resets; model.pt goes to {out_dir}")
        return "; ".join(parts)

    def read_checkpoint(self, path: Path) -> dict:
        """A checkpoint of this very run (else a ValueError naming what differs), on the CPU.

        Memory-mapped only where every tensor leaves the host (a GPU run with its EMA there): a tensor
        kept on the CPU would stay mapped from a file the next checkpoint replaces, holding that file's
        disk space for the whole run. Otherwise, and where the file system refuses mmap, it is read whole.
        """
        on_host = self.device.type == "cpu" or self.ema_device.type == "cpu"
        state = load_torch_file(path, mmap=not on_host)
        _check_same_run(Preset.from_dict(state["preset"]), state["categories"], self.preset, self.categories, path)
        return state

    def restore(self, state: dict) -> None:
        """Build the models from a checkpoint: weights, EMA, optimizer, loss scale, step, history, random streams.

        Not built and then overwritten: the UNet and its EMA are made on the meta device (no memory) and
        take the checkpoint's tensors themselves (``assign=True``) before moving to their devices, AdamW
        takes its moments as they are (on the CPU, no copy), and each part leaves ``state`` as it is
        consumed. So the checkpoint's state is held once, never beside a second copy: on the CPU the host
        memory peaks at its size, on a GPU the host copy goes as the weights move over. The values are
        the saved ones, bit for bit, as a copy into fresh weights would give.
        """
        with torch.device("meta"):
            template = build_unet(self.preset, self.extractor.out_channels, self.num_classes,
                                  self.plan.gradient_checkpointing)
        self.unet, self.ema = template, copy.deepcopy(template)
        # The layout of fresh weights (a GPU run saved its UNet channels-last; start() converts it again
        # where the plan says so); a tensor already in it stays where it is, uncopied.
        self.unet.load_state_dict(state.pop("unet"), assign=True)
        self.unet.to(self.device, memory_format=torch.contiguous_format)
        # a compact checkpoint's float16 EMA (and bfloat16 moments, which AdamW casts itself) back to float32
        self.ema.load_state_dict(_as_float32(state.pop("ema")), assign=True)
        self.ema.requires_grad_(False).to(self.ema_device, memory_format=torch.contiguous_format)
        self.optimizer = make_optimizer(self.unet, self.preset, self.device.type)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], state["history"]
        self.skipped_steps = skipped_in(self.history)
        _set_rng_states(self.generator, state.pop("rng"), self.device)  # nothing after this draws from them

    def save(self, path: Path) -> None:
        """The checkpoint, atomically, in the plan's format (exact, or compact: :func:`compact_state`)."""
        ema, optimizer = self.ema.state_dict(), self.optimizer.state_dict()
        if self.plan.checkpoint_format == "compact":
            ema, optimizer = compact_state(ema, optimizer)
        atomic_save({
            "preset": self.preset.to_dict(), "categories": self.categories, "step": self.step,
            "history": self.history, "unet": self.unet.state_dict(), "ema": ema, "optimizer": optimizer,
            "rng": _rng_states(self.generator, self.device), "checkpoint_format": self.plan.checkpoint_format,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }, path)

    def next_batch(self) -> Batch:
        """The next batch from the run's random stream, moved to the device: under DDP, this rank's share.

        Every rank draws the whole batch, so the generator advances alike on all of them.
        """
        max_t = min(self.preset.max_train_timestep or self.diffusion.num_timesteps, self.diffusion.num_timesteps)
        idx, t, noise = draw_batch(self.generator, len(self.images), self.preset.batch_size, max_t,
                                   self.images.shape[1:])
        if self.world > 1:
            part = slice(self.rank * self.share, (self.rank + 1) * self.share)
            idx, t, noise = idx[part], t[part], noise[part]
        x0 = self.to_device(self.images[idx])
        with torch.no_grad():
            target = (self.to_device(self.targets[idx]) if self.targets is not None
                      else standardize(self.extractor(x0), self.device_stats))
        y = self.to_device(self.labels[idx]) if self.num_classes else None
        return Batch(x0, self.to_device(t), self.to_device(noise), target, y)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the run's device; to a GPU through pinned memory and without blocking, since a
        plain copy from pageable memory waits for the device (a synchronisation every step). The pinned
        buffer is a fresh one (or one the caching allocator keeps until the copy is done)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def train(self, end: int, progress: bool) -> None:
        preset = self.preset
        bar = tqdm(total=preset.train_steps, initial=self.step, desc=f"train {'+'.join(self.categories)}",
                   disable=not progress or self.rank != 0, leave=False)
        self.unet.train()
        model = self.unet
        if self.ddp:
            distributed.wait_for_all("the ranks to load the data and build the model")
            model = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        # The steps since the last log, their losses still on the device: nothing in a step waits for
        # the device (no .item(), no finiteness test on the host); log() reads them all at once.
        pending: list[dict[str, torch.Tensor]] = []
        try:
            while self.step < end:
                pending.append(training_step(
                    model, self.optimizer, self.diffusion, self.next_batch(), lr=lr_at(self.step, preset),
                    feature_loss_weight=preset.feature_loss_weight, grad_clip=preset.grad_clip,
                    precision=self.plan.precision, scaler=self.scaler, ema=self.ema,
                    ema_rate=ema_rate_at(self.step, preset.ema_rate, preset.ema_warmup), channels_last=self.plan.channels_last,
                    check_finite=False))
                self.step += 1
                bar.update(1)
                checkpoint = self.step % preset.checkpoint_every == 0 or self.step == end
                if checkpoint or self.step % LOG_EVERY == 0:
                    self.log(pending, bar)  # before the checkpoint: non-finite weights are never saved
                    pending = []
                if checkpoint:
                    if self.rank == 0 and self.ckpt_path is not None:
                        self.save(self.ckpt_path)
                    if self.ddp:  # the others wait here, not in the next step's all-reduce (a shorter timeout)
                        distributed.wait_for_all("rank 0 writing the checkpoint")
        finally:
            bar.close()
        del model
        self.ema.to(self.device).eval()

    def log(self, pending: list[dict[str, torch.Tensor]], bar) -> None:
        """Record the losses of the steps since the last log (one host read for all of them), count the
        steps the scaler skipped, and show both in the progress line.

        A step the GradScaler skipped (fp16: its gradients were not finite) is recorded with
        ``skipped`` true and is no error. Without a scaler, a non-finite loss raises
        FloatingPointError here, naming its step: checked every few steps rather than each step,
        but always before a checkpoint is written. Under DDP the losses are the global means
        (one all-reduce per log) and every rank raises alike.
        """
        first = self.step - len(pending) + 1
        values = torch.stack([step[name].float() for step in pending for name in LOSS_NAMES])
        values = values.view(len(pending), len(LOSS_NAMES))
        if self.ddp:  # each rank's means weighted by its share of the batch, summed over the ranks
            values = distributed.all_sum(values * (self.share / self.preset.batch_size))
        if self.scaler is not None:  # the same on every rank: the gradients it checked were all-reduced
            skipped = torch.stack([step["skipped"].float() for step in pending])
            values = torch.cat([values, skipped[:, None].to(values.device)], dim=1)
        for offset, row in enumerate(values.tolist()):
            record = {"step": first + offset, **dict(zip(LOSS_NAMES, row)),
                      "skipped": self.scaler is not None and row[-1] > 0}
            if self.scaler is None and not math.isfinite(record["loss"]):
                lr = lr_at(record["step"] - 1, self.preset)
                raise FloatingPointError(f"training loss became {record['loss']} at step {record['step']}; "
                                         f"lower lr (now {lr:g})")
            self.skipped_steps += record["skipped"]
            self.history.append(record)
        postfix = dict(loss=f"{record['loss']:.4f}", feat=f"{record['feature']:.4f}")
        if self.scaler is not None:
            postfix["skipped"] = self.skipped_steps
        bar.set_postfix(postfix)


def _check_same_run(saved: Preset, saved_categories, preset: Preset, categories, path: Path) -> None:
    """Refuse to resume or reuse a run trained with other settings: say which differ."""
    differ = training_differences(saved, preset)
    if list(saved_categories) != list(categories) or differ:
        raise ValueError(
            f"{path} was made with other settings (categories {list(saved_categories)} vs {list(categories)}; "
            f"fields {differ}); use another out_dir or delete it"
        )
