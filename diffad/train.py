"""Training: the denoiser learns normal images, and their backbone features, from noisy ones.

One step draws a batch of normal images x0 and timesteps t, noises them to x_t and runs the
UNet once. Its diffusion output gives guided-diffusion's hybrid loss (epsilon MSE plus the
variational bound for the learned variance); its feature head, trained to predict the
backbone's features of the clean x0 from x_t, adds ``feature_loss_weight`` times an MSE.

AdamW with the learning rate annealed linearly to 0, an EMA of the weights (the EMA weights
are what scoring uses), gradient clipping, bf16 autocast and channels-last on CUDA (and on a
CPU with ``precision=bf16``); fp16 with a GradScaler below compute capability 8.0, where a step
with non-finite gradients is skipped and counted (``skipped`` in the history), not an error, and
the EMA moves only after a real step.
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
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffad import distributed
from diffad.data import MVTecAD, to_diffusion_range
from diffad.device import pick_device
from diffad.device_plan import GB, TrainingPlan, plan_training
from diffad.io import InsufficientDiskSpace, atomic_save, exclusive, free_disk_bytes, load_torch_file, scratch_dir, space_to_write
from diffad.models import load_guided_diffusion_checkpoint, resolve_init_checkpoint
from diffad.models.denoiser import (MODEL_NAME, TrainedModel, build_diffusion, build_feature_extractor, build_unet,
                                    compute_features, feature_statistics, skipped_in, standardize)
from diffad.presets import Preset, get_preset, training_differences
from diffad.step import LOSS_NAMES, Batch, draw_batch, ema_rate_at, lr_at, make_optimizer, training_step

__all__ = ["fit", "TrainedModel", "InsufficientDiskSpace", "CHECKPOINT_NAME", "MODEL_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
# The training loop reads its losses on the host every LOG_EVERY steps (and before each checkpoint
# and at the end of a call), not every step: reading a tensor's value waits for the device.
LOG_EVERY = 10


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
    its checkpoint stays for the next call. Two processes asking for one ``out_dir`` at once (two
    notebooks, two shells) do not both train: the second waits for the first and loads its model.
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
    preset = get_preset(preset, **overrides)  # resolved once, here; the rest takes a Preset
    if ddp is None:
        ddp = distributed.launched()
    if not ddp:  # one process trains into out_dir; another asking for it waits, then loads model.pt
        with exclusive(out_dir, f"training into {Path(out_dir).name}"):
            return _fit(data_root, categories, out_dir, preset, device, progress, stop_after, False)
    batch_size = preset.for_categories(categories).batch_size
    if batch_size % distributed.world_size():  # before the group: every rank says so and stops
        raise ValueError(
            f"batch_size {batch_size} does not split over {distributed.world_size()} processes: start torchrun "
            f"with a --nproc_per_node that divides it, or --set batch_size= a multiple of it")
    with distributed.process_group(device) as device, distributed.peer_errors("training"):
        return _fit(data_root, categories, out_dir, preset, device, progress, stop_after,
                    distributed.is_distributed())


def _fit(data_root, categories, out_dir, preset: Preset, device, progress, stop_after, ddp: bool) -> TrainedModel:
    categories = [categories] if isinstance(categories, str) else list(categories)
    if not categories:
        raise ValueError("no category to train on")
    preset = preset.for_categories(categories)
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
