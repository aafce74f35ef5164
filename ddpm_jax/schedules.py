"""Beta schedules by name (`config.diffusion.schedule`; README, "Extending").

A schedule is `fn(num_timesteps, beta_start, beta_end) -> betas` (float64 [T], each in
(0, 1)), registered in `BETA_SCHEDULES`. `diffusion.make_schedule` derives every other
coefficient from the betas.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ddpm_jax.registry import Registry

BetaSchedule = Callable[[int, float, float], np.ndarray]
BETA_SCHEDULES: Registry[BetaSchedule] = Registry("diffusion.schedule")


@BETA_SCHEDULES.register("linear")
def linear(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Ho et al. (2020): betas evenly spaced from beta_start to beta_end."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


@BETA_SCHEDULES.register("quadratic")
def quadratic(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Ho et al.'s code: square roots of the betas evenly spaced."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


@BETA_SCHEDULES.register("cosine")
def cosine(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Nichol & Dhariwal (2021): ``alphas_cumprod(t) = cos(((t/T + s)/(1 + s)) * pi/2)^2``,
    s = 0.008, betas capped at 0.999 (`beta_start` and `beta_end` are unused)."""
    del beta_start, beta_end
    s = 0.008
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
