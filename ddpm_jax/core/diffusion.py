"""The DDPM math as pure functions: arrays in, arrays out, no hidden state.

Everything here is independent of the network, the config and the training loop. A noise
schedule is a pytree of per-timestep arrays (`Schedule`); every other function takes it as
its first argument, so it can be passed through `jax.jit` like any other array. Beta
schedules (`schedules.py`) are chosen by name; the samplers (`ddpm_jax.samplers`) build on
the single reverse steps here.

Conventions:
  * Timesteps are integers in ``[0, T)``; ``t = 0`` is the least noisy step.
  * ``x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps``.
  * A network output is interpreted by its *prediction target*: ``eps`` (the noise,
    as in Ho et al. 2020), ``x0`` (the clean image) or ``v``
    (``sqrt(abar) * eps - sqrt(1 - abar) * x0``, Salimans & Ho 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core.registry import check_choice
from ddpm_jax.core.schedules import log_alphas_cumprod, make_betas

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


class Schedule(NamedTuple):
    """Per-timestep coefficients of the forward and reverse processes, each shape [T]."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(
    kind: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    dtype: jnp.dtype = jnp.float32,
) -> Schedule:
    """Builds every per-timestep coefficient in float64, then casts to `dtype`."""
    betas = make_betas(kind, num_timesteps, beta_start, beta_end)
    alphas = 1.0 - betas
    alphas_cumprod = np.exp(log_alphas_cumprod(betas))
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] is 0; clip its log like the reference implementation.
    posterior_log_variance_clipped = np.log(
        np.append(posterior_variance[1] if num_timesteps > 1 else betas[0], posterior_variance[1:])
    )
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=dtype) for k, v in arrays.items()})


def extract(coefficients: jax.Array, t: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
    """Gathers `coefficients[t]` and reshapes it to broadcast against an [B, ...] array."""
    values = jnp.take(coefficients, jnp.asarray(t), axis=0)
    return values.reshape(values.shape + (1,) * (len(x_shape) - values.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0) with the given standard-normal `noise`."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def _signal_and_noise_scales(
    schedule: Schedule, t: jax.Array, x_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_shape),
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_shape),
    )


def prediction_target(
    schedule: Schedule, prediction: str, x0: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """What the network is trained to output for target `prediction`."""
    check_choice("prediction target", prediction, PREDICTIONS)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    signal, sigma = _signal_and_noise_scales(schedule, t, x0.shape)
    return signal * noise - sigma * x0


def model_output_to_x0_eps(
    schedule: Schedule, prediction: str, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Turns a network output into the implied (x0, eps) pair for x_t at step t."""
    check_choice("prediction target", prediction, PREDICTIONS)
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t.shape)
    if prediction == "eps":
        eps = model_output
        return (x_t - sigma * eps) / signal, eps
    if prediction == "x0":
        x0 = model_output
        return x0, (x_t - signal * x0) / sigma
    x0 = signal * x_t - sigma * model_output
    eps = sigma * x_t + signal * model_output
    return x0, eps


def posterior_mean(coef_x0: jax.Array, coef_xt: jax.Array, x0: jax.Array,
                   x_t: jax.Array) -> jax.Array:
    """The mean of q(x_{t-1} | x_t, x_0) (Ho et al., eq. 7): coef_x0 * x0 + coef_xt * x_t."""
    return coef_x0 * x0 + coef_xt * x_t


def q_posterior_mean_variance(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = posterior_mean(extract(schedule.posterior_mean_coef1, t, x_t.shape),
                          extract(schedule.posterior_mean_coef2, t, x_t.shape), x0, x_t)
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def predicted_x0(schedule: Schedule, prediction: str, model_output: jax.Array, x_t: jax.Array,
                 t: jax.Array, clip_x0: bool) -> jax.Array:
    """The clean image a network output implies, clipped to the data range [-1, 1] if asked."""
    x0, _ = model_output_to_x0_eps(schedule, prediction, model_output, x_t, t)
    return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def reverse_mean(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                 prediction: str, clip_x0: bool,
                 coefficients: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """The mean of the model's p(x_{t-1} | x_t): the posterior mean at the predicted x0.

    `coefficients` (coef_x0, coef_xt) replace the schedule's, for a respaced chain.
    """
    x0 = predicted_x0(schedule, prediction, model_output, x_t, t, clip_x0)
    if coefficients is None:
        coefficients = (extract(schedule.posterior_mean_coef1, t, x_t.shape),
                        extract(schedule.posterior_mean_coef2, t, x_t.shape))
    return posterior_mean(*coefficients, x0, x_t)


def split_output(network_output: jax.Array, variance: str) -> tuple[jax.Array, jax.Array | None]:
    """(prediction, variance values): with "learned_range" the network's channels are the
    prediction then as many variance values v in [-1, 1]; otherwise all prediction."""
    if variance != "learned_range":
        return network_output, None
    prediction, values = jnp.split(network_output, 2, axis=-1)
    return prediction, values


def learned_log_variance(min_log: jax.Array, max_log: jax.Array,
                         values: jax.Array) -> jax.Array:
    """Nichol & Dhariwal's learned range: log variance frac * max_log + (1 - frac) * min_log
    with frac = (v + 1) / 2, between the posterior's (min) and beta's (max)."""
    fraction = (values + 1.0) / 2.0
    return fraction * max_log + (1.0 - fraction) * min_log


def _reverse_log_variance(schedule: Schedule, variance: str) -> jax.Array:
    """Per-step log-variance of p(x_{t-1} | x_t) for a fixed variance rule."""
    check_choice("sampling variance", variance, VARIANCES[:2])
    if variance == "fixed_small":
        return schedule.posterior_log_variance_clipped
    # "fixed large": beta_t, except at t = 0 where the posterior's value is used
    # (it is never added, since the last step is noise-free).
    return jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))


def reverse_log_variance(schedule: Schedule, variance: str | jax.Array, t: jax.Array,
                         x_shape: tuple[int, ...]) -> jax.Array:
    """log variance of p(x_{t-1} | x_t): `variance` names a fixed rule, or is the network's
    variance values (learned range, between the clipped posterior's and log beta_t)."""
    if isinstance(variance, str):
        return extract(_reverse_log_variance(schedule, variance), t, x_shape)
    return learned_log_variance(extract(schedule.posterior_log_variance_clipped, t, x_shape),
                                extract(jnp.log(schedule.betas), t, x_shape), variance)


def reverse_mean_log_variance(
    schedule: Schedule, network_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
    prediction: str, variance: str, clip_x0: bool,
) -> tuple[jax.Array, jax.Array]:
    """Mean and log variance of the model's p(x_{t-1} | x_t) from the raw network output."""
    model_output, values = split_output(network_output, variance)
    mean = reverse_mean(schedule, model_output, x_t, t, prediction=prediction, clip_x0=clip_x0)
    log_variance = reverse_log_variance(schedule, variance if values is None else values, t,
                                        x_t.shape)
    return mean, jnp.broadcast_to(log_variance, x_t.shape)


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    prediction: str = "eps",
    variance: str | jax.Array = "fixed_small",
    clip_x0: bool = True,
) -> jax.Array:
    """One ancestral step x_t -> x_{t-1} of Ho et al. (2020); noise-free at t = 0.

    `variance` names a fixed rule, or is the network's variance values (learned range).
    """
    mean = reverse_mean(schedule, model_output, x_t, t, prediction=prediction, clip_x0=clip_x0)
    log_variance = reverse_log_variance(schedule, variance, t, x_t.shape)
    nonzero = (jnp.asarray(t) > 0).astype(x_t.dtype)
    nonzero = nonzero.reshape(nonzero.shape + (1,) * (x_t.ndim - nonzero.ndim))
    return mean + nonzero * jnp.exp(0.5 * log_variance) * noise


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    noise: jax.Array,
    eta: float = 0.0,
    *,
    prediction: str = "eps",
    clip_x0: bool = True,
) -> jax.Array:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); `t_prev < 0` means x_0.

    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is DDPM posterior sampling.
    eps is recomputed from the (possibly clipped) x0 so that this identity holds
    with clipping too.
    """
    x0 = predicted_x0(schedule, prediction, model_output, x_t, t, clip_x0)
    abar_t = extract(schedule.alphas_cumprod, t, x_t.shape)
    t_prev = jnp.asarray(t_prev)
    abar_prev = jnp.where(
        t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], jnp.ones((), x_t.dtype)
    )
    abar_prev = abar_prev.reshape(abar_prev.shape + (1,) * (x_t.ndim - abar_prev.ndim))
    eps = (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(abar_prev) * x0 + direction + sigma * noise


DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def optimal_gaussian_eps(schedule: Schedule, mean: float, std: float) -> DenoiseFn:
    """The exact E[eps | x_t] for data ~ N(mean, std^2) in every dimension: a perfect
    "network" for that data, so samplers can be checked without training one."""

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        abar = extract(schedule.alphas_cumprod, t, x.shape)
        variance_t = abar * std**2 + (1 - abar)
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mean) / variance_t

    return denoise
