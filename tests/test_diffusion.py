"""Tests of diffad.diffusion, derived from the maths (independent float64 numpy) and golden values."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffad.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    approx_standard_normal_cdf,
    betas_for_alpha_bar,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    mean_flat,
    normal_kl,
    respace_betas,
    space_timesteps,
)


def _x0_and_eps(batch=2, dtype=torch.float64):
    """Tiny deterministic inputs: x0 on [-1, 1) and a linear ramp of 'noise'."""
    n = batch * 3 * 2 * 2
    x0 = torch.arange(n, dtype=dtype).reshape(batch, 3, 2, 2) / (n / 2) - 1
    eps = torch.linspace(-1.5, 1.5, n, dtype=dtype).reshape(batch, 3, 2, 2)
    return x0, eps


def _np_schedule(betas):
    """alpha-bar and alpha-bar-prev computed with a plain loop (independent of the module)."""
    abar, running = [], 1.0
    for beta in betas:
        running *= 1.0 - beta
        abar.append(running)
    abar = np.array(abar)
    return abar, np.append(1.0, abar[:-1])


def _bayes_posterior(x0, xt, beta, abar_prev):
    """Posterior of x_{t-1} by Bayes: prior N(sqrt(abar_prev) x0, 1 - abar_prev) times
    likelihood N(x_t; sqrt(1 - beta) x_{t-1}, beta)."""
    prior_var = 1.0 - abar_prev
    if prior_var == 0.0:  # t = 0: x_{-1} is x0 itself
        return x0.copy(), 0.0
    precision = 1.0 / prior_var + (1.0 - beta) / beta
    var = 1.0 / precision
    mean = var * (math.sqrt(abar_prev) * x0 / prior_var + math.sqrt(1.0 - beta) * xt / beta)
    return mean, var


class TinyConvNet(nn.Module):
    """A fixed random conv net with a learned-variance head; records the timesteps it sees."""

    def __init__(self, channels=3, out_channels=6, seed=0, return_features=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.2 * torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(0.1 * torch.randn(self.conv.bias.shape, generator=gen))
        self.return_features = return_features
        self.seen_timesteps = []

    def forward(self, x, t):
        self.seen_timesteps.append(t.clone())
        out = self.conv(x) + 1e-3 * t.to(x.dtype).view(-1, 1, 1, 1)
        out = torch.cat([out[:, :3], torch.tanh(out[:, 3:])], dim=1) if out.shape[1] == 6 else out
        return (out, x.mean(dim=1, keepdim=True)) if self.return_features else out


# ------------------------------------------------------------------ schedules


def test_linear_schedule_endpoints_and_monotone():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.all(np.diff(betas) > 0)
    # scaled for other lengths: T = 250 covers [4e-4, 0.08]
    short = get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_alpha_bar_matches_closed_form():
    steps = 100
    betas = get_named_beta_schedule("cosine", steps)
    abar, _ = _np_schedule(betas)

    def f(s):
        return math.cos((s / steps + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = np.array([f(t + 1) / f(0) for t in range(steps)])
    # the last beta is capped at 0.999 (alpha_bar(1) = 0), all others are exact
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-10, atol=1e-14)
    assert betas[-1] == pytest.approx(0.999)
    assert np.all(np.diff(betas) > 0)


def test_betas_for_alpha_bar_cap():
    betas = betas_for_alpha_bar(4, lambda s: 1.0 - s, max_beta=0.9)
    # 1 - (1 - 1/4), 1 - (2/4)/(3/4), 1 - (1/4)/(2/4), 1 - 0 -> capped
    np.testing.assert_allclose(betas, [0.25, 1 / 3, 0.5, 0.9])


def test_unknown_schedule_and_bad_lengths_raise():
    with pytest.raises(ValueError, match="quadratic"):
        get_named_beta_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="positive integer"):
        get_named_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="beta_end"):
        get_named_beta_schedule("linear", 10)


# ------------------------------------------------------------------ respacing


def test_space_timesteps_sections_and_ddim():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and min(kept) == 0 and max(kept) == 999
    # the paper's timesteps 5, 50, 100 of the 250-step schedule are original 20, 201, 401
    ordered = sorted(kept)
    assert [ordered[5], ordered[50], ordered[100]] == [20, 201, 401]
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(10, "10") == set(range(10))


@pytest.mark.parametrize("spec", ["ddim999", "abc", "2000", "ddimx", ""])
def test_space_timesteps_bad_spec_raises(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,20,5"])
def test_respaced_alpha_bars_equal_original_at_kept_steps(spec):
    betas = get_named_beta_schedule("linear", 1000)
    new_betas, timestep_map = respace_betas(betas, space_timesteps(1000, spec))
    abar, _ = _np_schedule(betas)
    new_abar, _ = _np_schedule(new_betas)
    np.testing.assert_allclose(new_abar, abar[timestep_map], rtol=1e-12)
    assert np.all(np.diff(timestep_map) > 0)

    spaced = GaussianDiffusion.from_config(timestep_respacing=spec)
    np.testing.assert_allclose(spaced.alphas_cumprod, abar[timestep_map], rtol=1e-12)
    np.testing.assert_array_equal(spaced.timestep_map, timestep_map)


def test_respaced_q_sample_matches_original_at_mapped_step():
    full = GaussianDiffusion.from_config()
    spaced = GaussianDiffusion.from_config(timestep_respacing="250")
    x0, eps = _x0_and_eps()
    t = torch.tensor([5, 100])
    torch.testing.assert_close(
        spaced.q_sample(x0, t, eps), full.q_sample(x0, spaced.model_timesteps(t), eps), rtol=1e-12, atol=1e-12
    )


def test_respaced_diffusion_calls_model_with_original_timesteps():
    spaced = GaussianDiffusion.from_config(timestep_respacing="250")
    model = TinyConvNet().double()
    x0, eps = _x0_and_eps()
    t = torch.tensor([5, 100])
    spaced.p_mean_variance(model, x0, t)
    spaced.training_losses(model, x0, t, noise=eps)
    spaced.vb_terms_bpd(model, x0, x0, t)
    for seen in model.seen_timesteps:
        assert seen.tolist() == [20, 401]
    unspaced = GaussianDiffusion.from_config()
    assert unspaced.model_timesteps(t) is t


# ------------------------------------------------------------------ forward process


def test_q_sample_with_fixed_noise_is_closed_form():
    diffusion = GaussianDiffusion.from_config()
    x0, eps = _x0_and_eps()
    t = torch.tensor([0, 999])
    abar, _ = _np_schedule(get_named_beta_schedule("linear", 1000))
    got = diffusion.q_sample(x0, t, noise=eps).numpy()
    for i, step in enumerate(t.tolist()):
        expected = math.sqrt(abar[step]) * x0[i].numpy() + math.sqrt(1 - abar[step]) * eps[i].numpy()
        np.testing.assert_allclose(got[i], expected, rtol=1e-12, atol=1e-14)
    mean, variance, log_variance = diffusion.q_mean_variance(x0, t)
    assert mean.shape == variance.shape == log_variance.shape == x0.shape
    np.testing.assert_allclose(variance[:, 0, 0, 0].numpy(), 1 - abar[[0, 999]], rtol=1e-12)
    torch.testing.assert_close(log_variance, variance.log())


def test_q_sample_statistics():
    diffusion = GaussianDiffusion.from_config(steps=100)
    n = 40000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    t = torch.full((n,), 30)
    torch.manual_seed(0)
    samples = diffusion.q_sample(x0, t).flatten()
    abar = diffusion.alphas_cumprod[30]
    expected_mean, expected_var = math.sqrt(abar) * 0.7, 1 - abar
    standard_error = math.sqrt(expected_var / n)
    assert abs(samples.mean().item() - expected_mean) < 5 * standard_error
    assert samples.var().item() == pytest.approx(expected_var, rel=0.03)


def test_q_posterior_matches_bayes_on_two_gaussians():
    diffusion = GaussianDiffusion.from_config()
    betas = get_named_beta_schedule("linear", 1000)
    _, abar_prev = _np_schedule(betas)
    x0, xt = _x0_and_eps(batch=4)
    t = torch.tensor([0, 1, 37, 999])
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, xt, t)
    _, var_at_1 = _bayes_posterior(np.zeros(1), np.zeros(1), betas[1], abar_prev[1])
    for i, step in enumerate(t.tolist()):
        expected_mean, expected_var = _bayes_posterior(x0[i].numpy(), xt[i].numpy(), betas[step], abar_prev[step])
        np.testing.assert_allclose(mean[i].numpy(), expected_mean, rtol=1e-9, atol=1e-12)
        assert variance[i, 0, 0, 0].item() == pytest.approx(expected_var, rel=1e-9, abs=1e-20)
        # the log variance is clipped at t = 0 (variance 0) to the value at t = 1
        expected_log = math.log(var_at_1) if step == 0 else math.log(expected_var)
        assert log_variance[i, 0, 0, 0].item() == pytest.approx(expected_log, rel=1e-9)


# ------------------------------------------------------------------ likelihood helpers


def test_normal_kl_zero_and_closed_form():
    mean = torch.randn(5, dtype=torch.float64)
    logvar = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(5, dtype=torch.float64))
    # KL(N(0, 1) || N(1, 2)) = log(sqrt 2) + (1 + 1) / (2 * 2) - 1/2 = 0.5 log 2
    kl = normal_kl(torch.tensor(0.0, dtype=torch.float64), 0.0, 1.0, math.log(2.0))
    assert kl.item() == pytest.approx(0.5 * math.log(2.0), rel=1e-12)
    # KL(N(1, 4) || N(-1, 1)) = log(1/2) + (4 + 4) / 2 - 1/2
    kl = normal_kl(torch.tensor(1.0, dtype=torch.float64), math.log(4.0), -1.0, 0.0)
    assert kl.item() == pytest.approx(math.log(0.5) + 4.0 - 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="torch.Tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_cdf_close_to_erf():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max().item() < 1e-3


@pytest.mark.parametrize("mean, scale", [(0.0, 0.1), (0.3, 0.02), (-0.9, 0.5), (1.0, 0.004)])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, scale):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(
        x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, math.log(scale))
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    if scale < 0.1:  # (wider Gaussians put more mass in the open-ended edge bins)
        assert log_p.argmax().item() == int(round((mean + 1) / 2 * 255))
    with pytest.raises(ValueError, match="share a shape"):
        discretized_gaussian_log_likelihood(x, means=x[:3], log_scales=x)


def test_mean_flat():
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))


# ------------------------------------------------------------------ reverse step


def _oracle_output(diffusion, eps, v):
    return torch.cat([eps, torch.full_like(eps, v)], dim=1)


def test_perfect_oracle_recovers_x0_and_zero_kl():
    diffusion = GaussianDiffusion.from_config()
    x0, eps = _x0_and_eps(batch=3)
    t = torch.tensor([1, 250, 999])
    xt = diffusion.q_sample(x0, t, eps)
    output = _oracle_output(diffusion, eps, -1.0)  # v = -1: the posterior variance
    out = diffusion.p_mean_variance_from_output(output, xt, t, clip_denoised=True)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-9)
    true_mean, true_var, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(out["mean"], true_mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(out["variance"], true_var, rtol=1e-9, atol=0)
    kl = diffusion.kl_map(output, x0, xt, t)
    assert kl.shape == x0.shape
    assert kl.abs().max().item() < 1e-9
    # the same through a model callable, which may return (output, features)
    model = lambda x, steps: (output, "features")  # noqa: E731
    via_model = diffusion.p_mean_variance(model, xt, t)
    for key in out:
        torch.testing.assert_close(via_model[key], out[key])


def test_kl_map_is_positive_for_a_wrong_model_and_decoder_nll_at_t0():
    diffusion = GaussianDiffusion.from_config()
    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([0, 10])
    xt = diffusion.q_sample(x0, t, eps)
    output = _oracle_output(diffusion, eps + 0.5, 0.0)
    kl = diffusion.kl_map(output, x0, xt, t)
    assert torch.all(kl > 0)
    # t = 0: per-element decoder NLL in bits
    out = diffusion.p_mean_variance_from_output(output, xt, t)
    log_likelihood = discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
    nll = -log_likelihood / math.log(2)
    torch.testing.assert_close(kl[0], nll[0])
    vb = diffusion.vb_terms_bpd_from_output(output, x0, xt, t)
    torch.testing.assert_close(vb["output"], mean_flat(kl))


def test_learned_range_endpoints():
    diffusion = GaussianDiffusion.from_config()
    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([0, 500])
    xt = diffusion.q_sample(x0, t, eps)
    betas = get_named_beta_schedule("linear", 1000)
    _, abar_prev = _np_schedule(betas)
    _, var_at_1 = _bayes_posterior(np.zeros(1), np.zeros(1), betas[1], abar_prev[1])
    _, var_at_500 = _bayes_posterior(np.zeros(1), np.zeros(1), betas[500], abar_prev[500])
    high = diffusion.p_mean_variance_from_output(_oracle_output(diffusion, eps, 1.0), xt, t)["log_variance"]
    low = diffusion.p_mean_variance_from_output(_oracle_output(diffusion, eps, -1.0), xt, t)["log_variance"]
    mid = diffusion.p_mean_variance_from_output(_oracle_output(diffusion, eps, 0.0), xt, t)["log_variance"]
    np.testing.assert_allclose(high[:, 0, 0, 0].numpy(), np.log(betas[[0, 500]]), rtol=1e-12)
    np.testing.assert_allclose(low[:, 0, 0, 0].numpy(), np.log([var_at_1, var_at_500]), rtol=1e-9)
    torch.testing.assert_close(mid, (high + low) / 2)


def test_fixed_variances():
    betas = get_named_beta_schedule("linear", 1000)
    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([0, 500])
    small = GaussianDiffusion(betas, learn_sigma=False)
    assert small.model_var_type == ModelVarType.FIXED_SMALL
    out = small.p_mean_variance_from_output(eps, x0, t)
    torch.testing.assert_close(out["variance"], small.q_posterior_mean_variance(x0, x0, t)[1])
    large = GaussianDiffusion(betas, model_var_type=ModelVarType.FIXED_LARGE)
    out = large.p_mean_variance_from_output(eps, x0, t)
    # beta_t, except the posterior variance at t = 0
    assert out["variance"][1, 0, 0, 0].item() == pytest.approx(betas[500])
    assert out["variance"][0, 0, 0, 0].item() == pytest.approx(small.posterior_variance[1])


def test_start_x_and_previous_x_oracles():
    betas = get_named_beta_schedule("linear", 1000)
    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([3, 700])
    start = GaussianDiffusion(betas, model_mean_type=ModelMeanType.START_X, learn_sigma=False)
    xt = start.q_sample(x0, t, eps)
    torch.testing.assert_close(start.p_mean_variance_from_output(x0, xt, t)["pred_xstart"], x0)
    previous = GaussianDiffusion(betas, model_mean_type=ModelMeanType.PREVIOUS_X, learn_sigma=False)
    true_mean = previous.q_posterior_mean_variance(x0, xt, t)[0]
    out = previous.p_mean_variance_from_output(true_mean, xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-8)
    torch.testing.assert_close(out["mean"], true_mean)


def test_learned_variance_log_directly():
    betas = get_named_beta_schedule("linear", 100)
    diffusion = GaussianDiffusion(betas, model_var_type=ModelVarType.LEARNED)
    x0, eps = _x0_and_eps(batch=2)
    out = diffusion.p_mean_variance_from_output(torch.cat([eps, torch.full_like(eps, -3.0)], 1), x0, 4)
    torch.testing.assert_close(out["variance"], torch.full_like(x0, math.exp(-3.0)))


def test_eps_and_xstart_predictions_invert_each_other():
    diffusion = GaussianDiffusion.from_config()
    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([17, 880])
    xt = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion._predict_xstart_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(diffusion._predict_eps_from_xstart(xt, t, x0), eps)


# ------------------------------------------------------------------ golden values


def test_golden_values():
    diffusion = GaussianDiffusion.from_config()
    # alpha-bar at the last step and the posterior variance at t = 1, computed once
    assert diffusion.alphas_cumprod[-1] == pytest.approx(4.035829765375676e-05, rel=1e-9)
    assert diffusion.posterior_variance[1] == pytest.approx(5.4531876613021935e-05, rel=1e-9)
    # ... and derived independently: beta_1 beta_0 / (1 - (1 - beta_0)(1 - beta_1))
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    assert diffusion.posterior_variance[1] == pytest.approx(b1 * b0 / (1 - (1 - b0) * (1 - b1)), rel=1e-12)
    assert diffusion.alphas_cumprod[-1] == pytest.approx(
        math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000)), rel=1e-12
    )

    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([10, 500])
    xt = diffusion.q_sample(x0, t, eps)
    assert xt.sum(dim=(1, 2, 3)).tolist() == pytest.approx([-6.932700189790177, 10.552665697245748], abs=1e-6)

    output = torch.cat([0.5 * eps.flip(0), torch.zeros_like(eps)], dim=1)  # v = 0: geometric mean variance
    kl = diffusion.kl_map(output, x0, xt, t).mean(dim=(1, 2, 3))
    assert kl.tolist() == pytest.approx([0.13246039786368843, 0.0002524116715953422], abs=1e-6)

    # the KL for sample 0 derived independently in numpy
    betas = get_named_beta_schedule("linear", 1000)
    abar, abar_prev = _np_schedule(betas)
    step, x0_np, xt_np, eps_hat = 10, x0[0].numpy(), xt[0].numpy(), 0.5 * eps[1].numpy()
    pred_x0 = np.clip((xt_np - math.sqrt(1 - abar[step]) * eps_hat) / math.sqrt(abar[step]), -1, 1)
    model_mean, post_var = _bayes_posterior(pred_x0, xt_np, betas[step], abar_prev[step])
    true_mean, _ = _bayes_posterior(x0_np, xt_np, betas[step], abar_prev[step])
    model_var = math.sqrt(post_var * betas[step])
    kl_nats = 0.5 * math.log(model_var / post_var) + (post_var + (true_mean - model_mean) ** 2) / (2 * model_var) - 0.5
    assert kl[0].item() == pytest.approx(float(np.mean(kl_nats)) / math.log(2), rel=1e-9)

    losses = diffusion.training_losses_from_output(output, x0, xt, t, eps)
    assert losses["mse"].tolist() == pytest.approx([1.428757088846881] * 2, abs=1e-6)
    # mse: mean of (eps - eps.flip(0) / 2)^2, derived by hand
    expected_mse = ((eps - 0.5 * eps.flip(0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], expected_mse)


# ------------------------------------------------------------------ training losses


def test_training_losses_on_tiny_conv_model():
    diffusion = GaussianDiffusion.from_config(steps=100)
    model = TinyConvNet()
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 50, 99])
    losses = diffusion.training_losses(model, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"}
    for value in losses.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    with torch.no_grad():
        output = model(diffusion.q_sample(x0, t, noise), t)
    torch.testing.assert_close(losses["mse"], mean_flat((noise - output[:, :3]) ** 2))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # vb is rescaled by num_timesteps / 1000 and uses the unclipped x0 prediction
    raw_vb = diffusion.vb_terms_bpd_from_output(output, x0, diffusion.q_sample(x0, t, noise), t, clip_denoised=False)
    torch.testing.assert_close(losses["vb"], raw_vb["output"] * 0.1)
    # a model returning (output, features) gives the same losses
    with_features = TinyConvNet(return_features=True)
    for key, value in diffusion.training_losses(with_features, x0, t, noise=noise).items():
        torch.testing.assert_close(value, losses[key])
    losses["loss"].mean().backward()
    assert model.conv.weight.grad is not None and torch.isfinite(model.conv.weight.grad).all()


def test_hybrid_loss_detaches_the_mean_in_vb():
    diffusion = GaussianDiffusion.from_config(steps=100)
    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([5, 60])
    xt = diffusion.q_sample(x0, t, eps)
    output = torch.cat([eps + 0.3, torch.full_like(eps, 0.2)], dim=1).requires_grad_(True)
    losses = diffusion.training_losses_from_output(output, x0, xt, t, eps)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert torch.all(grad_vb[:, :3] == 0)
    assert grad_vb[:, 3:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert torch.all(grad_mse[:, 3:] == 0)
    torch.testing.assert_close(grad_mse[:, :3], 2 * 0.3 * torch.ones_like(eps) / 12)


def test_other_loss_types():
    betas = get_named_beta_schedule("linear", 100)
    x0, eps = _x0_and_eps(batch=2)
    t = torch.tensor([5, 60])
    output = torch.cat([eps + 0.3, torch.full_like(eps, 0.2)], dim=1)
    kl = GaussianDiffusion(betas, loss_type=LossType.KL)
    xt = kl.q_sample(x0, t, eps)
    kl_losses = kl.training_losses_from_output(output, x0, xt, t, eps)
    assert set(kl_losses) == {"loss"}
    rescaled_kl = GaussianDiffusion(betas, loss_type=LossType.RESCALED_KL)
    rescaled = rescaled_kl.training_losses_from_output(output, x0, xt, t, eps)
    torch.testing.assert_close(rescaled["loss"], 100 * kl_losses["loss"])
    fixed = GaussianDiffusion(betas, loss_type=LossType.MSE, learn_sigma=False)
    fixed_losses = fixed.training_losses_from_output(eps + 0.3, x0, xt, t, eps)
    assert set(fixed_losses) == {"loss", "mse"}
    torch.testing.assert_close(fixed_losses["loss"], torch.full((2,), 0.09, dtype=torch.float64))
    start = GaussianDiffusion(betas, model_mean_type=ModelMeanType.START_X, learn_sigma=False, loss_type=LossType.MSE)
    perfect = start.training_losses_from_output(x0, x0, xt, t, eps)["loss"]
    torch.testing.assert_close(perfect, torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------ sampling


def test_sampling_is_deterministic_given_a_seed():
    diffusion = GaussianDiffusion.from_config(steps=100, timestep_respacing="10")
    model = TinyConvNet()
    shape = (2, 3, 8, 8)
    torch.manual_seed(123)
    first = diffusion.p_sample_loop(model, shape)
    torch.manual_seed(123)
    second = diffusion.p_sample_loop(model, shape)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    a = diffusion.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(7))
    b = diffusion.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(7))
    c = diffusion.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert a.shape == shape and torch.isfinite(a).all()
    steps = list(diffusion.p_sample_loop_progressive(model, shape, generator=torch.Generator().manual_seed(7)))
    assert len(steps) == 10
    torch.testing.assert_close(steps[-1]["sample"], a, rtol=0, atol=0)
    # the respaced loop called the model with original timesteps, last to first
    called = [int(s[0]) for s in model.seen_timesteps[-10:]]
    assert called == sorted(diffusion.timestep_map.tolist(), reverse=True)


def test_ddim_eta0_is_deterministic_regardless_of_noise_seed():
    diffusion = GaussianDiffusion.from_config(steps=100, timestep_respacing="ddim10")
    model = TinyConvNet()
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = diffusion.ddim_sample_loop(model, start.shape, noise=start, generator=torch.Generator().manual_seed(1))
    b = diffusion.ddim_sample_loop(model, start.shape, noise=start, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = diffusion.ddim_sample_loop(model, start.shape, noise=start, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = diffusion.ddim_sample_loop(model, start.shape, noise=start, eta=1.0, generator=torch.Generator().manual_seed(1))
    e = diffusion.ddim_sample_loop(model, start.shape, noise=start, eta=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert not torch.allclose(c, e)


def test_loops_end_on_a_constant_x0_prediction():
    """A START_X model that always predicts c: the last step (t = 0) of both loops returns c exactly."""
    betas = get_named_beta_schedule("linear", 50)
    diffusion = GaussianDiffusion(betas, model_mean_type=ModelMeanType.START_X, learn_sigma=False)
    constant = torch.linspace(-0.8, 0.8, 3).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    model = lambda x, t: constant.clone()  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(diffusion.p_sample_loop(model, (2, 3, 4, 4), generator=gen), constant)
    torch.testing.assert_close(diffusion.ddim_sample_loop(model, (2, 3, 4, 4), generator=gen), constant)


def test_p_sample_adds_no_noise_at_t0():
    diffusion = GaussianDiffusion.from_config(steps=100)
    model = TinyConvNet()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 0])
    a = diffusion.p_sample(model, x, t, generator=torch.Generator().manual_seed(1))["sample"]
    b = diffusion.p_sample(model, x, t, generator=torch.Generator().manual_seed(2))["sample"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, diffusion.p_mean_variance(model, x, t)["mean"])


# ------------------------------------------------------------------ construction and errors


def test_constructors():
    betas = get_named_beta_schedule("linear", 100)
    assert GaussianDiffusion(betas).model_var_type == ModelVarType.LEARNED_RANGE
    assert GaussianDiffusion(betas, learn_sigma=True).model_var_type == ModelVarType.LEARNED_RANGE
    assert GaussianDiffusion(betas, learn_sigma=False).model_var_type == ModelVarType.FIXED_SMALL
    with pytest.raises(ValueError, match="contradicts"):
        GaussianDiffusion(betas, model_var_type=ModelVarType.FIXED_LARGE, learn_sigma=True)
    default = create_diffusion()
    assert default.num_timesteps == 1000 and default.timestep_map is None
    assert default.loss_type == LossType.RESCALED_MSE and default.model_mean_type == ModelMeanType.EPSILON
    assert create_diffusion(learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert create_diffusion(learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert create_diffusion(use_kl=True).loss_type == LossType.RESCALED_KL
    assert create_diffusion(predict_xstart=True).model_mean_type == ModelMeanType.START_X
    assert create_diffusion(noise_schedule="cosine", timestep_respacing="ddim25").num_timesteps == 25
    assert "original steps 0..999" in repr(create_diffusion(timestep_respacing="250"))


def test_bad_inputs_raise_clear_errors():
    diffusion = GaussianDiffusion.from_config(steps=100)
    x0, eps = _x0_and_eps(batch=2)
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        diffusion.q_sample(x0, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="shape"):
        diffusion.q_sample(x0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        diffusion.q_sample(x0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape mismatch"):
        diffusion.q_sample(x0, 3, noise=eps[:1])
    with pytest.raises(ValueError, match="model output has shape"):
        diffusion.p_mean_variance_from_output(eps, x0, 3)  # 3 channels, 6 expected
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion([0.1, 1.5])
    with pytest.raises(ValueError, match="timestep_map"):
        GaussianDiffusion([0.1, 0.2], timestep_map=[3, 1])
    with pytest.raises(ValueError, match="use_timesteps"):
        respace_betas([0.1, 0.2], [5])
    # an int timestep is broadcast over the batch
    torch.testing.assert_close(diffusion.q_sample(x0, 7, eps), diffusion.q_sample(x0, torch.tensor([7, 7]), eps))


def test_float32_inputs_stay_float32():
    diffusion = GaussianDiffusion.from_config(steps=100)
    x0, eps = _x0_and_eps(batch=2, dtype=torch.float32)
    t = torch.tensor([3, 90])
    xt = diffusion.q_sample(x0, t, eps)
    assert xt.dtype == torch.float32
    out = diffusion.p_mean_variance_from_output(torch.cat([eps, torch.zeros_like(eps)], 1), xt, t)
    assert all(value.dtype == torch.float32 for value in out.values())
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-4)
