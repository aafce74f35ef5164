"""Beta schedules by name (`config.diffusion.schedule`; docs/extending.md).

A schedule is `fn(num_timesteps, beta_start, beta_end) -> betas` (float64 [T], each in
(0, 1)), registered in `BETA_SCHEDULES`. `diffusion.make_schedule` derives every other
coefficient from the betas; the cumulative alphas come from `log_alphas_cumprod` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import Registry

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


def make_betas(
    kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Beta schedule `kind` (registered in `BETA_SCHEDULES`) in float64.

    Raises UserError for an unknown kind, T < 1, or betas outside (0, 1).
    """
    schedule = BETA_SCHEDULES.get(kind)
    if num_timesteps < 1:
        raise UserError(f"num_timesteps must be positive, got {num_timesteps}")
    betas = np.asarray(schedule(num_timesteps, beta_start, beta_end), np.float64)
    if betas.shape != (num_timesteps,) or not np.all((betas > 0) & (betas < 1)):
        raise UserError(
            f"the {kind} schedule with beta_start={beta_start}, beta_end={beta_end} gives betas "
            f"in [{betas.min():.3g}, {betas.max():.3g}]; every beta must lie in (0, 1)")
    return betas


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_t in float64, from `log_alphas_cumprod`."""
    return np.exp(log_alphas_cumprod(betas))


def log_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """log(abar_t) = sum_{s<=t} log(1 - beta_s) in float64: the one place the cumulative alphas
    are computed (a difference of two close abar loses its digits in float32, so samplers
    derive their coefficients from this, on the host)."""
    return np.cumsum(np.log1p(-np.asarray(betas, np.float64)))
