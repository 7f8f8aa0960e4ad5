"""Presets: every setting of a run, as data.

A preset is a dataclass: print it to see every setting, override any field by name.

    >>> from diffad.presets import get_preset
    >>> p = get_preset("cpu", train_steps=100)
    >>> print(p)

``paper`` is the authors' setting (METHOD.md): 256 px, the guided-diffusion 256x256 ADM UNet,
batch 2, 10k steps, lr 1e-4 annealed linearly, EMA 0.997, feature-loss weight 1,
EfficientNet-b4 features, test timesteps {5, 50, 100} of a 250-step respacing, alpha 0.5.
``cpu`` is the same code path at a size that trains one category in minutes on 2 CPU cores;
its numbers were chosen by measurement (see the presets' docstrings in ``PRESETS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """All settings of one training and scoring run."""

    name: str
    # data
    image_size: int = 256
    val_fraction: float = 0.1
    # model
    unet: str = "paper"  # a named UNet config of diffad.models
    unet_overrides: dict[str, Any] = field(default_factory=dict)
    class_cond: bool = True  # condition on the category index (the authors do, even per category)
    init_checkpoint: str | None = None  # guided-diffusion state dict to start from
    # diffusion
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    # features
    backbone: str = "tf_efficientnet_lite0"
    backbone_layers: tuple[int, ...] | None = None  # None: the backbone's default stages
    backbone_input_size: int | None = None  # resize images to this before the backbone
    feature_loss_weight: float = 1.0
    standardize_features: bool = False  # z-score each target channel with training statistics
    # training
    batch_size: int = 2
    train_steps: int = 10_000
    lr: float = 1e-4
    lr_anneal_steps: int = 10_000  # linear decay to 0 over this many steps (0: constant)
    weight_decay: float = 0.0
    ema_rate: float = 0.997
    grad_clip: float | None = 1.0
    max_train_timestep: int | None = None  # sample t below this only (None: all T steps)
    checkpoint_every: int = 1000
    precompute_features: bool = False  # cache the clean images' backbone features once
    mixed_precision: bool = True  # bf16/fp16 autocast and channels-last on CUDA only
    seed: int = 0
    # scoring
    timestep_respacing: str = "250"
    test_timesteps: tuple[int, ...] = (5, 50, 100)  # indices into the respaced schedule
    timestep_mode: str = "consistent"  # or "authors": raw t as the feature branch's embedding
    alpha: float = 0.5
    normalization: str = "per_image"  # of the maps: "per_image" (paper) or "validation"
    image_normalization: str | None = None  # of the maps the image score reads; None: the same
    smoothing_sigma: float = 0.0  # Gaussian blur of the maps, in pixels at image_size
    top_k: int = 64  # image score: mean of the top-k pixels at 256x256, scaled with the area
    score_batch_size: int = 8

    def replace(self, **overrides) -> "Preset":
        """A copy with some fields changed; unknown names raise."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown preset field(s) {sorted(unknown)}; fields are {field_names()}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preset":
        data = dict(data)
        for key in ("backbone_layers", "test_timesteps"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        lines = [f"Preset {self.name!r}"]
        lines += [f"  {f.name:<{width}}  {getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "name"]
        return "\n".join(lines)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Preset)]


# Fields that only change how a trained model is scored (or how often it is saved): a model
# trained under one value serves them all, so they never force retraining.
SCORING_FIELDS = frozenset({
    "name", "checkpoint_every", "timestep_respacing", "test_timesteps", "timestep_mode", "alpha",
    "normalization", "image_normalization", "smoothing_sigma", "top_k", "score_batch_size",
})


def training_differences(a: Preset, b: Preset) -> list[str]:
    """Names of the fields that differ between two presets and change what training produces."""
    da, db = a.to_dict(), b.to_dict()
    return [k for k in da if k not in SCORING_FIELDS and da[k] != db[k]]


PAPER = Preset(
    name="paper",
    image_size=256,
    unet="paper",
    class_cond=True,
    backbone="tf_efficientnet_b4.aa_in1k",  # the TF AutoAugment weights the authors loaded
    batch_size=2,
    train_steps=10_000,
    lr=1e-4,
    lr_anneal_steps=10_000,
    ema_rate=0.997,
    feature_loss_weight=1.0,
    checkpoint_every=1000,
    timestep_respacing="250",
    test_timesteps=(5, 50, 100),
    alpha=0.5,
    normalization="per_image",
    smoothing_sigma=0.0,
    top_k=64,
)

# Chosen by measurement on 2 CPU cores: 64 px images, the backbone sees them at 128 px and its
# features are learned on a 16x16 grid, standardised per channel (raw EfficientNet features made
# the feature loss ~20x the diffusion loss and the head learned little); 200 steps of batch 16
# train one category in about 4.5 minutes. Scoring settings were chosen on a development copy of
# the built-in data (seed 1), never on the test split: maps z-scored per image as in the paper,
# smoothed with sigma 2, timesteps 5/10/20 (t above 20 only lost); the image score reads maps
# normalised with validation statistics, because per-image z-scores discard how anomalous the
# whole image is (image AUROC 0.90 -> 0.94 on brick, with the same pixel maps).
CPU = Preset(
    name="cpu",
    image_size=64,
    unet="cpu",
    class_cond=False,
    backbone="tf_efficientnet_lite0",
    backbone_input_size=128,
    standardize_features=True,
    batch_size=16,
    train_steps=200,
    lr=1e-3,
    lr_anneal_steps=200,
    ema_rate=0.99,
    grad_clip=1.0,
    max_train_timestep=300,
    checkpoint_every=100,
    precompute_features=True,
    timestep_respacing="",
    test_timesteps=(5, 10, 20),
    alpha=0.5,
    normalization="per_image",
    image_normalization="validation",
    smoothing_sigma=2.0,
    top_k=64,
    score_batch_size=16,
)

PRESETS: dict[str, Preset] = {"paper": PAPER, "cpu": CPU}


def get_preset(name_or_preset: str | Preset = "cpu", **overrides) -> Preset:
    """A named preset (``cpu`` or ``paper``) with fields overridden by keyword."""
    if isinstance(name_or_preset, Preset):
        preset = name_or_preset
    else:
        if name_or_preset not in PRESETS:
            raise ValueError(f"unknown preset {name_or_preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[name_or_preset]
    return preset.replace(**overrides) if overrides else preset
