"""Turning an anomalous image into a normal one: gradient denoising and plain reconstruction.

**Gradient denoising** (the paper's Fig. 7). A :class:`~diffad.baselines.PaDiM` model of
normal features scores an image by its mean Mahalanobis distance L(x). The image moves
down L's gradient in small steps shaped like forward diffusion steps,

    x <- sqrt(1 - s^2) x - s g / std(g),      g = dL/dx,  s = ``step_size`` (0.02),

which treats the anomaly as "noise" to remove. Gradient steps alone would also add
adversarial, unnatural patterns that fool the backbone; so every ``inner_steps`` (5) steps the
diffusion model pulls the image back towards normal images with one reverse step at a small
timestep, x <- mu_theta(x, t) (the authors' code: t = 8, no noise; the paper writes
x ~ N(mu_theta, sigma_theta), which ``stochastic=True`` does). The authors run 100 rounds.
Everything happens in the diffusion model's [-1, 1] range; the backbone gets the image
mapped back to [0, 1] (then normalised for ImageNet by the backbone itself). Unlike the
authors' code, the gradient is normalised by its std per image rather than over the batch,
so that images of a batch do not influence each other.

**Plain reconstruction**, for comparison: noise the image to x_t, then run the reverse
process from t down to 0 (ancestral DDPM sampling or deterministic DDIM). Small t keeps the
anomaly; large t removes it but also changes the normal parts.

**Digits that hold on every machine.** Each normalised step moves the image by ``s`` whatever
the gradient's size, and the next gradient is taken where the last step landed, so a
difference in the last bit of float32 (another CPU's vector width, another thread count,
another BLAS kernel) grows from step to step until the printed losses differ in their third
digit. The loop therefore runs in the precision of the PaDiM model it follows: a PaDiM made
with ``dtype=torch.float64`` (:func:`reproducible_dtype` on a CPU) makes the UNet, the
backbone and the image float64 too. The growth then starts half a billion times lower: a run
of some tens of steps (chapter 8's 6-round probe) prints the same digits everywhere, while a
run of a hundred steps and more outgrows even float64 in its third digit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from diffad.baselines.padim import PaDiM
from diffad.data import from_diffusion_range, to_diffusion_range
from diffad.diffusion import GaussianDiffusion, respace_betas
from diffad.checks import check_images
from diffad.models.denoiser import TrainedModel, build_diffusion

RECONSTRUCTION_METHODS = ("ddpm", "ddim")


@dataclass
class Trajectory:
    """Images along a gradient-denoising run, with the PaDiM loss of each.

    ``images[i]`` (N, 3, H, W) in [0, 1] on the CPU is the image after ``steps[i]`` rounds
    (``steps[0] = 0``: the input; the last entry: the result); ``losses[i]`` (N,) is its mean
    Mahalanobis distance.
    """

    images: list[torch.Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def result(self) -> torch.Tensor:
        """The final image (N, 3, H, W) in [0, 1]."""
        return self.images[-1]

    def __len__(self) -> int:
        return len(self.images)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def reproducible_dtype(device) -> torch.dtype:
    """The precision for gradient denoising whose digits hold across machines.

    float64 on a CPU, where it costs about four times float32 and starts the amplified rounding
    (module docstring) half a billion times lower; float32 on a GPU, where float64 is many times
    slower and no pinned output depends on the result.
    """
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def _unet_in(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``unet`` itself if its weights are ``dtype``, else a copy cast to ``dtype`` (the model is untouched)."""
    if next(unet.parameters()).dtype == dtype:
        return unet
    return copy.deepcopy(unet).to(dtype, memory_format=torch.contiguous_format)


def mahalanobis_loss(padim: PaDiM, x: torch.Tensor) -> torch.Tensor:
    """Mean Mahalanobis distance (N,) of images x in the diffusion range [-1, 1]."""
    return padim.grid_scores(from_diffusion_range(x)).flatten(1).mean(dim=1)


def gradient_step(padim: PaDiM, x: torch.Tensor, step_size: float) -> torch.Tensor:
    """One step x <- sqrt(1 - s^2) x - s g / std(g) down the Mahalanobis loss (x in [-1, 1])."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(mahalanobis_loss(padim, x_in).sum(), x_in)
    std = grad.flatten(1).std(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return math.sqrt(1.0 - step_size**2) * x - step_size * grad / std


@torch.no_grad()
def gradient_denoise(
    model: TrainedModel,
    padim: PaDiM,
    image: torch.Tensor,
    rounds: int = 100,
    inner_steps: int = 5,
    step_size: float | None = None,
    pull_t_index: int | None = 8,
    stochastic: bool = False,
    category: str | None = None,
    record_every: int = 10,
    generator: torch.Generator | None = None,
    respacing: str = "",
) -> Trajectory:
    """Move ``image`` (N, 3, H, W) in [0, 1] towards normal images; returns the :class:`Trajectory`.

    Each of ``rounds`` rounds takes ``inner_steps`` gradient steps down the PaDiM loss, then one
    reverse step of the diffusion model at step ``pull_t_index`` (None: no pull, gradient steps only).
    ``stochastic`` samples that reverse step instead of taking its mean (noise from
    ``generator``; None uses the global RNG). The loop computes in ``padim``'s dtype: a float64
    PaDiM (``PaDiM(..., dtype=torch.float64)``) gives results whose digits do not depend on
    the CPU or the thread count for some tens of steps (module docstring); the UNet is then used
    through a float64 copy. ``pull_t_index`` indexes the schedule that
    ``respacing`` gives: the model's own T steps by default (an original step), the paper's
    250-step scoring schedule with ``respacing="250"`` (where 8 is original step 32). An image is recorded every
    ``record_every`` rounds and at the end. ``padim`` (fitted at the model's image size) is
    moved to the UNet's device.
    """
    for name, value, low in (("rounds", rounds, 1), ("inner_steps", inner_steps, 0), ("record_every", record_every, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    step_size = model.preset.denoise_step_size if step_size is None else step_size
    if not 0.0 < step_size < 1.0:
        raise ValueError(f"step_size must lie in (0, 1), got {step_size}")
    image = check_images(image, "image", image_size=model.preset.image_size)
    if not padim.is_fitted:
        raise ValueError("padim is not fitted: call padim.fit(normal_training_images) first")
    if padim.image_size != tuple(image.shape[-2:]):
        raise ValueError(f"padim was fitted on {padim.image_size} images, the model works at {tuple(image.shape[-2:])}")
    device = _device_of(model.unet)
    if padim.device != device:
        padim.to(device)
    unet = _unet_in(model.unet.eval(), padim.dtype)
    diffusion = None
    if pull_t_index is not None:
        diffusion = build_diffusion(model.preset, respacing)
        if not isinstance(pull_t_index, int) or not 0 <= pull_t_index < diffusion.num_timesteps:
            raise ValueError(
                f"pull_t_index must be an int in [0, {diffusion.num_timesteps}) or None, got {pull_t_index!r}"
            )
    model_kwargs = model.unet_kwargs(category, image.shape[0], device)

    x = to_diffusion_range(image.to(device, padim.dtype))
    trajectory = Trajectory()

    def record(step: int) -> None:
        trajectory.images.append(from_diffusion_range(x, clamp=True).float().cpu())
        trajectory.steps.append(step)
        trajectory.losses.append(mahalanobis_loss(padim, x).float().cpu())

    record(0)
    for round_index in range(1, rounds + 1):
        for _ in range(inner_steps):
            x = gradient_step(padim, x, step_size)
        if diffusion is not None:
            out = diffusion.p_mean_variance(unet, x, pull_t_index, clip_denoised=True, model_kwargs=model_kwargs)
            x = out["mean"]
            if stochastic and pull_t_index > 0:
                noise_device = generator.device if generator is not None else "cpu"
                noise = torch.randn(x.shape, generator=generator, device=noise_device).to(device, x.dtype)
                x = x + torch.exp(0.5 * out["log_variance"]) * noise
        if round_index % record_every == 0 or round_index == rounds:
            record(round_index)
    return trajectory


def _reverse_process(base: GaussianDiffusion, t: int, steps: int | None) -> GaussianDiffusion:
    """The reverse process from original step t to 0, over all t + 1 steps or ``steps`` evenly spaced ones.

    One step jumps from t straight to x_0 (the model's x_0 prediction)."""
    count = t + 1 if steps is None else steps
    kept = np.unique(np.round(np.linspace(t, 0, count)).astype(np.int64))  # always holds t; holds 0 if count > 1
    betas, timestep_map = respace_betas(base.betas, kept)
    return GaussianDiffusion(betas, model_mean_type=base.model_mean_type, model_var_type=base.model_var_type,
                             loss_type=base.loss_type, timestep_map=timestep_map)


@torch.no_grad()
def reconstruct(
    model: TrainedModel,
    image: torch.Tensor,
    t_original: int = 200,
    category: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
) -> torch.Tensor:
    """Noise ``image`` (N, 3, H, W) in [0, 1] to step ``t_original`` (of the model's T steps), denoise back to 0.

    ``steps``: reverse steps to take (None: all t_original + 1; k: k evenly spaced steps down to 0).
    ``method``: ``"ddpm"`` (ancestral sampling) or ``"ddim"`` (deterministic for ``eta=0``).
    All noise comes from a generator seeded with ``seed`` on the model's device, so the
    result is reproducible on one device. Returns the reconstruction in [0, 1] on the CPU.
    """
    if method not in RECONSTRUCTION_METHODS:
        raise ValueError(f"method must be one of {RECONSTRUCTION_METHODS}, got {method!r}")
    image = check_images(image, "image", image_size=model.preset.image_size)
    base = build_diffusion(model.preset)
    t = t_original
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < base.num_timesteps:
        raise ValueError(f"t_original must be an int in [0, {base.num_timesteps}), got {t!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= t + 1):
        raise ValueError(f"steps must be None or an int in [1, t_original + 1 = {t + 1}], got {steps!r}")
    unet = model.unet.eval()
    device = _device_of(unet)
    model_kwargs = model.unet_kwargs(category, image.shape[0], device)
    diffusion = _reverse_process(base, t, steps)
    generator = torch.Generator(device=device).manual_seed(seed)

    x0 = to_diffusion_range(image.to(device))
    noise = torch.randn(x0.shape, generator=generator, device=device)
    x = base.q_sample(x0, t, noise=noise)  # the last kept step of ``diffusion`` is original step t
    for index in range(diffusion.num_timesteps - 1, -1, -1):
        if method == "ddpm":
            out = diffusion.p_sample(unet, x, index, clip_denoised=True, model_kwargs=model_kwargs, generator=generator)
        else:
            out = diffusion.ddim_sample(unet, x, index, clip_denoised=True, model_kwargs=model_kwargs, eta=eta,
                                        generator=generator)
        x = out["sample"]
    return from_diffusion_range(x, clamp=True).cpu()
