"""Ancestral sampling of Ho et al. (2020): every timestep, x_t -> x_{t-1}."""

from __future__ import annotations

import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.samplers.base import SAMPLERS, Sampler, evenly_spaced


def timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """All T timesteps, descending; any other count is refused."""
    if num_steps and num_steps != num_timesteps:
        raise ValueError(
            f"the ddpm sampler visits all {num_timesteps} timesteps; got num_steps={num_steps}. "
            "Use sampler='ddim' (eta=1 gives stochastic sampling) for fewer steps."
        )
    return evenly_spaced(num_timesteps, num_timesteps)


def step(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance, clip_x0):
    """`diffusion.ddpm_step` (t_prev is always t - 1)."""
    del t_prev
    x = diffusion.ddpm_step(schedule, model_output, x_t, t, noise, prediction=prediction,
                            variance=variance, clip_x0=clip_x0)
    return x, state


SAMPLERS.register("ddpm", Sampler(timesteps=timesteps, step=step))
