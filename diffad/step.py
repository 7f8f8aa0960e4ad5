"""One training step, and what it is made of: the batch, the optimizer and its learning rate, the
EMA and its rate, the random streams a checkpoint saves.

The step draws a batch of normal images x0 and timesteps t, noises them to x_t and runs the
UNet once. Its diffusion output gives guided-diffusion's hybrid loss (epsilon MSE plus the
variational bound for the learned variance); its feature head, trained to predict the
backbone's features of the clean x0 from x_t, adds ``feature_loss_weight`` times an MSE.
:func:`training_step` serves the loop (:mod:`diffad.train`), the memory plan
(:mod:`diffad.device_plan`, on fake tensors) and the benchmarks alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffad.device import Precision
from diffad.diffusion import GaussianDiffusion
from diffad.presets import Preset

__all__ = ["Batch", "training_step", "draw_batch", "make_optimizer", "lr_at", "ema_rate_at", "update_ema",
           "LOSS_NAMES"]

LOSS_NAMES = ("loss", "mse", "vb", "feature")


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
