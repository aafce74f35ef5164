"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a second-order multistep
solver of the diffusion ODE in data-prediction form.

In EDM's terms (x = y + sigma n, `core/edm.py`; alpha = 1, so lambda = -log sigma), with
m_i = D(x_i; sigma_i) the (clipped) data prediction at step i, one step from sigma_i to
sigma_{i+1} is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (exp(-h_i) - 1) D_i,
    h_i = lambda_{i+1} - lambda_i,   D_i = (1 + 1/(2 r_i)) m_i - 1/(2 r_i) m_{i-1},
    r_i = (lambda_i - lambda_{i-1}) / h_i,

which is the paper's variance-preserving update with x_t / alpha_t for x; first order
(D_i = m_i, DDIM's step) at the first step, where there is no m_{i-1}, and at the last,
which goes to the noise-free image (sigma = 0, so x = m_i). One network call per step; the
previous m is the loop's carry. It works on any model, discrete or continuous; the scalars
of every step are computed once on the host in float64 (`plan_calls`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ddpm_jax.samplers.base import SAMPLERS, Sampler


def step_coefficients(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """Per step of the grid `sigmas` (descending, the last above 0; then 0): `scale_x`
    (sigma_{i+1} / sigma_i), `scale_data` (-expm1(-h_i)) and `weight_prev` (1 / (2 r_i), 0
    for a first-order step)."""
    sigmas = np.asarray(sigmas, np.float64)
    sigma_next = np.append(sigmas[1:], 0.0)
    scale_x = sigma_next / sigmas
    with np.errstate(divide="ignore"):  # lambda = inf at the clean image
        lam, lam_next = -np.log(sigmas), -np.log(sigma_next)
    h = lam_next - lam  # inf at the last step
    second_order = (np.arange(len(sigmas)) > 0) & (sigma_next > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(second_order, h / (2.0 * (lam - np.roll(lam, 1))), 0.0)
    return {"scale_x": scale_x, "scale_data": 1.0 - scale_x, "weight_prev": weight,
            "sigma_after": sigma_next}


def plan_calls(sigmas, num_calls, round_sigma):
    del num_calls, round_sigma  # one call per sigma, each already the model's own
    return np.asarray(sigmas, np.float64), step_coefficients(sigmas), float(sigmas[0])


def step(denoised, x, noise, state, *, coefficients):
    del noise  # deterministic
    weight = coefficients["weight_prev"]
    data = (1.0 + weight) * denoised - weight * state
    return coefficients["scale_x"] * x + coefficients["scale_data"] * data, denoised


# Uniform in log-SNR, the solver's own time variable, was the closest to the data at every
# count of the Gaussian oracle; linspace overshoots (docs/benchmarks.md, "fast samplers").
SAMPLERS.register("dpm_solver++", Sampler(step=step, init_state=jnp.zeros_like, space="sigma",
                                          plan_calls=plan_calls, default_steps=20,
                                          default_spacing="logsnr"))
