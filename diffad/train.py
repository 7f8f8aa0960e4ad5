"""Training: the denoiser learns normal images, and their backbone features, from noisy ones.

One step draws a batch of normal images x0 and timesteps t, noises them to x_t and runs the
UNet once. Its diffusion output gives guided-diffusion's hybrid loss (epsilon MSE plus the
variational bound for the learned variance); its feature head, trained to predict the
backbone's features of the clean x0 from x_t, adds ``feature_loss_weight`` times an MSE.

AdamW with the learning rate annealed linearly to 0, an EMA of the weights (the EMA weights
are what scoring uses), gradient clipping, bf16 autocast and channels-last on CUDA.
Checkpoints hold model, EMA, optimizer, step and every random state, and are written
atomically (a temporary file, then a rename): a run interrupted and resumed ends with the same
weights as one that was not.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffad.backbones import FeatureExtractor
from diffad.data import MVTecAD, to_diffusion_range
from diffad.diffusion import GaussianDiffusion
from diffad.models import create_unet, load_guided_diffusion_checkpoint
from diffad.presets import Preset, get_preset, training_differences

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images a trained model can take: a float tensor (N, 3, size, size) in [0, 1]; else a clear error."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, 3, H, W) in [0, 1]; got {shape}")
    if images.shape[-2:] != (image_size, image_size):
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} but the model was trained at {image_size}x{image_size}; "
            f"load the dataset with image_size={image_size}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.min() < -1e-6 or images.max() > 1 + 1e-6:
        raise ValueError("images must be in [0, 1] (diffad.data returns them so; diffad maps them to [-1, 1] itself)")
    return images.float()


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
    )
    return extractor.to(pick_device(device))


def build_unet(preset: Preset, feature_channels: int, num_classes: int | None):
    """The ADM UNet of a preset, with a feature head of ``feature_channels`` outputs."""
    return create_unet(
        preset.unet,
        image_size=preset.image_size,
        num_classes=num_classes,
        feature_channels=feature_channels,
        **preset.unet_overrides,
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

    def feature_target(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features as the feature head was trained to predict them."""
        return standardize(features, self.feature_stats)

    @property
    def num_classes(self) -> int | None:
        return len(self.categories) if self.preset.class_cond else None

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
        state = _torch_load(path)
        if "unet" not in state or "preset" not in state:
            raise ValueError(f"{path} is not a diffad model file (a training checkpoint? use fit to resume it)")
        preset = Preset.from_dict(state["preset"])
        unet = build_unet(preset, state["feature_channels"], len(state["categories"]) if preset.class_cond else None)
        unet.load_state_dict(state["unet"])
        unet.to(pick_device(device)).eval()
        return cls(preset, list(state["categories"]), unet, state["feature_channels"], state.get("history", []),
                   state.get("feature_stats"))


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc


def load_training_images(data_root, categories: list[str], preset: Preset) -> tuple[torch.Tensor, torch.Tensor]:
    """All normal training images of the categories in [-1, 1], and their category indices."""
    images, labels = [], []
    for index, category in enumerate(categories):
        dataset = MVTecAD(data_root, category, split="train", image_size=preset.image_size,
                          val_fraction=preset.val_fraction, seed=preset.seed)
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


def _rng_states(generator: torch.Generator) -> dict:
    states = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(generator: torch.Generator, states: dict) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, parameter by parameter."""
    for target, source in zip(ema.parameters(), model.parameters()):
        target.lerp_(source.detach(), 1.0 - rate)


def ema_rate_at(step: int, rate: float) -> float:
    """EMA warm-up: early on the average follows the weights closely, then settles at ``rate``."""
    return min(rate, (1.0 + step) / (10.0 + step))


def lr_at(step: int, preset: Preset) -> float:
    """Learning rate annealed linearly from ``lr`` to 0 over ``lr_anneal_steps``."""
    if preset.lr_anneal_steps <= 0:
        return preset.lr
    return preset.lr * max(0.0, 1.0 - step / preset.lr_anneal_steps)


def fit(
    data_root,
    categories: str | list[str],
    out_dir,
    preset: str | Preset = "cpu",
    device=None,
    progress: bool = True,
    stop_after: int | None = None,
    **overrides,
) -> TrainedModel:
    """Train (or resume, or load) a denoiser on the normal images of one or more categories.

    ``out_dir`` receives ``checkpoint.pt`` every ``checkpoint_every`` steps and ``model.pt`` (EMA
    weights) at the end; a finished ``model.pt`` is loaded instead of retraining, a checkpoint
    resumed. Several categories train one unified, class-conditional model. ``stop_after``
    ends the run early after that many steps in this call (for demonstrations and tests of resume).
    """
    categories = [categories] if isinstance(categories, str) else list(categories)
    if not categories:
        raise ValueError("no category to train on")
    preset = get_preset(preset, **overrides).for_categories(categories)
    if len(categories) > 1 and not preset.class_cond:
        preset = preset.replace(class_cond=True)  # one model for several categories needs the label
    out_dir = Path(out_dir)
    device = pick_device(device)
    model_path, ckpt_path = out_dir / MODEL_NAME, out_dir / CHECKPOINT_NAME
    if model_path.is_file():
        trained = TrainedModel.load(model_path, device)
        _check_same_run(trained.preset, trained.categories, preset, categories, model_path)
        trained.preset = preset  # same training; the scoring settings asked for now
        return trained

    torch.manual_seed(preset.seed)
    generator = torch.Generator().manual_seed(preset.seed)
    images, labels = load_training_images(data_root, categories, preset)
    extractor = build_feature_extractor(preset, device)
    num_classes = len(categories) if preset.class_cond else None
    unet = build_unet(preset, extractor.out_channels, num_classes)
    if preset.init_checkpoint:
        load_guided_diffusion_checkpoint(unet, preset.init_checkpoint)
    unet.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    diffusion = build_diffusion(preset)
    targets = compute_features(extractor, images) if preset.precompute_features else None
    stats = None
    if preset.standardize_features:
        stats = feature_statistics(targets if targets is not None else compute_features(extractor, images))
        targets = standardize(targets, stats) if targets is not None else None
    use_cuda = device.type == "cuda"
    if use_cuda and preset.mixed_precision:
        unet.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16

    step, history = 0, []
    if ckpt_path.is_file():
        state = _torch_load(ckpt_path)
        _check_same_run(Preset.from_dict(state["preset"]), state["categories"], preset, categories, ckpt_path)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        _set_rng_states(generator, state["rng"])

    def save_checkpoint():
        atomic_save({
            "preset": preset.to_dict(), "categories": categories, "step": step, "history": history,
            "unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": _rng_states(generator),
        }, ckpt_path)

    max_t = min(preset.max_train_timestep or diffusion.num_timesteps, diffusion.num_timesteps)
    end = preset.train_steps if stop_after is None else min(preset.train_steps, step + stop_after)
    bar = tqdm(total=preset.train_steps, initial=step, desc=f"train {'+'.join(categories)}",
               disable=not progress, leave=False)
    unet.train()
    while step < end:
        idx = torch.randint(len(images), (preset.batch_size,), generator=generator)
        t = torch.randint(max_t, (preset.batch_size,), generator=generator)
        noise = torch.randn(images[idx].shape, generator=generator)
        x0, noise, t = images[idx].to(device), noise.to(device), t.to(device)
        y = labels[idx].to(device) if num_classes else None
        with torch.no_grad():
            target = targets[idx].to(device) if targets is not None else standardize(extractor(x0), stats)
        x_t = diffusion.q_sample(x0, t, noise=noise)
        if use_cuda and preset.mixed_precision:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, preset)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_cuda and preset.mixed_precision):
            output, features = unet(x_t, t, y=y, return_features=True)
        losses = diffusion.training_losses_from_output(output.float(), x0, x_t, t, noise)
        feature_loss = F.mse_loss(features.float(), target)
        loss = losses["loss"].mean() + preset.feature_loss_weight * feature_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower lr (now {lr_at(step, preset):g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if preset.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), preset.grad_clip)
        optimizer.step()
        update_ema(ema, unet, ema_rate_at(step, preset.ema_rate))
        step += 1
        record = {"step": step, "loss": loss.item(), "mse": losses["mse"].mean().item(),
                  "vb": losses["vb"].mean().item(), "feature": feature_loss.item()}
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", feat=f"{record['feature']:.4f}")
        if step % preset.checkpoint_every == 0 or step == end:
            save_checkpoint()
    bar.close()
    ema.eval()
    trained = TrainedModel(preset, categories, ema, extractor.out_channels, history, stats)
    if step >= preset.train_steps:
        trained.save(model_path)
    return trained


def _check_same_run(saved: Preset, saved_categories, preset: Preset, categories, path: Path) -> None:
    """Refuse to resume or reuse a run trained with other settings: say which differ."""
    differ = training_differences(saved, preset)
    if list(saved_categories) != list(categories) or differ:
        raise ValueError(
            f"{path} was made with other settings (categories {list(saved_categories)} vs {list(categories)}; "
            f"fields {differ}); use another out_dir or delete it"
        )
