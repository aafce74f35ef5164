"""Which timesteps a sampler visits: the timestep spacings, by name (`sample.spacing`).

A spacing is `fn(alphas_cumprod, num_steps) -> timesteps`: `num_steps` distinct integers in
[0, T), descending (the first is where sampling starts, the last the step before the
noise-free image), registered in `SPACINGS`. Every sampler takes any spacing; "auto" picks
the sampler's own default (`Sampler.default_spacing`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import Registry

Spacing = Callable[[np.ndarray, int], np.ndarray]
SPACINGS: Registry[Spacing] = Registry("spacing")


@SPACINGS.register("linspace")
def linspace(alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """Evenly spaced over [0, T - 1], both ends included (DDIM, Song et al. 2021, as in
    its "uniform" skip rounded to integers)."""
    count = len(alphas_cumprod)
    return np.round(np.linspace(0, count - 1, num_steps)).astype(np.int32)[::-1].copy()


@SPACINGS.register("leading")
def leading(alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """Multiples of T // num_steps from 0 (the original DDIM code and Stable Diffusion): the
    noisiest step visited is T - T // num_steps, not T - 1."""
    stride = len(alphas_cumprod) // num_steps
    return (np.arange(num_steps, dtype=np.int32) * stride)[::-1].copy()


@SPACINGS.register("trailing")
def trailing(alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """Evenly spaced down from T - 1 (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed"): sampling starts at the noisiest step; the last step visited
    is T / num_steps - 1."""
    count = len(alphas_cumprod)
    return np.round(np.arange(count, 0, -count / num_steps) - 1).astype(np.int32)[:num_steps]


@SPACINGS.register("logsnr")
def logsnr(alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """Uniform in log signal-to-noise ratio log(abar / (1 - abar)) from t = T - 1 to t = 0
    (the time-uniform-in-lambda steps of DPM-Solver, Lu et al. 2022), each rounded to the
    nearest timestep and pushed apart where two would coincide."""
    abar = np.asarray(alphas_cumprod, np.float64)
    count = len(abar)
    log_snr = np.log(abar) - np.log1p(-abar)  # decreasing in t
    grid = np.linspace(log_snr[-1], log_snr[0], num_steps)  # ascending: from T - 1 to 0
    times = np.interp(grid, log_snr[::-1], np.arange(count)[::-1].astype(np.float64))
    steps = np.round(times).astype(np.int64)[::-1]  # ascending in t
    for i in range(1, num_steps):  # distinct, upwards from the smallest
        steps[i] = max(steps[i], steps[i - 1] + 1)
    for i in range(num_steps - 1, -1, -1):  # and not past T - 1
        steps[i] = min(steps[i], count - num_steps + i)
    return steps[::-1].astype(np.int32)


def timesteps(spacing: str, alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """`num_steps` descending timesteps by `spacing`; ValueError for a count it cannot do."""
    count = len(alphas_cumprod)
    if not 1 <= num_steps <= count:
        raise UserError(f"num_steps must be in [1, {count}], got {num_steps}")
    steps = np.asarray(SPACINGS.get(spacing)(np.asarray(alphas_cumprod, np.float64), num_steps))
    if (steps.shape != (num_steps,) or np.any(np.diff(steps) >= 0) or steps.min() < 0
            or steps.max() >= count):
        raise UserError(f"the {spacing} spacing gives no {num_steps} distinct timesteps in "
                         f"[0, {count}); choose another spacing or num_steps")
    return steps.astype(np.int32)
