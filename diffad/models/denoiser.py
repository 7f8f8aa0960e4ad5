"""The trained denoiser: how a preset's UNet, diffusion and backbone are built, and the model that
training writes (``model.pt``) and scoring, denoising and the chapters read.

:class:`TrainedModel` holds the EMA weights with everything scoring needs (the preset, the
categories, the feature head's width and target statistics). It lives apart from the training
loop (:mod:`diffad.train`), so that the modules that only read a model never import the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffad.backbones import FeatureExtractor
from diffad.device import pick_device
from diffad.diffusion import GaussianDiffusion
from diffad.io import atomic_save, load_torch_file
from diffad.models.unet import UNetConfig, create_unet, unet_config
from diffad.presets import SCORING_FIELDS, Preset

__all__ = ["MODEL_NAME", "TrainedModel", "build_diffusion", "build_feature_extractor", "build_unet", "feature_grid",
           "compute_features", "feature_statistics", "standardize", "skipped_in", "use_inference_layout"]

MODEL_NAME = "model.pt"


def build_diffusion(preset: Preset, respacing: str = "") -> GaussianDiffusion:
    """The Gaussian diffusion of a preset; ``respacing`` e.g. "250" for the scoring schedule."""
    return GaussianDiffusion.from_config(
        steps=preset.diffusion_steps,
        noise_schedule=preset.noise_schedule,
        learn_sigma=True,
        timestep_respacing=respacing,
    )


def unet_config_of(preset: Preset, feature_channels: int | None = None, num_classes: int | None = None,
                   gradient_checkpointing: bool = False) -> UNetConfig:
    """The UNet config of a preset (its named config, image size and overrides), checked."""
    overrides = dict(preset.unet_overrides)
    if gradient_checkpointing:
        overrides["use_checkpoint"] = True
    return unet_config(preset.unet, image_size=preset.image_size, num_classes=num_classes,
                       feature_channels=feature_channels, **overrides)


def feature_grid(preset: Preset) -> int:
    """Side of the feature map the head predicts (``UNetConfig.feature_resolution``): the backbone's
    features are read on this grid."""
    return unet_config_of(preset).feature_resolution


def build_feature_extractor(preset: Preset, device=None, pretrained: bool = True) -> FeatureExtractor:
    """The frozen backbone whose features of the clean image the feature head learns."""
    extractor = FeatureExtractor(
        preset.backbone,
        layers=preset.backbone_layers,
        grid_size=feature_grid(preset),
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
    return create_unet(unet_config_of(preset, feature_channels, num_classes, gradient_checkpointing))


@dataclass
class TrainedModel:
    """A trained denoiser with everything scoring needs: preset, categories, EMA weights."""

    preset: Preset
    categories: list[str]
    unet: torch.nn.Module
    feature_channels: int
    history: list[dict] = field(default_factory=list)
    feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # per-channel (mean, std) of targets

    def __post_init__(self) -> None:
        use_inference_layout(self.unet)

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


def use_inference_layout(unet: torch.nn.Module) -> torch.nn.Module:
    """Put a float32 UNet on the CPU in channels-last layout (in place) and return it.

    oneDNN's CPU convolutions run faster on channels-last weights: scoring a category's 60 test
    images with the cpu preset takes 3.9 s instead of 4.1 s on 2 cores, with the outputs equal to
    1e-5. Training keeps the default layout (its backward pass is slower
    channels-last on a CPU), and so does a float64 copy (gradient denoising), where it does not help.
    """
    first = next(unet.parameters(), None)
    if first is not None and first.device.type == "cpu" and first.dtype == torch.float32:
        unet.to(memory_format=torch.channels_last)
    return unet


def skipped_in(history: list[dict]) -> int:
    """How many steps of a training history the GradScaler skipped; records from before the
    ``skipped`` field was kept (older checkpoints and models) count as real steps."""
    return sum(1 for record in history if record.get("skipped"))


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
