"""Which noise levels a sampler visits: the spacings, by name (`sample.spacing`).

A spacing is `fn(alphas_cumprod, num_steps, **options) -> timesteps`: `num_steps` distinct
integers in [0, T), descending (the first is where sampling starts, the last the step
before the noise-free image), registered in `SPACINGS`; its keyword-only arguments are its
options (fields of the sampling config section of the same name). Every sampler takes any
spacing; "auto" picks the sampler's own default (`Sampler.default_spacing`).

A model with continuous noise levels (`diffusion.formulation="edm"`) has no timesteps: a
spacing that serves it also registers `fn(sigma_min, sigma_max, num_steps, **options) ->
sigmas` (descending) in `CONTINUOUS_SPACINGS` under the same name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ddpm_jax.core import edm
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import Registry

Spacing = Callable[..., np.ndarray]
SPACINGS: Registry[Spacing] = Registry("spacing")
CONTINUOUS_SPACINGS: Registry[Spacing] = Registry("spacing (of a continuous-sigma model)")


def spacing_options(spacing: str) -> dict[str, Any]:
    """The options of `spacing` and their defaults (its keyword-only arguments)."""
    parameters = inspect.signature(SPACINGS.get(spacing)).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def distinct_descending(steps: np.ndarray, count: int) -> np.ndarray:
    """Rounded timesteps (descending, possibly repeated) pushed apart to distinct ones in
    [0, count), each moved as little as the ones below it allow."""
    steps = np.asarray(steps, np.int64)[::-1].copy()  # ascending in t
    num_steps = len(steps)
    for i in range(1, num_steps):  # distinct, upwards from the smallest
        steps[i] = max(steps[i], steps[i - 1] + 1)
    for i in range(num_steps - 1, -1, -1):  # and not past T - 1
        steps[i] = min(steps[i], count - num_steps + i)
    return steps[::-1].astype(np.int32)


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
    return distinct_descending(np.round(times), count)


@CONTINUOUS_SPACINGS.register("logsnr")
def logsnr_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Uniform in log sigma (log-SNR is -2 log sigma) from sigma_max to sigma_min."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_steps))


@SPACINGS.register("karras")
def karras(alphas_cumprod: np.ndarray, num_steps: int, *, rho: float = 7.0,
           sigma_min: float = 0.0, sigma_max: float = 0.0) -> np.ndarray:
    """EDM's grid (Karras et al. 2022, eq. 5): evenly spaced in sigma^(1/rho) between the
    schedule's smallest and largest sigma = sqrt((1 - abar) / abar) (narrowed to
    `sigma_min`/`sigma_max` where given), each rounded to the timestep of the nearest sigma
    (EDM's iDDPM wrapper) and pushed apart where two would coincide."""
    table = edm.discrete_sigmas(alphas_cumprod)
    low, high = edm.narrowed_range(table[0], table[-1], sigma_min, sigma_max)
    sigmas = edm.karras_sigmas(num_steps, low, high, rho)
    return distinct_descending(edm.nearest_timesteps(table, sigmas), len(table))


@CONTINUOUS_SPACINGS.register("karras")
def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, *, rho: float = 7.0
                  ) -> np.ndarray:
    """EDM's grid (eq. 5) between the model's sigma_min and sigma_max."""
    return edm.karras_sigmas(num_steps, sigma_min, sigma_max, rho)


def timesteps(spacing: str, alphas_cumprod: np.ndarray, num_steps: int,
              options: Mapping[str, Any] | None = None) -> np.ndarray:
    """`num_steps` descending timesteps by `spacing` with its `options` (missing ones: its
    defaults; others ignored); ValueError for a count it cannot do."""
    count = len(alphas_cumprod)
    if not 1 <= num_steps <= count:
        raise UserError(f"num_steps must be in [1, {count}], got {num_steps}")
    given = {key: value for key, value in (options or {}).items()
             if key in spacing_options(spacing)}
    steps = np.asarray(SPACINGS.get(spacing)(np.asarray(alphas_cumprod, np.float64), num_steps,
                                             **given))
    if (steps.shape != (num_steps,) or np.any(np.diff(steps) >= 0) or steps.min() < 0
            or steps.max() >= count):
        raise UserError(f"the {spacing} spacing gives no {num_steps} distinct timesteps in "
                         f"[0, {count}); choose another spacing or num_steps")
    return steps.astype(np.int32)


def sigmas(spacing: str, sigma_min: float, sigma_max: float, num_steps: int,
           options: Mapping[str, Any] | None = None) -> np.ndarray:
    """`num_steps` descending noise levels by `spacing` for a continuous-sigma model between
    `sigma_min` and `sigma_max` (narrowed by the options `sigma_min`/`sigma_max` where given)."""
    if spacing not in CONTINUOUS_SPACINGS:
        raise UserError(f"the {spacing} spacing picks timesteps of a discrete schedule; a model "
                        "trained with diffusion.formulation='edm' has continuous noise levels: "
                        f"use {' or '.join(CONTINUOUS_SPACINGS.names())}")
    if num_steps < 1:
        raise UserError(f"num_steps must be positive, got {num_steps}")
    options = dict(options or {})
    low, high = edm.narrowed_range(sigma_min, sigma_max, options.pop("sigma_min", 0.0),
                                   options.pop("sigma_max", 0.0))
    function = CONTINUOUS_SPACINGS.get(spacing)
    known = inspect.signature(function).parameters
    return np.asarray(function(low, high, num_steps,
                               **{k: v for k, v in options.items() if k in known}), np.float64)
