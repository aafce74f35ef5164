"""EDM's samplers (Karras et al. 2022): Heun's 2nd-order method (Algorithm 1, with the
stochastic churn of Algorithm 2) and Euler's method, on the probability-flow ODE

    dx / dsigma = (x - D(x; sigma)) / sigma.

With sigmas t_0 > ... > t_{N-1} > t_N = 0, step i is

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= t_i <= S_tmax else 0
    t_hat = t_i (1 + gamma_i),  x_hat = x_i + sqrt(t_hat^2 - t_i^2) S_noise n
    d = (x_hat - D(x_hat; t_hat)) / t_hat,  x_{i+1} = x_hat + (t_{i+1} - t_hat) d
    and, for Heun when t_{i+1} > 0:
    d' = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1},  x_{i+1} = x_hat + (t_{i+1} - t_hat)(d + d') / 2

with x_0 = t_0 n (S_churn = 0: Algorithm 1, deterministic). On a model of a discrete
schedule every sigma, t_hat included, is one of its own (`round_sigma`).

`num_steps` counts network calls: Heun with N sigmas makes 2N - 1; with an even count
the first step, at the highest noise (where D is nearly constant and an Euler step nearly
exact), is an Euler step. Each call is one iteration of the engine's loop: the state
carries x_hat and d between a step's two calls, and the per-call arrays say which call it is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.samplers.base import SAMPLERS, Sampler

CHURN_OPTIONS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


def heun_grid_size(num_calls: int) -> int:
    """Sigmas that `num_calls` network calls of Heun visit (2N - 1 calls for N sigmas)."""
    return num_calls // 2 + 1


def churned_sigmas(sigmas: np.ndarray, round_sigma, *, s_churn: float, s_tmin: float,
                   s_tmax: float, s_noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(t_hat, the std of the noise that takes x_i to x_hat) per step (Algorithm 2)."""
    gamma = np.where((sigmas >= s_tmin) & (sigmas <= s_tmax),
                     min(s_churn / len(sigmas), math.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = np.where(gamma > 0, round_sigma(sigmas * (1.0 + gamma)), sigmas)
    return sigma_hat, np.sqrt(np.maximum(sigma_hat**2 - sigmas**2, 0.0)) * s_noise


def plan_calls(sigmas: np.ndarray, num_calls: int, round_sigma, *, second_order: bool,
               **churn: float) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """The network calls of `len(sigmas)` steps with at most `num_calls` calls (float64).

    Per call: `sigma_hat` and `sigma_next` of its step, `corrector` (1: the second call of a
    Heun step), `corrected` (1: a first call that a second follows), `churn_next` (the std
    of the noise added to x once this call finishes its step: the next step's churn) and
    `sigma_after` (the noise level of the x it returns).
    """
    count = len(sigmas)
    sigma_next = np.append(sigmas[1:], 0.0)
    sigma_hat, churn_std = churned_sigmas(sigmas, round_sigma, **churn)
    churn_after = np.append(churn_std[1:], 0.0)
    level_after = np.append(sigma_hat[1:], 0.0)  # x_hat of the next step, or the sample
    corrections = min(num_calls - count, count - 1) if second_order else 0
    rows = []
    for i in range(count):
        corrected = i < count - 1 and i >= count - 1 - corrections
        rows.append((sigma_hat[i], sigma_hat[i], sigma_next[i], 0.0, float(corrected),
                     0.0 if corrected else churn_after[i],
                     sigma_next[i] if corrected else level_after[i]))
        if corrected:
            rows.append((sigma_next[i], sigma_hat[i], sigma_next[i], 1.0, 0.0, churn_after[i],
                         level_after[i]))
    table = np.asarray(rows, np.float64)
    names = ("sigma_hat", "sigma_next", "corrector", "corrected", "churn_next", "sigma_after")
    initial_scale = math.sqrt(sigmas[0] ** 2 + churn_std[0] ** 2)
    return table[:, 0], {name: table[:, k + 1] for k, name in enumerate(names)}, initial_scale


def init_state(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_hat, d) of the step in progress."""
    return jnp.zeros_like(x), jnp.zeros_like(x)


def step(denoised, x, noise, state, *, coefficients, **churn):
    """One call: the Euler step from x_hat (a first call), or Heun's correction (a second)."""
    del churn  # in the per-call arrays (`plan_calls`)
    c = coefficients
    x_hat, d_first = state
    d = (x - denoised) / c["sigma"]
    interval = c["sigma_next"] - c["sigma_hat"]
    euler = x + interval * d
    heun = x_hat + interval * (0.5 * d_first + 0.5 * d)
    corrector, corrected = c["corrector"] > 0, c["corrected"] > 0
    finished = jnp.where(corrector, heun, euler) + c["churn_next"] * noise
    new_x = jnp.where(corrected, euler, finished)
    new_state = (jnp.where(corrected, x, x_hat), jnp.where(corrected, d, d_first))
    return new_x, new_state


def _sampler(second_order: bool) -> Sampler:
    return Sampler(
        step=step, init_state=init_state, options=dict(CHURN_OPTIONS), default_steps=35,
        default_spacing="karras", space="sigma",
        plan_calls=lambda sigmas, calls, round_sigma, **options: plan_calls(
            sigmas, calls, round_sigma, second_order=second_order, **options),
        grid_size=heun_grid_size if second_order else (lambda num_calls: num_calls))


# EDM's defaults: 18 sigmas, 35 calls, on its own grid.
SAMPLERS.register("heun", _sampler(second_order=True))
SAMPLERS.register("euler", _sampler(second_order=False))
