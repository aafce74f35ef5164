"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a second-order multistep
solver of the diffusion ODE in data-prediction form.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t)
and m_i the (clipped) x0 the network implies at step i, one step from t_i to t_{i+1} is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i,
    h_i = lambda_{i+1} - lambda_i,   D_i = (1 + 1/(2 r_i)) m_i - 1/(2 r_i) m_{i-1},
    r_i = (lambda_i - lambda_{i-1}) / h_i,

first order (D_i = m_i, DDIM's step) at the first step, where there is no m_{i-1}, and at
the last, which goes to the noise-free image (sigma = 0, so x = m_i). One network call per
step; the previous m is the scan's carry. The scalars of every step are computed once on
the host in float64 (`prepare`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import diffusion, schedules
from ddpm_jax.samplers.base import SAMPLERS, Sampler


def step_coefficients(log_alphas_cumprod: np.ndarray, steps: np.ndarray,
                      prev_steps: np.ndarray) -> dict[str, np.ndarray]:
    """Per step: `scale_x` (sigma_{i+1} / sigma_i), `scale_data` (-alpha_{i+1} expm1(-h_i))
    and `weight_prev` (1 / (2 r_i), 0 for a first-order step)."""
    def log_alpha_sigma(t):
        log_abar = np.where(t >= 0, log_alphas_cumprod[np.maximum(t, 0)], 0.0)
        with np.errstate(divide="ignore"):  # sigma = 0 at the clean image (t = -1)
            return 0.5 * log_abar, 0.5 * np.log(-np.expm1(log_abar))

    log_alpha, log_sigma = log_alpha_sigma(steps)
    log_alpha_next, log_sigma_next = log_alpha_sigma(prev_steps)
    lam, lam_next = log_alpha - log_sigma, log_alpha_next - log_sigma_next
    h = lam_next - lam  # inf at the last step
    scale_x = np.exp(log_sigma_next - log_sigma)
    scale_data = -np.exp(log_alpha_next) * np.expm1(-h)
    second_order = (np.arange(len(steps)) > 0) & (prev_steps >= 0)
    lam_before = np.roll(lam, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(second_order, h / (2.0 * (lam - lam_before)), 0.0)
    return {"scale_x": scale_x, "scale_data": scale_data, "weight_prev": weight}


def prepare(schedule, steps, prev_steps):
    log_alphas = schedules.log_alphas_cumprod(np.asarray(schedule.betas))
    coefficients = step_coefficients(log_alphas, steps, prev_steps)
    return {key: value.astype(np.float32) for key, value in coefficients.items()}


def step(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance, clip_x0,
         coefficients):
    del t_prev, noise, variance  # deterministic; the scalars come from `prepare`
    x0 = diffusion.predicted_x0(schedule, prediction, model_output, x_t, t, clip_x0)
    weight = coefficients["weight_prev"]
    data = (1.0 + weight) * x0 - weight * state
    return coefficients["scale_x"] * x_t + coefficients["scale_data"] * data, x0


# Uniform in log-SNR, the solver's own time variable, was the closest to the data at every
# count of the Gaussian oracle; linspace overshoots (docs/benchmarks.md, "fast samplers").
SAMPLERS.register("dpm_solver++", Sampler(step=step, init_state=jnp.zeros_like, prepare=prepare,
                                          default_steps=20, default_spacing="logsnr"))
