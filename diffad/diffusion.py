"""Gaussian diffusion: noise schedules, respacing, the forward process, the reverse step,
losses and the per-element KL map used as the pixel-level anomaly score.

This module follows openai/improved-diffusion (``gaussian_diffusion.py``, ``losses.py``,
``respace.py``) closely enough that the two can be read side by side: the method names,
arguments and return conventions are the same.  Differences, all deliberate:

* Respacing lives in this class (``timestep_map``) instead of a ``SpacedDiffusion`` subclass.
  As in guided-diffusion the model is always called with ORIGINAL timestep indices
  (``model_timesteps``), never rescaled ones.
* Every quantity computed from a model output has a ``*_from_output`` twin, so a caller that
  ran the network once (our UNet also returns features) can get the reverse step, the loss
  and the KL map without a second forward pass.
* A model may return a tensor or a tuple ``(output, features, ...)``; only the first element
  is used here.
* ``kl_map`` returns the variational-bound term per element (in bits), which is the paper's
  pixel-level anomaly score.
* Sampling loops accept a ``torch.Generator`` for reproducible noise.

Timesteps are 0-based: ``t = 0`` is the first diffusion step, ``t = num_timesteps - 1`` the last.
"""

from __future__ import annotations

import enum
import math
import weakref
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "space_timesteps",
    "respace_betas",
    "GaussianDiffusion",
    "create_diffusion",
]


# --------------------------------------------------------------------------------------
# Enums
# --------------------------------------------------------------------------------------


class ModelMeanType(enum.Enum):
    """What the network's (first C channels of) output predicts."""

    PREVIOUS_X = enum.auto()  # the mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise epsilon


class ModelVarType(enum.Enum):
    """How the variance of p(x_{t-1} | x_t) is obtained.

    LEARNED_RANGE (improved-diffusion) lets the network output v in [-1, 1] per element and
    interpolates the log variance between the posterior variance (v = -1) and beta_t (v = +1).
    """

    LEARNED = enum.auto()  # the network outputs the log variance directly
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective: MSE on the mean target (+ vb term for a learned variance) or the VLB."""

    MSE = enum.auto()
    RESCALED_MSE = enum.auto()  # MSE + vb * num_timesteps / 1000 (the "hybrid" loss)
    KL = enum.auto()
    RESCALED_KL = enum.auto()  # vb * num_timesteps: an estimate of the full bound

    def is_vb(self) -> bool:
        """True for the losses that optimise the variational bound alone."""
        return self in (LossType.KL, LossType.RESCALED_KL)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64, shape (T,)) of the "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal) schedule.

    The linear schedule is scaled by 1000 / T, so that any T covers the same noise range as
    Ho et al.'s 1e-4 .. 0.02 at T = 1000.
    """
    num_diffusion_timesteps = _positive_int(num_diffusion_timesteps, "num_diffusion_timesteps")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        if beta_end >= 1.0:
            raise ValueError(
                f"linear schedule needs num_diffusion_timesteps > 20 (beta_end would be {beta_end})"
            )
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown beta schedule {schedule_name!r}; expected 'linear' or 'cosine'")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas.

    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at ``max_beta`` to avoid a
    singularity at the end of the chain.
    """
    num_diffusion_timesteps = _positive_int(num_diffusion_timesteps, "num_diffusion_timesteps")
    betas = []
    for i in range(num_diffusion_timesteps):
        s1 = i / num_diffusion_timesteps
        s2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(s2) / alpha_bar(s1), max_beta))
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which of the original ``num_timesteps`` steps to keep (as improved-diffusion's respace.py).

    ``section_counts`` is a list of ints or a comma-separated string ("10,15,20"): the
    process is split into that many equal sections and each keeps its count of evenly
    strided steps (first and last step of each section included).  "ddimN" instead keeps
    ``range(0, num_timesteps, stride)`` with the integer stride giving exactly N steps, as in
    the DDIM paper.
    """
    num_timesteps = _positive_int(num_timesteps, "num_timesteps")
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = _parse_int(section_counts[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired_count} steps with an integer stride "
                f"from {num_timesteps} steps ({section_counts!r})"
            )
        section_counts = [_parse_int(part, section_counts) for part in section_counts.split(",")]
    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("section_counts is empty")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= section_count <= size:
            raise ValueError(
                f"cannot take {section_count} steps from a section of {size} steps "
                f"(num_timesteps={num_timesteps}, section_counts={section_counts})"
            )
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def respace_betas(betas, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that visits only ``use_timesteps`` of the original one.

    The new betas are recomputed from the kept alpha-bars, beta'_k = 1 - abar[t_k] / abar[t_{k-1}],
    so q(x_t | x_0) is unchanged at every kept step.  Returns ``(new_betas, timestep_map)`` where
    ``timestep_map[k]`` is the original index of new step k.
    """
    betas = _validate_betas(betas)
    kept = sorted(set(int(t) for t in use_timesteps))
    if not kept:
        raise ValueError("use_timesteps is empty")
    if kept[0] < 0 or kept[-1] >= len(betas):
        raise ValueError(f"use_timesteps must lie in [0, {len(betas) - 1}], got {kept[0]}..{kept[-1]}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas = []
    last_alpha_cumprod = 1.0
    for t in kept:
        new_betas.append(1.0 - alphas_cumprod[t] / last_alpha_cumprod)
        last_alpha_cumprod = alphas_cumprod[t]
    return np.array(new_betas, dtype=np.float64), np.array(kept, dtype=np.int64)


# --------------------------------------------------------------------------------------
# Likelihood helpers (improved-diffusion's losses.py and nn.mean_flat)
# --------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) element-wise, in nats.

    Arguments broadcast; at least one must be a tensor.
    """
    tensor = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if tensor is None:
        raise ValueError("normal_kl needs at least one torch.Tensor argument")
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=tensor.dtype, device=tensor.device)
        for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (as in improved-diffusion)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (nats, per element) of 8-bit data x in [-1, 1] under a discretised Gaussian.

    Each of the 256 values owns a bin of width 2/255; the outermost bins extend to -inf / +inf,
    so the 256 probabilities sum to one.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must share a shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the batch one: shape (B, ...) -> (B,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


# --------------------------------------------------------------------------------------
# GaussianDiffusion
# --------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Training, sampling and likelihood utilities for a Gaussian diffusion model.

    :param betas: 1-D array of betas, one per diffusion step (t = 0 first).
    :param model_mean_type: what the model predicts (default epsilon).
    :param model_var_type: how the variance is obtained (default LEARNED_RANGE).
    :param loss_type: the training objective (default the hybrid RESCALED_MSE).
    :param timestep_map: for a respaced process, the original index of each step (see
        ``respace_betas``); models are then called with the original indices.
    :param learn_sigma: shorthand for ``model_var_type``: True -> LEARNED_RANGE,
        False -> FIXED_SMALL.  Give one or the other, not both.

    A model is any callable ``model(x_t, timesteps, **model_kwargs)`` returning a tensor of
    shape (B, C, ...) -- (B, 2C, ...) with a learned variance -- or a tuple whose first
    element is that tensor.
    """

    def __init__(
        self,
        betas,
        model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
        model_var_type: ModelVarType | None = None,
        loss_type: LossType = LossType.RESCALED_MSE,
        timestep_map=None,
        *,
        learn_sigma: bool | None = None,
    ):
        if not isinstance(model_mean_type, ModelMeanType):
            raise ValueError(f"model_mean_type must be a ModelMeanType, got {model_mean_type!r}")
        if not isinstance(loss_type, LossType):
            raise ValueError(f"loss_type must be a LossType, got {loss_type!r}")
        if learn_sigma is not None:
            implied = ModelVarType.LEARNED_RANGE if learn_sigma else ModelVarType.FIXED_SMALL
            if model_var_type is not None and model_var_type != implied:
                raise ValueError(
                    f"learn_sigma={learn_sigma} contradicts model_var_type={model_var_type}; give only one"
                )
            model_var_type = implied
        if model_var_type is None:
            model_var_type = ModelVarType.LEARNED_RANGE
        if not isinstance(model_var_type, ModelVarType):
            raise ValueError(f"model_var_type must be a ModelVarType, got {model_var_type!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        # All schedule arithmetic in float64; cast when extracted.
        betas = _validate_betas(betas)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        if timestep_map is None:
            self.timestep_map = None
        else:
            timestep_map = np.asarray(timestep_map)
            if timestep_map.shape != betas.shape:
                raise ValueError(
                    f"timestep_map has shape {timestep_map.shape}, expected one entry per beta {betas.shape}"
                )
            if not np.issubdtype(timestep_map.dtype, np.integer):
                raise ValueError(f"timestep_map must hold integers, got dtype {timestep_map.dtype}")
            if timestep_map[0] < 0 or np.any(np.diff(timestep_map) <= 0):
                raise ValueError("timestep_map must be non-negative and strictly increasing")
            self.timestep_map = timestep_map.astype(np.int64)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:  # a one-step chain has no t = 1 to borrow from; use beta_0
            self.posterior_log_variance_clipped = np.log(betas.copy())
        self.log_betas = np.log(betas)  # the learned range's upper end, kept (see _schedule_on)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_config(
        cls,
        *,
        steps: int = 1000,
        noise_schedule: str = "linear",
        learn_sigma: bool = True,
        sigma_small: bool = False,
        predict_xstart: bool = False,
        use_kl: bool = False,
        rescale_learned_sigmas: bool = True,
        timestep_respacing="",
    ) -> "GaussianDiffusion":
        """Build a (possibly respaced) diffusion like guided-diffusion's ``create_gaussian_diffusion``.

        ``timestep_respacing``: "" (no respacing), a section spec such as "250" or "10,20", or
        "ddimN".  Without ``learn_sigma`` the variance is FIXED_LARGE unless ``sigma_small``,
        exactly as guided-diffusion chooses it.
        """
        betas = get_named_beta_schedule(noise_schedule, steps)
        if use_kl:
            loss_type = LossType.RESCALED_KL
        elif rescale_learned_sigmas:
            loss_type = LossType.RESCALED_MSE
        else:
            loss_type = LossType.MSE
        if learn_sigma:
            model_var_type = ModelVarType.LEARNED_RANGE
        else:
            model_var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
        model_mean_type = ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON
        timestep_map = None
        if timestep_respacing not in ("", None):
            betas, timestep_map = respace_betas(betas, space_timesteps(steps, timestep_respacing))
        return cls(
            betas,
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            loss_type=loss_type,
            timestep_map=timestep_map,
        )

    @property
    def learn_sigma(self) -> bool:
        """True when the model outputs a variance as well (2C output channels)."""
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    def __repr__(self) -> str:
        respaced = "" if self.timestep_map is None else f", respaced over original steps 0..{self.timestep_map[-1]}"
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}{respaced}, "
            f"mean={self.model_mean_type.name}, var={self.model_var_type.name}, loss={self.loss_type.name})"
        )

    # ---------------------------------------------------------------- timesteps

    def timesteps(self, t, batch_size: int, device=None) -> torch.Tensor:
        """Validate ``t`` (int, 0-d or (B,) integer tensor) and return a long tensor of shape (B,)."""
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
            if device is not None:
                t = t.to(device)
            if t.ndim == 0:
                t = t.expand(batch_size)
            elif t.shape != (batch_size,):
                raise ValueError(f"timesteps must have shape ({batch_size},), got {tuple(t.shape)}")
            t = t.long()
        elif isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            if not 0 <= int(t) < self.num_timesteps:  # checked on the host, before it is on a device
                raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {int(t)}..{int(t)}")
            return torch.full((batch_size,), int(t), dtype=torch.long, device=device)
        else:
            raise ValueError(f"timesteps must be an int or an integer tensor, got {type(t).__name__}")
        if not t.numel() or not has_values(t):
            return t
        if t.device.type == "cuda":
            # Read on the host, the range would wait for the GPU: a synchronisation at every call,
            # several per training step. Asserted on the device instead (no wait; a bad value stops
            # the process at a later kernel, as the out-of-range gather it prevents would).
            torch._assert_async(((t >= 0) & (t < self.num_timesteps)).all())
        elif int(t.min()) < 0 or int(t.max()) >= self.num_timesteps:
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got {int(t.min())}..{int(t.max())}"
            )
        return t

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map (respaced) step indices to the original indices the model was trained with."""
        if self.timestep_map is None:
            return t
        return _schedule_on(self.timestep_map, t)[t]

    def _call_model(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs) -> torch.Tensor:
        """Run the model with original timesteps and keep only its first output."""
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return _first_output(out)

    # ---------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: torch.Tensor, t):
        """Mean, variance and log variance of q(x_t | x_0), each of x_start's shape."""
        t = self.timesteps(t, x_start.shape[0], x_start.device)
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start).expand_as(mean)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(mean)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        t = self.timesteps(t, x_start.shape[0], x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        _check_same_shape(noise=noise, x_start=x_start)
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t):
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0)."""
        _check_same_shape(x_start=x_start, x_t=x_t)
        t = self.timesteps(t, x_t.shape[0], x_t.device)
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t).expand_as(mean)
        log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t).expand_as(mean)
        return mean, variance, log_variance_clipped

    # ---------------------------------------------------------------- reverse step

    def p_mean_variance(
        self, model, x: torch.Tensor, t, clip_denoised: bool = True, denoised_fn=None, model_kwargs=None
    ) -> dict:
        """Run the model and return p(x_{t-1} | x_t) and the x_0 prediction.

        :return: dict with "mean", "variance", "log_variance", "pred_xstart" (all x's shape).
        """
        t = self.timesteps(t, x.shape[0], x.device)
        model_output = self._call_model(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t, clip_denoised: bool = True, denoised_fn=None
    ) -> dict:
        """``p_mean_variance`` from an already computed model output (a tensor or a tuple).

        ``denoised_fn`` (if given) is applied to the x_0 prediction before clipping to [-1, 1].
        """
        model_output = _first_output(model_output)
        t = self.timesteps(t, x.shape[0], x.device)
        batch, channels = x.shape[:2]
        expected_channels = 2 * channels if self.learn_sigma else channels
        if model_output.shape != (batch, expected_channels, *x.shape[2:]):
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected "
                f"{(batch, expected_channels, *x.shape[2:])} for {self.model_var_type.name} "
                f"and x of shape {tuple(x.shape)}"
            )

        if self.learn_sigma:
            model_output, model_var_values = torch.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x)
                max_log = _extract_into_tensor(self.log_betas, t, x)
                frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [min, max]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_t, but the posterior variance at t = 0 for a better decoder likelihood
                variance = np.append(self.posterior_variance[1:2], self.betas[1:])
                log_variance = np.log(variance)
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract_into_tensor(variance, t, x).expand_as(x)
            model_log_variance = _extract_into_tensor(log_variance, t, x).expand_as(x)

        def process_xstart(pred: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        _check_same_shape(x_t=x_t, eps=eps)
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor) -> torch.Tensor:
        """Invert the posterior mean: x_0 = (xprev - coef2 x_t) / coef1."""
        _check_same_shape(x_t=x_t, xprev=xprev)
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t) * x_t
        )

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(abar) - x_0) / sqrt(1 / abar - 1)."""
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # ---------------------------------------------------------------- sampling

    def p_sample(
        self,
        model,
        x: torch.Tensor,
        t,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs=None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t = 0).  Returns {"sample", "pred_xstart"}."""
        t = self.timesteps(t, x.shape[0], x.device)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn(x.shape, x, generator)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or ``noise``) down to x_0; returns x_0."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict]:
        """Like ``p_sample_loop`` but yields every step's ``p_sample`` dict."""
        yield from self._sample_loop(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs),
        )

    def ddim_sample(
        self,
        model,
        x: torch.Tensor,
        t,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs=None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict:
        """One DDIM step (Song et al., eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        t = self.timesteps(t, x.shape[0], x.device)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from the (clipped) x_0 prediction, whatever the model predicts.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        noise = _randn(x.shape, x, generator)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling over every step of this (usually respaced) process; returns x_0."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta, generator
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict]:
        """Like ``ddim_sample_loop`` but yields every step's ``ddim_sample`` dict."""
        yield from self._sample_loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta),
        )

    def _sample_loop(self, step, model, shape, noise, device, progress, generator, step_kwargs) -> Iterator[dict]:
        """Shared body of the sampling loops: start from noise, apply ``step`` for t = T-1 .. 0."""
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2:
            raise ValueError(f"shape must be a tuple (N, C, ...), got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if device is None:
            device = _model_device(model, noise, generator)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            img = noise.to(device)
        else:
            img = torch.randn(shape, device=device, generator=generator)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    # ---------------------------------------------------------------- likelihood terms

    def kl_map(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t, clip_denoised: bool = True
    ) -> torch.Tensor:
        """Per-element variational-bound term in bits, of x_start's shape.

        For t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t == 0: the decoder's
        negative log-likelihood of the 8-bit x_0.  This is the paper's pixel-level score.
        """
        return self._vb_terms_map(model_output, x_start, x_t, t, clip_denoised)[0]

    def _vb_terms_map(self, model_output, x_start, x_t, t, clip_denoised):
        """(per-element vb term in bits, p_mean_variance dict)."""
        _check_same_shape(x_start=x_start, x_t=x_t)
        t = self.timesteps(t, x_t.shape[0], x_t.device)
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"]) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        ) / math.log(2.0)
        first_step = (t == 0).view(-1, *([1] * (x_t.ndim - 1)))
        return torch.where(first_step, decoder_nll, kl), out

    def vb_terms_bpd_from_output(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t, clip_denoised: bool = True
    ) -> dict:
        """``vb_terms_bpd`` from an already computed model output."""
        vb_map, out = self._vb_terms_map(model_output, x_start, x_t, t, clip_denoised)
        return {"output": mean_flat(vb_map), "pred_xstart": out["pred_xstart"]}

    def vb_terms_bpd(
        self, model, x_start: torch.Tensor, x_t: torch.Tensor, t, clip_denoised: bool = True, model_kwargs=None
    ) -> dict:
        """One term of the variational bound per sample, in bits per dimension.

        :return: dict with "output" (shape (B,): decoder NLL at t == 0, KL otherwise) and "pred_xstart".
        """
        t = self.timesteps(t, x_t.shape[0], x_t.device)
        model_output = self._call_model(model, x_t, t, model_kwargs)
        return self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised)

    _vb_terms_bpd = vb_terms_bpd  # improved-diffusion's name

    # ---------------------------------------------------------------- training

    def training_losses(
        self, model, x_start: torch.Tensor, t, model_kwargs=None, noise: torch.Tensor | None = None
    ) -> dict:
        """Per-sample training losses for timesteps ``t`` (shape (B,)).

        :return: dict with "loss" and, depending on the loss type, "mse" and "vb" (all (B,)).
        """
        t = self.timesteps(t, x_start.shape[0], x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._call_model(model, x_t, t, model_kwargs)
        return self.training_losses_from_output(model_output, x_start, x_t, t, noise)

    def training_losses_from_output(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t, noise: torch.Tensor
    ) -> dict:
        """``training_losses`` from a model output computed on ``x_t = q_sample(x_start, t, noise)``.

        Hybrid loss (MSE / RESCALED_MSE with a learned variance): the vb term sees the model's
        mean detached, so it trains only the variance while the MSE trains only the mean.
        """
        model_output = _first_output(model_output)
        _check_same_shape(x_start=x_start, x_t=x_t, noise=noise)
        t = self.timesteps(t, x_t.shape[0], x_t.device)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        channels = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"model output has {model_output.shape[1]} channels, expected {2 * channels} "
                    f"(mean and variance) for {self.model_var_type.name}"
                )
            mean_output, var_values = torch.split(model_output, channels, dim=1)
            frozen_out = torch.cat([mean_output.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd_from_output(frozen_out, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the initial implementation; without it
                # the vb term would hurt the MSE term.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            mean_output = model_output

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        _check_same_shape(model_output_mean=mean_output, target=target)
        terms["mse"] = mean_flat((target - mean_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def create_diffusion(**kwargs) -> GaussianDiffusion:
    """Module-level alias of ``GaussianDiffusion.from_config`` (guided-diffusion's create_gaussian_diffusion)."""
    return GaussianDiffusion.from_config(**kwargs)


# --------------------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------------------


def has_values(tensor: torch.Tensor) -> bool:
    """False for tensors without data (meta, or fake ones used to plan memory): skip value checks."""
    return tensor.device.type != "meta" and not isinstance(tensor, FakeTensor)


# Device copies of the schedule's arrays, one per array and device while the array lives. Copying a
# host array to a GPU waits for the GPU (a synchronisation, several per training step otherwise);
# the schedules never change after construction.
_DEVICE_COPIES: dict[tuple[int, torch.device], tuple[weakref.ref, torch.Tensor]] = {}


def _schedule_on(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``torch.as_tensor(arr, device=like.device)``; on a GPU, a copy kept for the array's lifetime.

    The CPU shares the array's memory (no copy), and a fake or meta ``like`` (memory planning)
    gets a tensor of its own kind, not kept."""
    device = like.device
    if device.type == "cpu" or not isinstance(arr, np.ndarray) or not has_values(like):
        return torch.as_tensor(arr, device=device)
    key = (id(arr), device)
    kept = _DEVICE_COPIES.get(key)
    if kept is not None and kept[0]() is arr:
        return kept[1]
    with torch.inference_mode(False):  # a plain tensor, usable in and out of inference mode
        tensor = torch.as_tensor(arr, device=device)
    _DEVICE_COPIES[key] = (weakref.ref(arr, lambda _, key=key: _DEVICE_COPIES.pop(key, None)), tensor)
    return tensor


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``arr[timesteps]`` as a tensor shaped (B, 1, 1, ...) to broadcast against ``like``.

    The float64 schedule is cast to like's dtype, but never below float32 (fp16 inputs get
    float32 coefficients, as in guided-diffusion).
    """
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    dtype = torch.promote_types(dtype, torch.float32)
    values = _schedule_on(arr, timesteps)[timesteps].to(dtype)
    return values.view(-1, *([1] * (like.ndim - 1)))


def _first_output(output):
    """The model's main output: the tensor itself, or the first element of a tuple/list."""
    if isinstance(output, (tuple, list)):
        if not output:
            raise ValueError("model returned an empty tuple")
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"model output must be a tensor or a tuple starting with one, got {type(output).__name__}")
    return output


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(value.shape) for name, value in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _model_device(model, noise, generator) -> torch.device:
    """Where to sample: the noise's device, else the model's parameters', else the generator's."""
    if noise is not None:
        return noise.device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def _validate_betas(betas) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}")
    return betas


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot parse timestep respacing {spec!r}: {text!r} is not an integer") from None
