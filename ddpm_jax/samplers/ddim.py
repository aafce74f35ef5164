"""DDIM (Song et al. 2021): `num_steps` evenly spaced timesteps; `eta` scales the noise."""

from __future__ import annotations

from ddpm_jax import diffusion
from ddpm_jax.samplers.base import SAMPLERS, Sampler, evenly_spaced


def step(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance, clip_x0,
         eta):
    """`diffusion.ddim_step` (the variance rule plays no part: `eta` sets the noise)."""
    del variance
    x = diffusion.ddim_step(schedule, model_output, x_t, t, t_prev, noise, eta,
                            prediction=prediction, clip_x0=clip_x0)
    return x, state


SAMPLERS.register("ddim", Sampler(timesteps=evenly_spaced, step=step, options={"eta": 0.0}))
