"""The variational bound in bits per dimension, as Ho et al. (2020) compute it.

-log p(x_0) <= L_T + sum_{t>=1} L_{t-1} + L_0 with
  * L_T = KL(q(x_T | x_0) || N(0, I)), the prior term;
  * L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), one per t >= 1;
  * L_0 = -log p(x_0 | x_1), the decoder: a Gaussian discretised to the 256 levels of 8-bit
    data (the edge bins reach to -inf and +inf).
Each term is averaged over dimensions and divided by log 2, so the total is bits/dim for
data scaled to [-1, 1]. Timesteps here are 0-based, as everywhere in ddpm-jax: the network's
t = 0 is the paper's t = 1, whose term is the decoder. Pure functions; `bits_per_dim` runs
the whole sum over t as one `lax.scan` for one batch, `vb_terms` any chunk of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.core import diffusion


def normal_kl(mean1: jax.Array, log_var1: jax.Array, mean2: jax.Array,
              log_var2: jax.Array) -> jax.Array:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The standard normal CDF by the tanh approximation of Ho et al.'s code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array,
                                        log_scale: jax.Array) -> jax.Array:
    """log P(x) per element for 8-bit data x in [-1, 1] (bins 2/255 wide) under a Gaussian of
    `mean` and standard deviation exp(`log_scale`); the lowest and highest bins take all the
    mass below and above them."""
    centered = x - mean
    inverse_std = jnp.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inverse_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inverse_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_over_dims(values: jax.Array) -> jax.Array:
    return jnp.mean(values, axis=tuple(range(1, values.ndim)))


def prior_bpd(schedule: diffusion.Schedule, x0: jax.Array) -> jax.Array:
    """L_T per example, bits/dim: KL(q(x_T | x_0) || N(0, I))."""
    last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1)
    mean = diffusion.extract(schedule.sqrt_alphas_cumprod, last, x0.shape) * x0
    log_var = jnp.log(1.0 - diffusion.extract(schedule.alphas_cumprod, last, x0.shape))
    log_var = jnp.broadcast_to(log_var, x0.shape)
    return _mean_over_dims(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def vb_term_bpd(schedule: diffusion.Schedule, network_output: jax.Array, x0: jax.Array,
                x_t: jax.Array, t: jax.Array, *, prediction: str, variance: str,
                clip_x0: bool) -> jax.Array:
    """L_{t-1} per example in bits/dim: the KL of the model's p(x_{t-1} | x_t) from the true
    posterior for t > 0, the decoder's negative log-likelihood of x0 for t = 0."""
    mean, log_var = diffusion.reverse_mean_log_variance(
        schedule, network_output, x_t, t, prediction=prediction, variance=variance,
        clip_x0=clip_x0)
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = _mean_over_dims(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    decoder = -_mean_over_dims(
        discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    return jnp.where(t == 0, decoder, kl)


def vb_terms(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
             schedule: diffusion.Schedule, x0: jax.Array, timesteps: jax.Array, keys: jax.Array,
             *, prediction: str, variance: str, clip_x0: bool) -> jax.Array:
    """L_{t-1} in bits/dim [len(timesteps), B] for a batch x0 at each of `timesteps`, the
    noise of each drawn from its row of `keys`: one `lax.scan`. The terms of all T timesteps
    may be computed a chunk at a time (to show progress): each term is the same."""

    def term(carry, inputs):
        t, key = inputs
        t_batch = jnp.full((x0.shape[0],), t, jnp.int32)
        x_t = diffusion.q_sample(schedule, x0, t_batch, jax.random.normal(key, x0.shape))
        value = vb_term_bpd(schedule, denoise_fn(x_t, t_batch).astype(jnp.float32), x0, x_t,
                            t_batch, prediction=prediction, variance=variance, clip_x0=clip_x0)
        return carry, value

    _, terms = jax.lax.scan(term, None, (timesteps, keys))
    return terms


def term_keys(rng: jax.Array, num_timesteps: int) -> jax.Array:
    """The key of each timestep's noise in the bound of one batch."""
    return jax.random.split(rng, num_timesteps)


def bound(terms: jax.Array, prior: jax.Array) -> dict[str, jax.Array]:
    """The bound from all T terms [T, B] and the prior term [B]: per example `total`,
    `prior`, `decoder` (t = 0) and `terms`, each in bits/dim."""
    return {"total": jnp.sum(terms, axis=0) + prior, "prior": prior, "decoder": terms[0],
            "terms": terms}


def bits_per_dim(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 schedule: diffusion.Schedule, x0: jax.Array, rng: jax.Array, *,
                 prediction: str, variance: str, clip_x0: bool) -> dict[str, jax.Array]:
    """The bound for a batch x0 (in [-1, 1], 8-bit values), one `lax.scan` over all T:
    `bound`'s per-example terms in bits/dim. Each t draws its own noise from `rng`."""
    steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    terms = vb_terms(denoise_fn, schedule, x0, steps, term_keys(rng, schedule.num_timesteps),
                     prediction=prediction, variance=variance, clip_x0=clip_x0)
    return bound(terms, prior_bpd(schedule, x0))
