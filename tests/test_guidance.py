"""Classifier-free guidance against exact references: the denoisers of Gaussian class-
conditional data are known in closed form (for each class, and for their mixture), so each
sampler's guided run can be checked against a float64 recursion of its own update rule,
written here from the papers, with no network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax.core import diffusion
from ddpm_jax.core.errors import UserError
from ddpm_jax.samplers import Guidance, SamplerSettings, guided
from ddpm_jax.samplers.guidance import combine

T = 1000
MEANS = np.array([[-0.6, 0.2, 0.5], [0.4, -0.3, 0.1], [0.8, 0.7, -0.7]])  # class c's mean
STD = 0.3  # every class: N(mean_c, STD^2) per dimension
SHAPE = (6, 2, 2, 3)
LABELS = np.array([0, 1, 2, 0, 1, 2])


def abar64():
    return np.cumprod(1 - np.linspace(1e-4, 0.02, T))


def exact_eps(x, t_abar, labels, xp):
    """E[eps | x_t] for class `labels` (one per example; len(MEANS) = the null label: the
    mixture with equal weights), in `xp` (jnp float32 or np float64). x: [B, H, W, C]."""
    means = xp.asarray(MEANS)
    a = t_abar.reshape(-1, 1, 1, 1)
    var = a * STD**2 + 1 - a

    def eps_of(mean):  # [B, 1, 1, C] or [C]
        return xp.sqrt(1 - a) * (x - xp.sqrt(a) * mean) / var

    # Mixture: each class's posterior weight from its Gaussian likelihood of x_t.
    log_like = xp.stack([-0.5 * xp.sum((x - xp.sqrt(a) * m) ** 2, axis=(1, 2, 3)) / var[:, 0, 0, 0]
                         for m in means], axis=1)  # [B, K]
    weights = xp.exp(log_like - log_like.max(axis=1, keepdims=True))
    weights = weights / weights.sum(axis=1, keepdims=True)
    mixture = sum(weights[:, k].reshape(-1, 1, 1, 1) * eps_of(means[k]) for k in range(len(means)))
    labels = xp.asarray(labels)
    conditional = eps_of(means[xp.minimum(labels, len(means) - 1)][:, None, None, :])
    return xp.where((labels == len(means)).reshape(-1, 1, 1, 1), mixture, conditional)


def jax_denoiser(schedule):
    def denoise(x, t, labels):
        return exact_eps(x, schedule.alphas_cumprod[t], labels, jnp)
    return denoise


def run(settings, scale=None, interval=(), labels=LABELS, seed=0):
    """The sampler's output through the engine, guided with `scale` (None: the conditional
    denoiser called directly, no guidance wrapper)."""
    schedule = diffusion.make_schedule("linear", T)
    denoise = jax_denoiser(schedule)
    labels = jnp.asarray(labels, jnp.int32)
    if scale is None:
        fn = lambda x, t: denoise(x, t, labels)  # noqa: E731
    else:
        fn = guided(denoise, labels, len(MEANS), Guidance(scale, interval))
    return np.asarray(jax.jit(lambda rng: samplers.sample(
        fn, schedule, SHAPE, rng, sampler=settings[0], num_steps=settings[1], eta=0.0,
        variance="fixed_small", clip_x0=False))(jax.random.PRNGKey(seed)))


def reference(sampler, num_steps, scale, seed=0):
    """The guided run in float64 from the update rules (Ho et al. / Nichol & Dhariwal's
    respaced posterior; DDIM with eta = 0; DPM-Solver++(2M)), with the engine's noise."""
    abar = abar64()
    steps = samplers.sampling_timesteps(diffusion.make_schedule("linear", T), sampler, num_steps)
    init_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
    x = np.asarray(jax.random.normal(init_rng, SHAPE), np.float64)
    step_rngs = jax.random.split(loop_rng, len(steps))
    lam = lambda a: 0.5 * np.log(a / (1 - a))  # noqa: E731
    previous_x0 = None
    for i, t in enumerate(steps):
        a = abar[t]
        ap = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
        a_batch = np.full(SHAPE[0], a)
        cond = exact_eps(x, a_batch, LABELS, np)
        uncond = exact_eps(x, a_batch, np.full(SHAPE[0], len(MEANS)), np)
        eps = uncond + scale * (cond - uncond)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        if sampler == "ddpm":
            beta = 1 - a / ap
            mean = (beta * np.sqrt(ap) / (1 - a)) * x0 + ((1 - ap) * np.sqrt(1 - beta) / (1 - a)) * x
            noise = np.asarray(jax.random.normal(step_rngs[i], SHAPE), np.float64)
            x = mean + (np.sqrt(beta * (1 - ap) / (1 - a)) * noise if i + 1 < len(steps) else 0)
        elif sampler == "ddim":
            x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        elif i + 1 == len(steps):  # DPM-Solver++(2M): the last step lands on the x0 prediction
            x = x0
        else:
            h = lam(ap) - lam(a)
            data = x0
            if previous_x0 is not None:
                r = (lam(a) - lam(abar[steps[i - 1]])) / h
                data = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous_x0
            x = np.sqrt((1 - ap) / (1 - a)) * x + np.sqrt(ap) * (1 - np.exp(-h)) * data
        previous_x0 = x0
    return x


CASES = [("ddpm", 25), ("ddim", 20), ("dpm_solver++", 10)]


@pytest.mark.parametrize("sampler,num_steps", CASES)
def test_guided_samplers_equal_a_float64_recursion_of_their_update(sampler, num_steps):
    got = run((sampler, num_steps), scale=3.0)
    want = reference(sampler, num_steps, 3.0)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # Guidance moved the samples: the unguided reference is far from them.
    assert np.abs(reference(sampler, num_steps, 1.0) - want).max() > 0.05


@pytest.mark.parametrize("sampler,num_steps", CASES)
def test_scale_one_is_the_conditional_model_and_zero_the_unconditional_bitwise(sampler, num_steps):
    conditional = run((sampler, num_steps))
    np.testing.assert_array_equal(run((sampler, num_steps), scale=1.0), conditional)
    unconditional = run((sampler, num_steps), labels=np.full(6, len(MEANS)))
    np.testing.assert_array_equal(run((sampler, num_steps), scale=0.0), unconditional)
    # An interval over every timestep forces the doubled batch: s = 1 keeps its conditional
    # half exactly; s = 0 gives its unconditional half, whose mixture weights XLA sums over
    # a batch twice as large (float rounding only).
    np.testing.assert_array_equal(run((sampler, num_steps), 1.0, (0, T - 1)), conditional)
    np.testing.assert_allclose(run((sampler, num_steps), 0.0, (0, T - 1)), unconditional,
                               rtol=1e-5, atol=1e-6)


def test_guidance_interval_guides_only_inside_it():
    """Outside the interval the step is the conditional model's: an interval that no visited
    timestep falls in gives the conditional samples; one holding every step, the guided."""
    steps = samplers.sampling_timesteps(diffusion.make_schedule("linear", T), "ddim", 20)
    conditional, full = run(("ddim", 20)), run(("ddim", 20), scale=3.0)
    gap = (int(steps[1]) + 1, int(steps[0]) - 1)  # between the first two visited timesteps
    # (equal to float rounding: the loop body, with its conditional, compiles differently)
    np.testing.assert_allclose(run(("ddim", 20), 3.0, gap), conditional, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(("ddim", 20), 3.0, (0, T - 1)), full, rtol=1e-6, atol=1e-6)
    partial = run(("ddim", 20), 3.0, (0, 500))
    assert np.abs(partial - conditional).max() > 1e-3 and np.abs(partial - full).max() > 1e-3


def test_combine_guides_the_mean_channels_and_keeps_the_conditional_variance_values():
    cond = jnp.arange(12.0).reshape(1, 2, 1, 6)
    uncond = -cond
    out = combine(cond, uncond, 2.5, 3)
    np.testing.assert_allclose(out[..., :3], uncond[..., :3] + 2.5 * (cond - uncond)[..., :3])
    np.testing.assert_array_equal(out[..., 3:], cond[..., 3:])


def test_guidance_settings_from_a_config_section_and_their_errors():
    section = {"sampler": "ddim", "num_steps": 10, "eta": 0.0, "guidance_scale": 2.0,
               "guidance_interval": (100, 600)}
    settings = SamplerSettings.from_config(section)
    assert settings.guidance == Guidance(2.0, (100, 600))
    assert settings.describe()["guidance_scale"] == 2.0
    assert SamplerSettings.from_config(section, guidance_scale=1.0).guidance.active is False
    with pytest.raises(UserError, match="guidance_interval"):
        Guidance(2.0, (600, 100))
