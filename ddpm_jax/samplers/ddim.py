"""DDIM (Song et al. 2021): any subset of the timesteps; `eta` scales the noise (0:
deterministic)."""

from __future__ import annotations

from ddpm_jax.core import diffusion
from ddpm_jax.samplers.base import SAMPLERS, Sampler


def step(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance, clip_x0,
         eta):
    """`diffusion.ddim_step` (the variance rule plays no part: `eta` sets the noise)."""
    del variance
    x = diffusion.ddim_step(schedule, model_output, x_t, t, t_prev, noise, eta,
                            prediction=prediction, clip_x0=clip_x0)
    return x, state


# Uniform in log-SNR was the closest to the data at every count of the Gaussian oracle
# (docs/benchmarks.md, "fast samplers").
SAMPLERS.register("ddim", Sampler(step=step, options={"eta": 0.0}, default_spacing="logsnr"))
