"""Tests for diffad.denoise: gradient denoising and plain reconstruction.

A tiny untrained UNet (32 px) and a PaDiM on the offline EfficientNet-Lite0 are enough to
check shapes, the update rule, the pull, determinism and errors.
"""

import ast
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffad.backbones import FeatureExtractor
from diffad.baselines import PaDiM
from diffad.data import from_diffusion_range, to_diffusion_range
from diffad.denoise import Trajectory, gradient_denoise, reconstruct, reproducible_dtype
from diffad.presets import get_preset
from diffad.models.denoiser import TrainedModel, build_diffusion, build_unet

SIZE = 32


def smooth_noise(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1) * 0.5 + 0.25


def tiny_model(class_cond: bool = False) -> TrainedModel:
    preset = get_preset("cpu", unet="tiny", image_size=SIZE, class_cond=class_cond)
    torch.manual_seed(0)
    categories = ["a", "b"] if class_cond else ["a"]
    unet = build_unet(preset, 8, len(categories) if class_cond else None).eval()
    # ADM zero-initialises every residual branch's last layer, so a fresh UNet ignores t and the
    # label; perturb all weights so that the output depends on them, as a trained one's does.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return TrainedModel(preset, categories, unet, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def padim():
    extractor = FeatureExtractor("tf_efficientnet_lite0", pretrained=True, input_size=64)  # online: checked, lite0 loads from the installed wheel
    return PaDiM(extractor, n_features=32, device="cpu").fit(smooth_noise(8, seed=0))


@pytest.fixture(scope="module")
def anomalous():
    images = smooth_noise(2, seed=1)
    images[:, :, 8:16, 10:18] = 1.0
    return images


def test_trajectory_shapes_and_records(model, padim, anomalous):
    trajectory = gradient_denoise(model, padim, anomalous, rounds=4, inner_steps=2, record_every=3)
    assert isinstance(trajectory, Trajectory)
    assert trajectory.steps == [0, 3, 4] and len(trajectory) == 3
    assert len(trajectory.images) == len(trajectory.losses) == 3
    assert torch.equal(trajectory.images[0], anomalous)
    assert trajectory.result is trajectory.images[-1]
    for image, loss in zip(trajectory.images, trajectory.losses):
        assert image.shape == anomalous.shape and image.min() >= 0 and image.max() <= 1
        assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert not torch.equal(trajectory.result, anomalous)


def test_loss_decreases_along_gradient_steps_without_pull(model, padim, anomalous):
    trajectory = gradient_denoise(model, padim, anomalous, rounds=4, inner_steps=2, pull_t_index=None,
                                  record_every=1)
    losses = torch.stack(trajectory.losses)  # (records, images)
    assert trajectory.steps == [0, 1, 2, 3, 4]
    assert (losses[-1] < 0.9 * losses[0]).all()
    assert (losses[1:] < losses[:1]).all()
    # the recorded loss is the PaDiM mean distance of the recorded image
    with torch.no_grad():
        first = padim.grid_scores(anomalous).flatten(1).mean(dim=1)
    assert torch.allclose(losses[0], first)


def test_one_gradient_step_follows_the_update_rule(model, padim, anomalous):
    step_size = 0.05
    result = gradient_denoise(model, padim, anomalous, rounds=1, inner_steps=1, step_size=step_size,
                              pull_t_index=None).result
    x = to_diffusion_range(anomalous).requires_grad_(True)
    loss = padim.grid_scores(from_diffusion_range(x)).mean(dim=(1, 2)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    g_hat = grad / grad.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    expected = math.sqrt(1 - step_size**2) * x.detach() - step_size * g_hat
    assert torch.allclose(result, from_diffusion_range(expected).clamp(0, 1), atol=1e-5)


def test_pull_is_the_reverse_step_mean(model, padim, anomalous):
    result = gradient_denoise(model, padim, anomalous, rounds=1, inner_steps=0, pull_t_index=8).result
    diffusion = build_diffusion(model.preset)
    with torch.no_grad():
        mean = diffusion.p_mean_variance(model.unet, to_diffusion_range(anomalous), 8)["mean"]
    assert torch.allclose(result, from_diffusion_range(mean).clamp(0, 1), atol=1e-6)


def test_gradient_denoise_is_deterministic(model, padim, anomalous):
    kwargs = dict(rounds=2, inner_steps=1, record_every=1)
    first = gradient_denoise(model, padim, anomalous, **kwargs)
    second = gradient_denoise(model, padim, anomalous, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first.images, second.images))
    noisy = [gradient_denoise(model, padim, anomalous, stochastic=True, generator=torch.Generator().manual_seed(s),
                              **kwargs).result for s in (0, 0, 1)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    assert not torch.equal(noisy[0], first.result)


def test_class_conditional_model_needs_a_category(padim, anomalous):
    conditional = tiny_model(class_cond=True)
    with pytest.raises(ValueError, match="category"):
        gradient_denoise(conditional, padim, anomalous, rounds=1, inner_steps=0)
    with pytest.raises(ValueError, match="not on 'c'"):
        reconstruct(conditional, anomalous, t_original=3, category="c")
    a = gradient_denoise(conditional, padim, anomalous, rounds=1, inner_steps=0, category="a").result
    b = gradient_denoise(conditional, padim, anomalous, rounds=1, inner_steps=0, category="b").result
    assert not torch.equal(a, b)  # the label reaches the UNet


def test_gradient_denoise_errors(model, padim, anomalous):
    with pytest.raises(ValueError, match="trained at 32x32"):
        gradient_denoise(model, padim, F.interpolate(anomalous, size=64), rounds=1)
    with pytest.raises(ValueError, match="pull_t_index"):
        gradient_denoise(model, padim, anomalous, rounds=1, pull_t_index=1000)
    with pytest.raises(ValueError, match="not fitted"):
        gradient_denoise(model, PaDiM(padim.extractor, n_features=4, device="cpu"), anomalous, rounds=1)
    with pytest.raises(ValueError, match="rounds"):
        gradient_denoise(model, padim, anomalous, rounds=0)
    with pytest.raises(ValueError, match="step_size"):
        gradient_denoise(model, padim, anomalous, rounds=1, step_size=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gradient_denoise(model, padim, anomalous * 2 - 1, rounds=1)


# ------------------------------------------------------------------- reconstruct


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and records the timesteps it is called with."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, **kwargs):
        self.calls.append(t[0].item())
        return self.unet(x, t, **kwargs)


def test_reconstruct_shapes_range_and_determinism(model, anomalous):
    first = reconstruct(model, anomalous, t_original=10, seed=0)
    assert first.shape == anomalous.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, reconstruct(model, anomalous, t_original=10, seed=0))
    assert not torch.equal(first, reconstruct(model, anomalous, t_original=10, seed=1))
    ddim = reconstruct(model, anomalous, t_original=10, steps=4, method="ddim")
    assert ddim.shape == anomalous.shape
    assert torch.equal(ddim, reconstruct(model, anomalous, t_original=10, steps=4, method="ddim", seed=0))
    assert not torch.equal(ddim, reconstruct(model, anomalous, t_original=10, steps=4, method="ddim", seed=1))


def test_reconstruct_visits_the_right_timesteps(model, anomalous):
    counting = CountingUNet(model.unet)
    wrapped = TrainedModel(model.preset, model.categories, counting, model.feature_channels)
    reconstruct(wrapped, anomalous, t_original=6)
    assert counting.calls == [6, 5, 4, 3, 2, 1, 0]
    counting.calls.clear()
    reconstruct(wrapped, anomalous, t_original=20, steps=3, method="ddim")
    assert counting.calls == [20, 10, 0]
    counting.calls.clear()
    reconstruct(wrapped, anomalous, t_original=20, steps=1)
    assert counting.calls == [20]


def test_one_step_reconstruction_is_the_x0_prediction(model, anomalous):
    t = 15
    result = reconstruct(model, anomalous, t_original=t, steps=1, seed=3)
    diffusion = build_diffusion(model.preset)
    x0 = to_diffusion_range(anomalous)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x_t = diffusion.q_sample(x0, t, noise=noise)
        predicted = diffusion.p_mean_variance(model.unet, x_t, t)["pred_xstart"]
    assert torch.allclose(result, from_diffusion_range(predicted).clamp(0, 1), atol=1e-5)


def test_reconstruct_errors(model, anomalous):
    with pytest.raises(ValueError, match="t_original must be"):
        reconstruct(model, anomalous, t_original=1000)
    with pytest.raises(ValueError, match="steps"):
        reconstruct(model, anomalous, t_original=5, steps=7)
    with pytest.raises(ValueError, match="method"):
        reconstruct(model, anomalous, t_original=5, method="euler")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reconstruct(model, anomalous[0], t_original=5)


def test_step_size_defaults_to_the_presets(model, padim, anomalous):
    """Without step_size, gradient_denoise takes the preset's denoise_step_size (cpu: scaled to 64 px)."""
    assert get_preset("paper").denoise_step_size == 0.02
    assert get_preset("cpu").denoise_step_size == pytest.approx(0.02 * 64 / 256)
    own = model.preset.denoise_step_size
    kwargs = dict(rounds=2, inner_steps=2, pull_t_index=None)
    default = gradient_denoise(model, padim, anomalous, **kwargs).result
    assert torch.equal(default, gradient_denoise(model, padim, anomalous, step_size=own, **kwargs).result)
    assert not torch.allclose(default, gradient_denoise(model, padim, anomalous, step_size=own / 2, **kwargs).result)


# ------------------------------------------------------------- digits on every machine


@pytest.fixture(scope="module")
def padim64():
    extractor = FeatureExtractor("tf_efficientnet_lite0", pretrained=True, input_size=64)  # online: checked, lite0 loads from the installed wheel
    return PaDiM(extractor, n_features=32, device="cpu", dtype=torch.float64).fit(smooth_noise(8, seed=0))


def test_reproducible_dtype_is_float64_on_a_cpu_only():
    assert reproducible_dtype("cpu") is torch.float64
    assert reproducible_dtype(torch.device("cuda")) is torch.float32


def test_a_float64_padim_runs_the_loop_in_float64(model, padim, padim64, anomalous):
    assert padim64.dtype is torch.float64
    assert padim64.mean.dtype is torch.float64 and padim64.inv_covariance.dtype is torch.float64
    trajectory = gradient_denoise(model, padim64, anomalous, rounds=1, inner_steps=1, step_size=0.05,
                                  pull_t_index=8)
    # the model is used through a float64 copy and left as it was
    assert next(model.unet.parameters()).dtype is torch.float32
    assert trajectory.result.dtype is torch.float32 and trajectory.losses[0].dtype is torch.float32
    # the same step and pull, written out in float64
    x = to_diffusion_range(anomalous.double()).requires_grad_(True)
    (grad,) = torch.autograd.grad(padim64.grid_scores(from_diffusion_range(x)).mean(dim=(1, 2)).sum(), x)
    x = math.sqrt(1 - 0.05**2) * x.detach() - 0.05 * grad / grad.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    unet64 = copy.deepcopy(model.unet).double()
    with torch.no_grad():
        mean = build_diffusion(model.preset).p_mean_variance(unet64, x, 8, clip_denoised=True)["mean"]
    assert torch.allclose(trajectory.result, from_diffusion_range(mean, clamp=True).float(), atol=1e-6)
    # and the float32 run agrees with it to float32's precision in one step
    single = gradient_denoise(model, padim, anomalous, rounds=1, inner_steps=1, step_size=0.05, pull_t_index=8)
    assert torch.allclose(single.result, trajectory.result, atol=1e-4)


_PORTABILITY_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_denoise import FeatureExtractor, PaDiM, gradient_denoise, smooth_noise, tiny_model
extractor = FeatureExtractor("tf_efficientnet_lite0", pretrained=True, input_size=64)  # online: checked, lite0 loads from the installed wheel
padim = PaDiM(extractor, n_features=32, device="cpu", dtype=torch.{dtype}).fit(smooth_noise(8, seed=0))
images = smooth_noise(2, seed=1)
images[:, :, 8:16, 10:18] = 1.0
run = gradient_denoise(tiny_model(), padim, images, rounds=4, inner_steps=5, step_size=0.02, record_every=4)
print(repr([float(v) for v in run.losses[-1]]))
"""

# Thread counts and instruction sets that change float32's last bits on x86-64 (issue 30).
MACHINE_CONFIGURATIONS = {
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "avx2 kernels": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def _denoise_in_subprocess(dtype: str, env_changes: dict) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY",
                                                              "ONEDNN_MAX_CPU_ISA")}
    env.update(env_changes)
    code = _PORTABILITY_RUN.format(tests=str(Path(__file__).parent), dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters that denoise: the full run's tier
def test_float64_denoising_gives_the_same_digits_across_threads_and_kernels():
    """20 steps: float32's last bits grow to the second digit here (99.3 to 103.3 across these
    configurations, measured); float64's stay far below (a run of 100 steps and more outgrows
    float64 too, see diffad.denoise)."""
    losses = {name: _denoise_in_subprocess("float64", env) for name, env in MACHINE_CONFIGURATIONS.items()}
    reference = losses["2 threads"]
    for name, values in losses.items():
        assert values == pytest.approx(reference, rel=1e-8), name
