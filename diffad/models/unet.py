"""OpenAI's ADM UNet (guided-diffusion) with learned variance and a feature-prediction head.

The network is a re-implementation of ``guided_diffusion/unet.py`` (Dhariwal & Nichol, 2021,
MIT licence) written for this book. Parameter names and shapes are *identical* to
guided-diffusion's ``UNetModel`` so that OpenAI's ImageNet ``256x256_diffusion.pt`` loads
into it unchanged (see :mod:`diffad.models.checkpoint`).

Two things differ from guided-diffusion on purpose:

* **Feature head.** The paper's feature branch predicts pretrained CNN features of the clean
  image from the noisy one. As in the authors' code (``AnomalyModel`` in VandyLu/anomaly_diff,
  ``feat_rec1`` reading ``output_blocks[10]``), a small head (GroupNorm32 + SiLU + 1x1 conv)
  reads the decoder at 1/4 of the input resolution: the *last decoder block at that
  resolution before the block that upsamples* (index 10 for the paper config: 512 channels at
  64x64 for a 256 px input). Its parameters are named ``feature_head.*``, a key OpenAI's
  checkpoint does not have. One forward pass yields both outputs.
* **Mixed precision.** guided-diffusion converts the torso to float16 by hand
  (``convert_to_fp16``). Here the model stays float32 and mixed precision comes from
  ``torch.autocast``; :class:`GroupNorm32` and the attention softmax still compute in float32,
  as in the original.

Gradient checkpointing (``use_checkpoint=True``) uses :func:`torch.utils.checkpoint.checkpoint`
on every residual and attention block while training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from diffad.diffusion import has_values

__all__ = [
    "GroupNorm32",
    "zero_module",
    "timestep_embedding",
    "QKVAttentionLegacy",
    "QKVAttention",
    "AttentionBlock",
    "ResBlock",
    "Upsample",
    "Downsample",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "UNetConfig",
    "UNET_CONFIGS",
    "unet_config",
    "create_unet",
    "default_channel_mult",
    "count_parameters",
]

NORM_GROUPS = 32  # guided-diffusion normalises with GroupNorm(32, channels) everywhere


# ----------------------------------------------------------------------------- building blocks


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups that computes in float32 or wider and returns the input dtype.

    Keeps normalisation statistics accurate under float16/bfloat16 autocast; a float64 model
    (gradient denoising on a CPU, :mod:`diffad.denoise`) normalises in float64. A bfloat16 input
    on a CPU goes to torch's mixed-precision kernel, which computes in float32 inside (see
    :meth:`_normalise_bfloat16_on_a_cpu`).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        if num_channels % NORM_GROUPS:
            raise ValueError(
                f"GroupNorm32 needs a channel count divisible by {NORM_GROUPS}, got {num_channels}"
            )
        super().__init__(NORM_GROUPS, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in ("cuda", "cpu"):  # autocast must not cast group_norm down
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._normalise(x)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.weight.dtype == torch.float32:
            return self._normalise_bfloat16_on_a_cpu(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype),
                            self.eps).type(x.dtype)

    def _normalise_bfloat16_on_a_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 in and out, the statistics and the affine in float32 with the float32 weights (torch's
        mixed-type CPU kernel): the float32 path's result in 999 values of 1000 (the others differ by
        the kernel's own float32 rounding), without its two casts. The kernel runs on NCHW: its
        channels-last backward is 4 to 5 times slower (1.9 ms against 0.4 ms a call in a cpu-preset
        step), so a channels-last input is transposed in and out. A bf16 cpu-preset training step:
        0.41 s instead of 0.47."""
        channels_last = (x.dim() == 4 and not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last))
        out = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it.

    Used on the last conv of each residual branch and on the output conv, so that a freshly
    built block starts as the identity and the fresh network predicts zero.
    """
    for parameter in module.parameters():
        parameter.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (N, dim), in ``dtype``.

    guided-diffusion's convention: the first half holds cosines, the second half sines, with
    frequencies ``max_period ** (-i / half)`` for ``i = 0 .. half-1``; an odd ``dim`` gets a
    trailing zero column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half
    args = timesteps[:, None].to(dtype) * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep (+ class) embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class _NearestUpsample2x(torch.autograd.Function):
    """Nearest-neighbour 2x upsampling of a (N, C, H, W) tensor in the default layout: the values
    and gradients of ``F.interpolate``, faster.

    Each pixel is repeated into a 2x2 block with a broadcast view and one copy, which on a CPU
    takes an eighth of the time of ``upsample_nearest2d`` in this layout (a training step at
    64 px, and gradient denoising's float64 passes). The backward is torch's own
    ``upsample_nearest2d_backward``, so a training step's gradients, and the trained weights,
    are bit for bit those of ``F.interpolate``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        ctx.input_size = (n, c, h, w)
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, c, h, w = ctx.input_size
        return torch.ops.aten.upsample_nearest2d_backward(grad.contiguous(), [2 * h, 2 * w], [n, c, h, w],
                                                          2.0, 2.0)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` for (N, C, H, W), equal to the bit.

    A channels-last tensor (a scoring UNet on a CPU, ``use_inference_layout``) goes to
    ``F.interpolate``, which is the faster of the two in that layout.
    """
    if x.ndim != 4:
        raise ValueError(f"upsample_nearest_2x takes (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return _NearestUpsample2x.apply(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (named ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest_2x(x)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv, or average pooling (named ``op`` either way)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding, optionally changing channels or resolution.

    ``in_layers`` = (GroupNorm32, SiLU, conv3x3); ``emb_layers`` = (SiLU, Linear) giving a bias,
    or a (scale, shift) pair when ``use_scale_shift_norm`` (FiLM after the second norm);
    ``out_layers`` = (GroupNorm32, SiLU, Dropout, zero-initialised conv3x3). With ``up``/``down``
    the block resamples both branches (``h_upd``/``x_upd``, no parameters) between the first
    activation and the first conv, as guided-diffusion's ``resblock_updown`` does.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            GroupNorm32(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _torch_checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = self.h_upd(norm_act(x))
            x = self.x_upd(x)
            h = conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention on (B*heads, ch, T) tensors, softmax in float32 or wider.

    q and k are each scaled by ch**-1/4 before the product (more stable in float16 than
    dividing the logits afterwards), exactly as guided-diffusion does.
    """
    ch = q.shape[1]
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.to(torch.promote_types(weight.dtype, torch.float32)), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a packed (N, heads*3*ch, T) qkv tensor: split heads, then q/k/v.

    This channel order is what OpenAI's pretrained checkpoints were trained with.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(batch * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attention(q, k, v).reshape(batch, -1, length)


class QKVAttention(nn.Module):
    """Multi-head attention on a packed (N, 3*heads*ch, T) qkv tensor: split q/k/v, then heads."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(batch * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _attention(q, k, v).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions with a zero-initialised output projection.

    Parameters: ``norm`` (GroupNorm32), ``qkv`` and ``proj_out`` (1x1 Conv1d), as in
    guided-diffusion.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(f"{channels} attention channels cannot be split into {num_heads} heads")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"{channels} attention channels are not divisible by num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _torch_checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


# ----------------------------------------------------------------------------- the UNet


def default_channel_mult(image_size: int) -> tuple:
    """guided-diffusion's ``create_model`` channel multipliers for a given image size."""
    defaults = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in defaults:
        raise ValueError(
            f"no default channel_mult for image_size {image_size} (known: {sorted(defaults)}); pass channel_mult"
        )
    return defaults[image_size]


def _parse_channel_mult(channel_mult: Any, image_size: int) -> tuple:
    """Accept a tuple/list, a guided-diffusion style string "1,1,2,2,4,4", or "" for the default."""
    if isinstance(channel_mult, str):
        if not channel_mult.strip():
            return default_channel_mult(image_size)
        try:
            values = [float(part) for part in channel_mult.split(",")]
        except ValueError:
            raise ValueError(f"channel_mult string must be comma-separated numbers, got {channel_mult!r}") from None
    else:
        values = list(channel_mult)
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive numbers, got {channel_mult!r}")
    return tuple(int(v) if float(v).is_integer() else float(v) for v in values)


class UNetModel(nn.Module):
    """ADM UNet with timestep (and optional class) conditioning and an optional feature head.

    Arguments follow guided-diffusion's ``UNetModel`` (2-D only, no ``use_fp16``: use
    ``torch.autocast``). ``attention_resolutions`` are *downsample rates*: 4 means attention
    wherever the feature map is 1/4 of the input size. ``feature_channels`` adds the feature
    head (see the module docstring); ``None`` means no head.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Any = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
        feature_channels: int | None = None,
    ):
        super().__init__()
        self.config = UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            num_classes=num_classes,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            use_checkpoint=use_checkpoint,
            feature_channels=feature_channels,
        )  # validates every argument
        cfg = self.config
        channel_mult = cfg.channel_mult
        attention_resolutions = set(cfg.attention_resolutions)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.channel_mult = channel_mult
        self.feature_channels = feature_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

        def res_block(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(
                ch_in, time_embed_dim, dropout, out_channels=ch_out,
                use_scale_shift_norm=use_scale_shift_norm, use_checkpoint=use_checkpoint, **kw,
            )

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, num_heads=heads, num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order,
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # Encoder: a stem conv, then per level num_res_blocks ResBlocks (+ attention) and a downsampler.
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, num_heads),
            res_block(ch, ch),
        )

        # Decoder: per level num_res_blocks + 1 ResBlocks on [h, skip], the last one upsampling.
        self.output_blocks = nn.ModuleList([])
        self.feature_block_index: int | None = None
        feature_block_channels = None
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = skip_channels.pop()
                layers = [res_block(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, out_channels=ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                # The authors' tap: the last block at 1/4 resolution before the upsampling block.
                if level == 2 and i == num_res_blocks - 1:
                    self.feature_block_index = len(self.output_blocks) - 1
                    feature_block_channels = ch

        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)),
        )

        if feature_channels is not None:
            assert feature_block_channels is not None  # guaranteed by UNetConfig validation
            self.feature_head = nn.Sequential(
                GroupNorm32(feature_block_channels),
                nn.SiLU(),
                nn.Conv2d(feature_block_channels, feature_channels, 1),
            )
            self.feature_head_in_channels = feature_block_channels
        else:
            self.feature_block_index = None

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, x: torch.Tensor, timesteps: Any, y: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs with readable errors; return timesteps as a 1-D tensor of length B."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {shape}")
        batch, channels, height, width = x.shape
        if channels != self.in_channels:
            raise ValueError(f"x has {channels} channels but the model expects in_channels={self.in_channels}")
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(
                f"x's spatial size {height}x{width} must be divisible by {self.downsample_factor} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult={self.channel_mult})"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(timesteps.shape)}")
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y (class labels) was given but the model is unconditional (num_classes=None)")
        else:
            if y is None:
                raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}); pass y")
            if not isinstance(y, torch.Tensor) or y.shape != (batch,):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"y must be a tensor of shape ({batch},), got {shape}")
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
                raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")
            if y.numel() and has_values(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"class labels must lie in [0, {self.num_classes}), got range "
                    f"[{int(y.min())}, {int(y.max())}]"
                )
        return timesteps

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        return_features: bool = False,
        feature_grid: int | None = None,
    ):
        """Run the UNet.

        x: (B, in_channels, H, W) with H, W divisible by 2**(len(channel_mult)-1);
        timesteps: (B,) or a scalar (broadcast); y: (B,) class indices iff num_classes is set.
        Returns the (B, out_channels, H, W) output, or ``(output, features)`` with
        ``return_features=True``; features are (B, feature_channels, H/4, W/4), or on a
        ``feature_grid`` x ``feature_grid`` grid: the decoder's map is resized bilinearly before the
        head, as the authors' code does at test time (``feat_shape``, 16 by default there).
        """
        timesteps = self._check_inputs(x, timesteps, y)
        if return_features and self.feature_block_index is None:
            raise ValueError("return_features=True needs a feature head: build the model with feature_channels set")

        # float32 (under autocast too), float64 for a float64 model and input
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels,
                                                 dtype=torch.promote_types(x.dtype, torch.float32)))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)

        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        features = None
        for index, module in enumerate(self.output_blocks):
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            if return_features and index == self.feature_block_index:
                tapped = h if feature_grid is None else F.interpolate(h, size=(feature_grid, feature_grid),
                                                                      mode="bilinear", align_corners=False)
                features = self.feature_head(tapped)
        output = self.out(h)
        if return_features:
            return output, features
        return output

    def extra_repr(self) -> str:
        return f"params={count_parameters(self):,}, feature_block_index={self.feature_block_index}"


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- configs


@dataclass
class UNetConfig:
    """All constructor arguments of :class:`UNetModel`, validated; ``print`` shows one per line.

    ``channel_mult`` may be "" (guided-diffusion's default for ``image_size``) or a string
    "1,1,2,2,4,4"; it is normalised to a tuple on construction.
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_resolutions: tuple = (8, 16, 32)
    dropout: float = 0.0
    channel_mult: Any = ""
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_checkpoint: bool = False
    feature_channels: int | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "model_channels", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_res_blocks, bool) or not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be an integer >= 1, got {self.num_res_blocks!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        self.channel_mult = _parse_channel_mult(self.channel_mult, self.image_size)

        if isinstance(self.attention_resolutions, (str, int)):
            raise ValueError(
                "attention_resolutions must be a sequence of downsample rates, e.g. (8, 16, 32) for "
                f"attention at 32, 16 and 8 px of a 256 px input; got {self.attention_resolutions!r}"
            )
        self.attention_resolutions = tuple(sorted({int(r) for r in self.attention_resolutions}))
        reachable = {2**level for level in range(len(self.channel_mult))}
        unreachable = [r for r in self.attention_resolutions if r not in reachable]
        if unreachable:
            raise ValueError(
                f"attention_resolutions {unreachable} are not downsample rates of this UNet "
                f"(reachable: {sorted(reachable)}); they are rates, not pixel resolutions"
            )

        channels = {int(m * self.model_channels) for m in self.channel_mult}
        bad = sorted(c for c in channels if c < 1 or c % NORM_GROUPS)
        if bad:
            raise ValueError(
                f"every level's channels (model_channels * channel_mult) must be a multiple of {NORM_GROUPS} "
                f"for GroupNorm32; got {bad} from model_channels={self.model_channels}, channel_mult={self.channel_mult}"
            )
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or int(self.num_classes) < 1):
            raise ValueError(f"num_classes must be None or a positive integer, got {self.num_classes!r}")
        attention_channels = {int(self.channel_mult[-1] * self.model_channels)}  # the middle block
        attention_channels |= {
            int(m * self.model_channels) for level, m in enumerate(self.channel_mult) if 2**level in self.attention_resolutions
        }
        for heads_name, heads in (("num_heads", self.num_heads), ("num_heads_upsample", self.num_heads_upsample)):
            if heads_name == "num_heads_upsample" and heads == -1:
                continue
            if self.num_head_channels == -1 and (heads < 1 or any(c % heads for c in attention_channels)):
                raise ValueError(f"{heads_name}={heads} does not divide the attention channels {sorted(attention_channels)}")
        if self.num_head_channels != -1 and (
            self.num_head_channels < 1 or any(c % self.num_head_channels for c in attention_channels)
        ):
            raise ValueError(
                f"num_head_channels={self.num_head_channels} does not divide the attention channels "
                f"{sorted(attention_channels)}"
            )
        if self.feature_channels is not None:
            if isinstance(self.feature_channels, bool) or int(self.feature_channels) < 1:
                raise ValueError(f"feature_channels must be None or a positive integer, got {self.feature_channels!r}")
            if len(self.channel_mult) < 3:
                raise ValueError(
                    "the feature head reads the decoder at 1/4 resolution, which needs at least 3 levels "
                    f"in channel_mult; got {self.channel_mult}"
                )

    @property
    def learn_sigma(self) -> bool:
        """True when the output carries the variance interpolation v besides epsilon."""
        return self.out_channels == 2 * self.in_channels

    @property
    def feature_resolution(self) -> int:
        """Side of the feature map for an ``image_size`` input (the head reads 1/4 resolution)."""
        return self.image_size // 4

    def to_kwargs(self) -> dict:
        """Keyword arguments for :class:`UNetModel`."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "UNetConfig":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}")
        return dataclasses.replace(self, **overrides)

    def __str__(self) -> str:
        lines = [f"  {f.name} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
        return "UNetConfig(\n" + "\n".join(lines) + "\n)"


UNET_CONFIGS: dict[str, UNetConfig] = {
    # guided-diffusion 256x256 ImageNet model with the flags of METHOD.md / the authors' code.
    "paper": UNetConfig(
        image_size=256,
        in_channels=3,
        model_channels=256,
        out_channels=6,  # learn_sigma: epsilon (3) + variance interpolation v (3)
        num_res_blocks=2,
        attention_resolutions=(256 // 32, 256 // 16, 256 // 8),
        dropout=0.0,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_classes=1000,  # as in 256x256_diffusion.pt; MVTec models override with 15
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        feature_channels=272,  # EfficientNet-b4 blocks 24 + 32 + 56 + 160
    ),
    # A toy that builds in milliseconds, for tests.
    "tiny": UNetConfig(
        image_size=32,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2,),  # attention at 16 px
        channel_mult=(1, 1, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        feature_channels=8,
    ),
    # Starting point for a 64 px model that trains on a laptop CPU (about 2M parameters).
    "cpu": UNetConfig(
        image_size=64,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(8,),  # attention at 8x8
        channel_mult=(1, 2, 2, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        feature_channels=None,  # set by the caller to the backbone's channel count
    ),
}


def unet_config(name: str = "paper", **overrides: Any) -> UNetConfig:
    """A named config ("paper", "tiny", "cpu") with some fields overridden."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; choose one of {sorted(UNET_CONFIGS)}")
    return UNET_CONFIGS[name].replace(**overrides)


def create_unet(name_or_config: str | UNetConfig = "paper", **overrides: Any) -> UNetModel:
    """Build a :class:`UNetModel` from a config name or a :class:`UNetConfig`, with overrides."""
    if isinstance(name_or_config, UNetConfig):
        config = name_or_config.replace(**overrides)
    elif isinstance(name_or_config, str):
        config = unet_config(name_or_config, **overrides)
    else:
        raise ValueError(f"expected a config name or a UNetConfig, got {type(name_or_config).__name__}")
    return UNetModel(**config.to_kwargs())
