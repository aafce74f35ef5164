"""Ancestral sampling of Ho et al. (2020), on all T timesteps or a respaced chain.

With every timestep each step is `diffusion.ddpm_step`. With fewer (`num_steps` < T) it
samples the respaced chain of Nichol & Dhariwal (2021, section 4): the Markov chain whose
cumulative alphas are those of the kept timesteps, so its betas are
beta'_i = 1 - abar[t_i] / abar[t_{i-1}], with the same posterior and both variance rules.
Its coefficients are computed once on the host in float64 (`prepare`), since 1 - a ratio
close to 1 loses most of its digits in float32.

Its `variance` knob (`sample.variance`) picks the rule (`engine.sampling_variance`): "auto"
is the model's own over every timestep, and the posterior's (fixed_small) on a respaced
chain of a fixed-variance model, which Nichol & Dhariwal find such a chain wants;
"fixed_small" or "fixed_large" name one.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import diffusion, schedules
from ddpm_jax.samplers.base import SAMPLERS, Sampler


def respaced_coefficients(log_alphas: np.ndarray, steps: np.ndarray,
                          prev_steps: np.ndarray) -> dict[str, np.ndarray] | None:
    """Per visited step (t -> t_prev): the posterior mean coefficients of x0 and x_t, and the
    log-variance of each rule, of the chain respaced to `steps` (`log_alphas`: log abar[t]
    in float64); None when no step is skipped (the chain is the original one)."""
    if np.all(prev_steps == steps - 1):
        return None
    log_abar = log_alphas[steps]
    log_abar_prev = np.where(prev_steps >= 0, log_alphas[np.maximum(prev_steps, 0)], 0.0)
    abar_prev = np.exp(log_abar_prev)
    beta = -np.expm1(log_abar - log_abar_prev)  # 1 - abar_t / abar_prev, to full precision
    one_minus_abar, one_minus_prev = -np.expm1(log_abar), -np.expm1(log_abar_prev)
    posterior_variance = beta * one_minus_prev / one_minus_abar
    # The last step (to the clean image) adds no noise; its log-variance is never used.
    final = prev_steps < 0
    safe = np.where(final, np.roll(posterior_variance, 1), posterior_variance)
    large = np.where(final, np.roll(posterior_variance, 1), beta)
    return {
        "coef_x0": beta * np.sqrt(abar_prev) / one_minus_abar,
        "coef_xt": one_minus_prev * np.sqrt(1.0 - beta) / one_minus_abar,
        "log_variance_fixed_small": np.log(safe),
        "log_variance_fixed_large": np.log(large),
        "noise_scale": (~final).astype(np.float64),
    }


def prepare(schedule, steps, prev_steps):
    log_alphas = schedules.log_alphas_cumprod(np.asarray(schedule.betas))
    coefficients = respaced_coefficients(log_alphas, steps, prev_steps)
    if coefficients is None:
        return None
    return {key: value.astype(np.float32) for key, value in coefficients.items()}


def step(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance, clip_x0,
         coefficients):
    """`diffusion.ddpm_step` on the original chain; the respaced posterior otherwise."""
    if coefficients is None:  # every timestep: t_prev is t - 1
        x = diffusion.ddpm_step(schedule, model_output, x_t, t, noise, prediction=prediction,
                                variance=variance, clip_x0=clip_x0)
        return x, state
    mean = diffusion.reverse_mean(schedule, model_output, x_t, t, prediction=prediction,
                                  clip_x0=clip_x0,
                                  coefficients=(coefficients["coef_x0"], coefficients["coef_xt"]))
    if isinstance(variance, str):
        log_variance = coefficients[f"log_variance_{variance}"]
    else:  # learned range, between the respaced chain's posterior and beta'
        log_variance = diffusion.learned_log_variance(coefficients["log_variance_fixed_small"],
                                                      coefficients["log_variance_fixed_large"],
                                                      variance)
    return mean + coefficients["noise_scale"] * jnp.exp(0.5 * log_variance) * noise, state


# With fewer than T steps, trailing spacing was the closest to the data at 10-20 calls of the
# Gaussian oracle (docs/benchmarks.md, "fast samplers"); with all T every spacing is the chain.
SAMPLERS.register("ddpm", Sampler(step=step, prepare=prepare, default_spacing="trailing",
                                  options={"variance": "auto"},
                                  option_choices={"variance": ("auto", "fixed_small",
                                                               "fixed_large")}))
