"""The diffusion math against closed forms computed independently in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax.core import diffusion, objectives
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.schedules import BETA_SCHEDULES

T = 1000


def float64_schedule(kind):
    """Independent float64 reference of the forward-process quantities."""
    if kind == "linear":
        betas = np.linspace(1e-4, 0.02, T)
    elif kind == "quadratic":
        betas = np.linspace(1e-2, 0.02**0.5, T) ** 2
    else:
        f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])
    abar = np.array([np.prod(1 - betas[: t + 1]) for t in range(T)])
    return betas, abar


@pytest.mark.parametrize("kind", BETA_SCHEDULES.names())
def test_schedule_matches_closed_forms(kind):
    s = diffusion.make_schedule(kind, T)
    betas, abar = float64_schedule(kind)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas, 1 - betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-5)
    np.testing.assert_allclose(s.alphas_cumprod_prev, np.append(1.0, abar[:-1]), rtol=1e-5)
    post_var = betas * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    np.testing.assert_allclose(s.posterior_variance, post_var, rtol=1e-5, atol=1e-12)
    assert s.posterior_variance[0] == 0.0
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
    if kind == "cosine":
        np.testing.assert_allclose(float(s.betas.max()), min(betas.max(), 0.999), rtol=1e-6)


def test_linear_schedule_endpoints():
    s = diffusion.make_schedule("linear", T, 1e-4, 0.02)
    assert s.betas[0] == pytest.approx(1e-4)
    assert s.betas[-1] == pytest.approx(0.02)
    # Ho et al. report L_T ~ 1e-5 bits/dim: alphas_cumprod[T-1] ~ 4e-5.
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=0.01)


def gaussian_log_density(x, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


@pytest.mark.parametrize("kind", BETA_SCHEDULES.names())
def test_posterior_is_bayes_rule_of_forward_process(kind):
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), checked pointwise in float64."""
    s = diffusion.make_schedule(kind, T)
    betas, abar = float64_schedule(kind)
    rng = np.random.default_rng(0)
    for t in (1, 10, 500, 999):
        x0, xt = rng.normal(size=2)
        mean, var, _ = diffusion.q_posterior_mean_variance(
            s, jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([t])
        )
        grid = np.linspace(-3, 3, 7)
        log_joint = gaussian_log_density(xt, np.sqrt(1 - betas[t]) * grid, betas[t]) + \
            gaussian_log_density(grid, np.sqrt(abar[t - 1]) * x0, 1 - abar[t - 1])
        log_post = gaussian_log_density(grid, float(mean[0, 0]), float(var[0, 0]))
        diff = log_joint - log_post  # constant in x_{t-1} iff the posterior is right
        np.testing.assert_allclose(diff - diff.mean(), 0.0, atol=2e-3 * max(1, np.abs(log_post).max()))


def test_q_sample_statistics():
    s = diffusion.make_schedule("linear", T)
    key_noise = jax.random.PRNGKey(0)
    x0 = jnp.full((200_000, 1), 0.7)
    for t in (0, 250, 999):
        noise = jax.random.normal(jax.random.fold_in(key_noise, t), x0.shape)
        xt = diffusion.q_sample(s, x0, jnp.full((x0.shape[0],), t), noise)
        abar = float(s.alphas_cumprod[t])
        assert float(xt.mean()) == pytest.approx(np.sqrt(abar) * 0.7, abs=5e-3)
        assert float(xt.var()) == pytest.approx(1 - abar, rel=2e-2, abs=1e-5)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_prediction_targets_round_trip(prediction):
    s = diffusion.make_schedule("cosine", T)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jax.random.randint(k3, (6,), 0, T)
    xt = diffusion.q_sample(s, x0, t, noise)
    target = diffusion.prediction_target(s, prediction, x0, t, noise)
    x0_hat, eps_hat = diffusion.model_output_to_x0_eps(s, prediction, target, xt, t)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-3)


def test_losses():
    pred = jnp.array([[0.0, 2.0], [0.5, -0.5]])
    target = jnp.zeros_like(pred)
    np.testing.assert_allclose(objectives.regression_loss(pred, target, "mse"), [2.0, 0.25])
    np.testing.assert_allclose(objectives.regression_loss(pred, target, "l1"), [1.0, 0.5])
    np.testing.assert_allclose(objectives.regression_loss(pred, target, "huber"), [0.75, 0.125])
    with pytest.raises(ValueError, match="unknown loss"):
        objectives.regression_loss(pred, target, "l3")


def test_ddpm_step_is_posterior_mean_plus_scaled_noise():
    s = diffusion.make_schedule("linear", T)
    x0 = jnp.full((2, 3), 0.3)
    xt = jnp.full((2, 3), -0.4)
    t = jnp.array([5, 0])
    eps = (xt - jnp.sqrt(s.alphas_cumprod[t])[:, None] * x0) / jnp.sqrt(1 - s.alphas_cumprod[t])[:, None]
    noise = jnp.ones((2, 3))
    out = diffusion.ddpm_step(s, eps, xt, t, noise, variance="fixed_small", clip_x0=False)
    mean, var, _ = diffusion.q_posterior_mean_variance(s, x0, xt, t)
    np.testing.assert_allclose(out[0], mean[0] + jnp.sqrt(var[0]), rtol=1e-4)
    np.testing.assert_allclose(out[1], mean[1], atol=2e-4)  # t = 0 adds no noise
    large = diffusion.ddpm_step(s, eps, xt, t, noise, variance="fixed_large", clip_x0=False)
    np.testing.assert_allclose(large[0], mean[0] + jnp.sqrt(s.betas[5]), rtol=1e-4)


def test_ddim_eta_one_full_steps_equals_ddpm_posterior_sampling():
    s = diffusion.make_schedule("linear", T)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    xt = jax.random.normal(k1, (4, 8))
    out = jax.random.normal(k2, (4, 8))
    noise = jax.random.normal(k3, (4, 8))
    for t in (1, 100, 999):
        tb = jnp.full((4,), t)
        ddpm = diffusion.ddpm_step(s, out, xt, tb, noise, variance="fixed_small")
        ddim = diffusion.ddim_step(s, out, xt, tb, tb - 1, noise, 1.0)
        np.testing.assert_allclose(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_ddim_eta_zero_is_deterministic_and_exact_for_true_eps():
    s = diffusion.make_schedule("linear", T)
    x0 = jnp.full((1, 4), 0.5)
    eps = jnp.full((1, 4), -0.2)
    t, t_prev = jnp.array([600]), jnp.array([300])
    xt = diffusion.q_sample(s, x0, t, eps)
    prev = diffusion.ddim_step(s, eps, xt, t, t_prev, jnp.full((1, 4), 9.0), 0.0)
    # With the true eps, eta=0 lands on the same noise direction at t_prev.
    np.testing.assert_allclose(prev, diffusion.q_sample(s, x0, t_prev, eps), atol=1e-5)


def discretised_chain_moments(sampler, steps, eta, variance, mu, sigma):
    """Exact mean and std of the sampler's output for N(mu, sigma^2) data, in float64.

    With the oracle denoiser every step is an affine map of the current x_t (and, for the
    multistep solver, of the previous one) plus Gaussian noise, so the output is Gaussian
    with moments given by this recursion over the visited `steps`; it is written from the
    papers' update rules, independently of `diffusion.py` and `samplers/`.
    """
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    n = len(steps)
    mean = np.zeros(2)  # (x_i, x_{i-1})
    cov = np.diag([1.0, 0.0])
    gains, offsets = [], []
    for i, t in enumerate(steps):
        a = abar[t]
        ap = abar[steps[i + 1]] if i + 1 < n else 1.0
        var_t = a * sigma**2 + 1 - a
        gains.append(np.sqrt(a) * sigma**2 / var_t)  # x0_hat = gain0 * x + offset0
        offsets.append(mu * (1 - a * sigma**2 / var_t))
        gain0, offset0 = gains[-1], offsets[-1]
        gain_prev, added = 0.0, 0.0
        if sampler == "ddpm":  # the (respaced) chain's posterior, Nichol & Dhariwal eq. 19-20
            beta = 1 - a / ap
            c1 = beta * np.sqrt(ap) / (1 - a)
            c2 = (1 - ap) * np.sqrt(1 - beta) / (1 - a)
            gain, offset = c1 * gain0 + c2, c1 * offset0
            post = beta * (1 - ap) / (1 - a)
            added = 0.0 if i + 1 == n else (post if variance == "fixed_small" else beta)
        elif sampler == "ddim":
            sig = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
            d = np.sqrt(1 - ap - sig**2) / np.sqrt(1 - a)
            gain = np.sqrt(ap) * gain0 + d * (1 - np.sqrt(a) * gain0)
            offset = np.sqrt(ap) * offset0 - d * np.sqrt(a) * offset0
            added = sig**2
        else:  # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2
            lam = lambda abar_t: 0.5 * np.log(abar_t / (1 - abar_t))  # noqa: E731
            if i + 1 == n:  # to the clean image: x = the data prediction
                gain, offset = gain0, offset0
            else:
                h = lam(ap) - lam(a)
                cx = np.sqrt((1 - ap) / (1 - a))
                c0 = -np.sqrt(ap) * (np.exp(-h) - 1)
                w = 0.0 if i == 0 else 1 / (2 * (lam(a) - lam(abar[steps[i - 1]])) / h)
                gain = cx + c0 * (1 + w) * gain0
                offset = c0 * (1 + w) * offset0 - c0 * w * offsets[i - 1] * (i > 0)
                gain_prev = -c0 * w * (gains[i - 1] if i else 0.0)
        transform = np.array([[gain, gain_prev], [1.0, 0.0]])
        mean = transform @ mean + np.array([offset, 0.0])
        cov = transform @ cov @ transform.T + np.diag([added, 0.0])
    return mean[0], np.sqrt(cov[0, 0])


SAMPLER_CASES = [  # sampler, network calls, spacing, eta, variance
    ("ddpm", None, "auto", 0.0, "fixed_small"), ("ddpm", None, "auto", 0.0, "fixed_large"),
    ("ddpm", 50, "trailing", 0.0, "fixed_small"), ("ddpm", 20, "linspace", 0.0, "fixed_large"),
    ("ddim", 1000, "auto", 0.0, "fixed_small"), ("ddim", 50, "auto", 0.0, "fixed_small"),
    ("ddim", 10, "auto", 0.0, "fixed_small"), ("ddim", 50, "auto", 1.0, "fixed_small"),
    ("ddim", 10, "leading", 0.0, "fixed_small"),
    ("dpm_solver++", 10, "auto", 0.0, "fixed_small"),
    ("dpm_solver++", 20, "trailing", 0.0, "fixed_small"),
    ("dpm_solver++", 20, "linspace", 0.0, "fixed_small"),
]


def test_ddpms_auto_variance_is_the_posteriors_on_a_respaced_chain_only():
    """`sample.variance="auto"`: a fixed_large model sampled over 20 of 1000 steps gets the
    fixed_small chain (its exact moments), over all 1000 its own rule; named rules and a
    learned variance are kept."""
    assert samplers.sampling_variance("auto", "fixed_large", 20, 1000) == "fixed_small"
    assert samplers.sampling_variance("auto", "fixed_large", 1000, 1000) == "fixed_large"
    assert samplers.sampling_variance("auto", "learned_range", 20, 1000) == "learned_range"
    assert samplers.sampling_variance("fixed_large", "fixed_small", 20, 1000) == "fixed_large"
    s = diffusion.make_schedule("linear", T)
    mu, sigma = 0.3, 0.5
    run = jax.jit(lambda rng: samplers.sample(
        diffusion.optimal_gaussian_eps(s, mu, sigma), s, (4096, 8), rng, sampler="ddpm",
        num_steps=20, variance="fixed_large", clip_x0=False, spacing="linspace"))
    x = np.asarray(run(jax.random.PRNGKey(3)))
    steps = samplers.sampling_timesteps(s, "ddpm", 20, "linspace")
    small = discretised_chain_moments("ddpm", steps, 0.0, "fixed_small", mu, sigma)[1]
    large = discretised_chain_moments("ddpm", steps, 0.0, "fixed_large", mu, sigma)[1]
    assert abs(small - large) > 0.1  # the two rules are far apart here
    assert x.std() == pytest.approx(small, rel=0.02)
    with pytest.raises(UserError, match="unknown ddpm option variance='fixed_big'"):
        samplers.SamplerSettings("ddpm", 20, {"variance": "fixed_big"})


@pytest.mark.parametrize("sampler,num_steps,spacing,eta,variance", SAMPLER_CASES)
def test_samplers_with_the_oracle_denoiser_match_exact_moments(sampler, num_steps, spacing, eta,
                                                               variance):
    """For Gaussian data the optimal denoiser is known, so no training is needed."""
    s = diffusion.make_schedule("linear", T)
    mu, sigma = 0.3, 0.5
    run = jax.jit(lambda rng: samplers.sample(
        diffusion.optimal_gaussian_eps(s, mu, sigma), s, (4096, 8), rng, sampler=sampler,
        num_steps=num_steps, eta=eta, variance=variance, clip_x0=False, spacing=spacing,
        options={"variance": variance}))  # ddpm's rule named (the others have none)
    x = np.asarray(run(jax.random.PRNGKey(3)))
    steps = samplers.sampling_timesteps(s, sampler, num_steps, spacing)
    want_mean, want_std = discretised_chain_moments(sampler, steps, eta, variance, mu, sigma)
    assert x.mean() == pytest.approx(want_mean, abs=0.01)
    assert x.std() == pytest.approx(want_std, rel=0.02)
    # Ancestral sampling on all steps, fine DDIM and DPM-Solver++ on its own spacing reproduce
    # the data itself; coarse DDIM and respaced DDPM steps shrink the variance (DDIM-10: std
    # 0.36 for 0.5); DPM-Solver++ on linspace overshoots (its step into t = 0 is too long).
    assert x.mean() == pytest.approx(mu, abs=0.02)
    if (sampler == "dpm_solver++" and spacing == "auto") or (num_steps or T) >= T:
        assert x.std() == pytest.approx(sigma, rel=0.05)


def test_dpm_solver_converges_to_the_data_law_and_beats_ddim_at_20_calls():
    s = diffusion.make_schedule("linear", T)
    mu, sigma = 0.3, 0.5
    errors = {}
    for sampler, calls in (("dpm_solver++", 10), ("dpm_solver++", 20), ("dpm_solver++", 200),
                           ("ddim", 20)):
        steps = samplers.sampling_timesteps(s, sampler, calls)
        mean, std = discretised_chain_moments(sampler, steps, 0.0, "fixed_small", mu, sigma)
        errors[sampler, calls] = abs(std / sigma - 1)
        assert mean == pytest.approx(mu, abs=0.01)
    assert errors["dpm_solver++", 200] < 1e-3 < errors["dpm_solver++", 20] < 0.02
    assert errors["dpm_solver++", 10] < 0.05 and errors["ddim", 20] > 0.1


def test_respaced_ddpm_on_all_timesteps_is_todays_ddpm_bit_for_bit():
    s = diffusion.make_schedule("linear", 50)
    mu, sigma = 0.3, 0.5
    denoise = diffusion.optimal_gaussian_eps(s, mu, sigma)

    def reference(rng):  # the ancestral loop of ddpm_step, with samplers.sample's draws
        init_rng, loop_rng = jax.random.split(rng)
        x = jax.random.normal(init_rng, (4, 8), jnp.float32)

        def body(x, inputs):
            t, step_rng = inputs
            t_batch = jnp.full((4,), t, jnp.int32)
            noise = jax.random.normal(step_rng, (4, 8), jnp.float32)
            return diffusion.ddpm_step(s, denoise(x, t_batch), x, t_batch, noise,
                                       variance="fixed_large"), None

        steps = jnp.arange(49, -1, -1, dtype=jnp.int32)
        return jax.lax.scan(body, x, (steps, jax.random.split(loop_rng, 50)))[0]

    for spacing in ("linspace", "trailing", "leading"):
        got = jax.jit(lambda r, spacing=spacing: samplers.sample(
            denoise, s, (4, 8), r, sampler="ddpm", num_steps=50, spacing=spacing,
            variance="fixed_large"))(jax.random.PRNGKey(0))
        np.testing.assert_array_equal(got, jax.jit(reference)(jax.random.PRNGKey(0)))


def test_sample_snapshots_end_with_final_sample():
    s = diffusion.make_schedule("linear", 20)
    denoise = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    x, snaps = jax.jit(lambda r: samplers.sample(denoise, s, (2, 3), r, num_snapshots=4))(
        jax.random.PRNGKey(0))
    assert snaps.shape == (4, 2, 3)
    np.testing.assert_array_equal(snaps[-1], x)
    assert not np.allclose(snaps[0], snaps[-1])


def test_sampling_run_is_one_program_with_one_dispatch():
    """The jitted sampler lowers to a single XLA while loop, and runs in one call."""
    s = diffusion.make_schedule("linear", T)
    calls = []

    def denoise(x, t):
        calls.append(1)  # counts traces, not steps: a Python loop would trace T times
        return jnp.zeros_like(x)

    fn = jax.jit(lambda r: samplers.sample(denoise, s, (2, 4), r))
    hlo = fn.lower(jax.random.PRNGKey(0)).as_text()
    assert "while" in hlo
    fn(jax.random.PRNGKey(0)).block_until_ready()
    assert len(calls) == 1


def test_sampler_argument_errors_and_spacings():
    s = diffusion.make_schedule("linear", T)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.sampling_timesteps(s, "leapfrog", 50)
    with pytest.raises(ValueError, match="unknown spacing"):
        samplers.sampling_timesteps(s, "ddim", 50, "cubic")
    with pytest.raises(ValueError, match="num_steps must be in"):
        samplers.sampling_timesteps(s, "ddim", T + 1)
    assert len(samplers.sampling_timesteps(s, "ddpm", 0)) == T
    assert len(samplers.sampling_timesteps(s, "dpm_solver++", 0)) == 20  # its default
    steps = {spacing: samplers.sampling_timesteps(s, "ddim", 10, spacing)
             for spacing in ("linspace", "leading", "trailing", "logsnr")}
    np.testing.assert_array_equal(steps["linspace"], np.round(np.linspace(999, 0, 10)))
    np.testing.assert_array_equal(steps["leading"], np.arange(900, -1, -100))
    np.testing.assert_array_equal(steps["trailing"], np.arange(999, 0, -100))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    log_snr = np.log(abar / (1 - abar))[steps["logsnr"]]
    assert steps["logsnr"][0] == T - 1 and steps["logsnr"][-1] == 0
    np.testing.assert_allclose(np.diff(log_snr), np.diff(log_snr).mean(), rtol=0.3)
    for count in (2, 100, 500, T):  # distinct and in range at every count
        for spacing in steps:
            got = samplers.sampling_timesteps(s, "ddim", count, spacing)
            assert len(set(got.tolist())) == count and 0 <= got.min() and got.max() < T


@pytest.mark.parametrize("kind", BETA_SCHEDULES.names())
@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", -1.0, 1.0])
def test_ddpm_step_with_the_true_target_samples_the_true_posterior(kind, prediction, variance):
    """Every schedule x target x variance (fixed rules, and the ends of the learned range): a
    perfect network output gives the float64 posterior."""
    s = diffusion.make_schedule(kind, T)
    betas, abar = float64_schedule(kind)
    abar_prev = np.append(1.0, abar[:-1])
    rng = np.random.default_rng(7)
    x0 = rng.uniform(-0.9, 0.9, (5, 6))
    eps = rng.normal(size=(5, 6))
    noise = rng.normal(size=(5, 6))
    t = np.array([1, 2, 100, 600, 999])
    xt = np.sqrt(abar[t])[:, None] * x0 + np.sqrt(1 - abar[t])[:, None] * eps
    target = diffusion.prediction_target(s, prediction, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                                         jnp.asarray(eps, jnp.float32))
    out = diffusion.ddpm_step(s, target, jnp.asarray(xt, jnp.float32), jnp.asarray(t),
                              jnp.asarray(noise, jnp.float32), prediction=prediction,
                              variance=variance if isinstance(variance, str)
                              else jnp.full((5, 6), variance), clip_x0=False)
    # Posterior of q(x_{t-1} | x_t, x_0) from its Gaussian formula, in float64.
    mean = (np.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t]))[:, None] * x0 + \
        (np.sqrt(1 - betas[t]) * (1 - abar_prev[t]) / (1 - abar[t]))[:, None] * xt
    # A learned variance value of -1 is the posterior's variance, +1 is beta_t.
    small = variance in ("fixed_small", -1.0)
    var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t]) if small else betas[t]
    np.testing.assert_allclose(out, mean + np.sqrt(var)[:, None] * noise, atol=2e-3, rtol=1e-3)
