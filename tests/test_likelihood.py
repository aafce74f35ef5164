"""Bits/dim and the objectives against float64 NumPy written from the papers' formulas.

Reference formulas (independent of `ddpm_jax`): the Gaussian KL, Ho et al.'s discretised
Gaussian decoder for 8-bit data, the DDPM posterior, and for Gaussian data N(mu, s^2) with its
exact denoiser the expected value of every term of the bound in closed form (the decoder's
by Monte Carlo in float64).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import evaluate, recipe, runs, sample, train
from ddpm_jax.core import diffusion, likelihood, objectives
from ddpm_jax.runtime import network
from tests.helpers import micro_config


def gaussian_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) = log(s2 / s1) + (v1 + (m1 - m2)^2) / (2 v2) - 1/2."""
    return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def cdf(x):  # Ho et al.'s tanh approximation of the standard normal CDF
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def decoder_log_prob(x, mean, std):
    """log of the Gaussian's mass in x's 8-bit bin [x - 1/255, x + 1/255]; the edge bins
    at -1 and 1 extend to -inf and +inf."""
    upper, lower = cdf((x - mean + 1 / 255) / std), cdf((x - mean - 1 / 255) / std)
    mass = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    return np.log(np.maximum(mass, 1e-12))


def schedule64(T):
    betas = np.linspace(1e-4, 0.02, T) if T == 1000 else np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return betas, abar, abar_prev, post_var


def test_normal_kl_and_the_decoder_match_the_formulas():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    lv1, lv2 = rng.normal(size=50), rng.normal(size=50)
    np.testing.assert_allclose(likelihood.normal_kl(m1, lv1, m2, lv2),
                               gaussian_kl(m1, np.exp(lv1), m2, np.exp(lv2)), rtol=1e-5)
    levels = np.array([0, 1, 2, 127, 128, 253, 254, 255]) / 127.5 - 1  # both edges included
    x = np.repeat(levels, 3)
    mean = x + np.tile([-0.01, 0.003, 0.02], len(levels))  # near, so every bin has mass
    std = np.tile([0.01, 0.004, 0.3], len(levels))
    got = likelihood.discretized_gaussian_log_likelihood(
        jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32),
        jnp.asarray(np.log(std), jnp.float32))
    want = decoder_log_prob(x, mean, std)
    # float32 resolves masses down to about 1e-6 (a CDF difference of values near 1); below
    # that both sides only need to say "tiny".
    resolved = want > np.log(1e-5)
    assert resolved.sum() >= 20
    np.testing.assert_allclose(np.asarray(got)[resolved], want[resolved], rtol=2e-4, atol=2e-5)
    assert np.all(np.asarray(got)[~resolved] < np.log(1e-4))
    # The edge bins hold all the mass beyond them: a mean far outside still scores ~0.
    far = likelihood.discretized_gaussian_log_likelihood(jnp.array([1.0, -1.0]),
                                                         jnp.array([3.0, -3.0]), jnp.log(0.1))
    np.testing.assert_allclose(far, 0.0, atol=1e-6)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_vb_terms_of_a_fixed_denoiser_match_the_posterior_formulas(variance):
    T = 1000
    betas, abar, abar_prev, post_var = schedule64(T)
    schedule = diffusion.make_schedule("linear", T)
    rng = np.random.default_rng(1)
    x0 = np.clip(rng.normal(0.2, 0.5, (3, 4, 4, 3)), -1, 1)
    x0 = np.round((x0 + 1) * 127.5) / 127.5 - 1  # 8-bit values
    noise = rng.normal(size=x0.shape)
    for t in (0, 1, 10, 500, 999):
        x_t = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noise
        eps_hat = 0.5 * x_t  # a fixed "network"
        x0_hat = (x_t - np.sqrt(1 - abar[t]) * eps_hat) / np.sqrt(abar[t])
        c1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
        c2 = (1 - abar_prev[t]) * np.sqrt(1 - betas[t]) / (1 - abar[t])
        model_mean = c1 * x0_hat + c2 * x_t
        clipped_post = post_var[1] if t == 0 else post_var[t]
        model_var = clipped_post if (variance == "fixed_small" or t == 0) else betas[t]
        if t == 0:
            want = -decoder_log_prob(x0, model_mean, np.sqrt(model_var)).mean(axis=(1, 2, 3))
        else:
            true_mean = c1 * x0 + c2 * x_t
            want = gaussian_kl(true_mean, post_var[t], model_mean, model_var).mean(axis=(1, 2, 3))
        got = likelihood.vb_term_bpd(
            schedule, jnp.asarray(eps_hat, jnp.float32), jnp.asarray(x0, jnp.float32),
            jnp.asarray(x_t, jnp.float32), jnp.full((3,), t), prediction="eps",
            variance=variance, clip_x0=False)
        np.testing.assert_allclose(got, want / math.log(2), rtol=2e-3, atol=1e-5)


def expected_bits_per_dim(mu, s, T, variance):
    """E[bound] in bits/dim for data N(mu, s^2) with the exact denoiser, float64: closed forms
    for the prior and every KL term, Monte Carlo (10^6 draws) for the decoder."""
    betas, abar, abar_prev, post_var = schedule64(T)
    prior = 0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * (mu**2 + s**2))
    total = prior
    for t in range(1, T):
        c1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
        x0_var_given_xt = s**2 * (1 - abar[t]) / (abar[t] * s**2 + 1 - abar[t])
        model_var = post_var[t] if variance == "fixed_small" else betas[t]
        total += (0.5 * (np.log(model_var / post_var[t]) + post_var[t] / model_var - 1)
                  + c1**2 * x0_var_given_xt / (2 * model_var))
    rng = np.random.default_rng(0)
    x0 = rng.normal(mu, s, 10**6)
    x_0 = np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * rng.normal(size=x0.size)
    gain = np.sqrt(abar[0]) * s**2 / (abar[0] * s**2 + 1 - abar[0])
    x0_hat = mu + gain * (x_0 - np.sqrt(abar[0]) * mu)
    c1 = betas[0] * np.sqrt(abar_prev[0]) / (1 - abar[0])
    c2 = (1 - abar_prev[0]) * np.sqrt(1 - betas[0]) / (1 - abar[0])
    decoder = -decoder_log_prob(x0, c1 * x0_hat + c2 * x_0, np.sqrt(post_var[1])).mean()
    return (total + decoder) / math.log(2)


def test_bits_per_dim_of_gaussian_data_with_the_exact_denoiser():
    mu, s, T = 0.1, 0.3, 1000
    schedule = diffusion.make_schedule("linear", T)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4096, 8)) * s + mu
    got = jax.jit(lambda x, r: likelihood.bits_per_dim(
        diffusion.optimal_gaussian_eps(schedule, mu, s), schedule, x, r, prediction="eps",
        variance="fixed_small", clip_x0=False))(x0, jax.random.PRNGKey(1))
    want = expected_bits_per_dim(mu, s, T, "fixed_small")
    assert float(jnp.mean(got["total"])) == pytest.approx(want, rel=0.01)
    assert got["terms"].shape == (T, 4096)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_min_snr_weight_is_the_same_weight_on_every_target(prediction):
    """min(SNR, gamma) / SNR on the eps loss; the same per-t weight of the x0 error whatever
    the target (x0 error = eps error / sqrt(SNR); v error^2 = (1 + SNR) x0 error^2)."""
    schedule = diffusion.make_schedule("linear", 1000)
    t = jnp.array([0, 100, 500, 999])
    snr = np.asarray(schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t]))
    factor = {"eps": snr, "x0": np.ones(4), "v": snr + 1}[prediction]
    weight = objectives.min_snr_weight(schedule, t, prediction, 5.0) * factor
    np.testing.assert_allclose(weight, np.minimum(snr, 5.0), rtol=1e-5)


def learned_config():
    config = micro_config()
    config.diffusion.variance = "learned_range"
    config.diffusion.loss_weighting = "min_snr"
    config.diffusion.num_timesteps = 20
    config.learning_rate, config.warmup_steps, config.batch_size = 2e-3, 1, 8
    return config


def test_min_snr_weighting_scales_each_examples_loss():
    schedule = diffusion.make_schedule("linear", 1000)
    rng = np.random.default_rng(0)
    x0, noise, output = (jnp.asarray(rng.normal(size=(4, 4, 4, 3)), jnp.float32)
                         for _ in range(3))
    t = jnp.array([0, 10, 300, 999])
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    config = micro_config()
    plain, _ = objectives.loss_terms(schedule, output, x0, x_t, t, noise, config.diffusion)
    config.diffusion.loss_weighting = "min_snr"
    weighted, _ = objectives.loss_terms(schedule, output, x0, x_t, t, noise, config.diffusion)
    weight = objectives.min_snr_weight(schedule, t, "eps", 5.0)
    np.testing.assert_allclose(weighted, plain * weight, rtol=1e-6)
    assert float(weight[0]) < 0.01 and float(weight[-1]) == pytest.approx(1.0)


@pytest.mark.slow
def test_learned_variances_with_min_snr_train_sample_and_give_a_bound(tmp_path, monkeypatch):
    """A tiny net with learned variances and min-SNR weighting: the L_vlb term falls, the
    loss falls, and the saved run samples (all T and respaced) and has a bound, the same
    whether its T terms are computed in one call or a chunk of timesteps at a time, with
    the progress bar moving after each chunk."""
    from ddpm_jax import checkpointing

    config = learned_config()
    mesh = train.create_mesh(config, devices=jax.devices()[:1])
    batch = np.full((8, 8, 8, 3), 60, np.uint8)
    batch[:, 2:6] = 200
    state = train.create_train_state(config, mesh)
    assert state.params["conv_out"]["kernel"].shape[-1] == 6
    schedule, definition = recipe.schedule(config), network.graphdef(config)
    bound = jax.jit(lambda params: jnp.mean(likelihood.bits_per_dim(
        lambda x, t: network.apply(definition, params, x, t), schedule,
        jnp.asarray(batch, jnp.float32) / 127.5 - 1, jax.random.PRNGKey(0), prediction="eps",
        variance="learned_range", clip_x0=False)["terms"][1:]))  # the KL terms L_vlb sums
    initial_bound = bound(state.params)
    step_fn = train.make_train_step(config, mesh)
    metrics = []
    for _ in range(30):
        state, step_metrics = step_fn(state, train.global_batch(batch, mesh))
        metrics.append(jax.device_get(step_metrics))
    vlb = [m["vlb_bits_per_dim"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    assert np.all(np.isfinite(loss)) and np.mean(loss[-5:]) < 0.75 * np.mean(loss[:5])
    assert np.all(np.isfinite(vlb))
    assert float(bound(state.params)) < 0.8 * float(initial_bound)  # same t, noise and images

    manager = checkpointing.make_manager(tmp_path / "checkpoints", config)
    checkpointing.save(manager, 30, state, config)
    manager.wait_until_finished()
    manager.close()
    run_config, _, _, _ = runs.load_run(str(tmp_path))
    assert run_config.diffusion.variance == "learned_range"
    for steps in (0, 5):  # all T, and a respaced chain
        images, _ = sample.generate(str(tmp_path), 2, sampler="ddpm", num_steps=steps)
        assert images.shape == (2, 8, 8, 3)
    result = evaluate.nll(str(tmp_path), num_images=4, batch_size=4)
    assert result["bits_per_dim"] > 0 and len(result["terms_bpd"]) == 20
    assert result["bits_per_dim"] == pytest.approx(
        result["prior_bpd"] + result["kl_terms_bpd"] + result["decoder_bpd"], rel=1e-5)
    # One scan over all T for the same images and noise: the reference the chunks must give.
    from ddpm_jax import data_sources, input_pipeline

    source = data_sources.make_source(run_config.data)
    images = input_pipeline.evaluation_images(run_config.data, source, 4)[1](np.arange(4))
    reference = jax.jit(lambda params, x: likelihood.bits_per_dim(
        lambda x, t: network.apply(definition, params, x, t), schedule, x,
        jax.random.fold_in(jax.random.PRNGKey(0), 0), **recipe.reverse_process(run_config)))(
        state.ema_params, jnp.asarray(images, jnp.float32) / 127.5 - 1)
    assert result["bits_per_dim"] == pytest.approx(float(jnp.mean(reference["total"])), rel=1e-6)
    np.testing.assert_allclose(result["terms_bpd"], jnp.mean(reference["terms"], axis=1), rtol=1e-6)
    updates = []

    class Bar:
        update = updates.append

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(evaluate.progress_bars, "bar", lambda *args, **kwargs: Bar())
    chunked = evaluate.nll(str(tmp_path), num_images=4, batch_size=4, timesteps_per_call=6)
    assert chunked == result  # 6, 6, 6 and 2 timesteps per call: every number bitwise
    assert updates == pytest.approx([4 * 6 / 20] * 3 + [4 * 2 / 20])
    size = len(source)
    with pytest.raises(data_sources.DataError, match=rf"num_images={size + 1} is more than the "
                       rf"{size} images of the data: pass --num_images={size}, or 0 for all"):
        evaluate.nll(str(tmp_path), num_images=size + 1)
