"""What a sampler is, and the table of samplers by name (`sample.sampler`, `eval.sampler`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ddpm_jax.core.registry import Registry
from ddpm_jax.samplers import spacing as spacings


def no_state(x: jax.Array) -> tuple:
    """The carry of a sampler that remembers nothing between steps."""
    del x
    return ()


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A reverse-diffusion sampler: what it does at each network call, and its defaults.

    A sampler works in one of two spaces (`space`):

    * "timestep": on x_t of a discrete schedule (DDPM, DDIM). `step` is `fn(schedule,
      model_output, x_t, t, t_prev, noise, state, *, prediction, variance, clip_x0,
      **options) -> (x_prev, state)`: one step from x_t at timesteps `t` [B] to `t_prev` [B]
      (-1: the final, noise-free image); `variance` names a fixed rule, or (learned range) is
      the network's variance values.
    * "sigma": on x = y + sigma n in EDM's terms (`core/edm.py`), so it serves every model,
      discrete or continuous. `plan_calls(sigmas, num_calls, round_sigma, **options)` turns
      the grid (descending sigmas, the last above 0) into its network calls, on the host:
      (the sigma of each call's input, a dict of per-call arrays, the std of x at the start).
      `step` is `fn(denoised, x, noise, state, *, coefficients, **options) -> (x, state)`,
      where `denoised` is D(x; sigma) of this call and `coefficients` this call's arrays
      (with "sigma"); `grid_size(num_calls)` is how many sigmas that many calls visit.

    In both, `noise` is fresh N(0, I) of x's shape, and every call of `step` follows one
    network call.
    init_state: `fn(x_T) -> pytree`, the sampler's own carry through the scan (for example the
        previous model outputs of a multistep solver); `no_state` for none.
    options: the sampler's knobs and their defaults (e.g. DDIM's ``eta``); the config's
        sampling sections (`sample`, `eval`) hold a field of the same name. A timestep
        sampler's ``variance`` knob is the engine's (`engine.sampling_variance`): the rule its
        steps get as `variance`.
    option_choices: the values a knob may take, where they are few (checked with the config).
    default_steps: the steps `num_steps=0` means (0: all T).
    default_spacing: the timestep spacing "auto" means (`spacing.SPACINGS`).
    prepare: optional `fn(schedule, steps, prev_steps) -> pytree of [S, ...] arrays`, run once
        on the host with the visited timesteps (NumPy, float64 work); row i reaches step i as
        the keyword argument `coefficients` (what a step would otherwise recompute in float32
        from the schedule, such as the posterior of a respaced chain).
    """

    step: Callable[..., tuple[jax.Array, Any]]
    init_state: Callable[[jax.Array], Any] = no_state
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    option_choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    default_steps: int = 0
    default_spacing: str = "linspace"
    prepare: Callable[..., Any] | None = None
    space: str = "timestep"
    plan_calls: Callable[..., tuple[np.ndarray, dict[str, np.ndarray], float]] | None = None
    grid_size: Callable[[int], int] = lambda num_calls: num_calls

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every knob of this sampler: its value in `given`, else its default; other keys of
        `given` are ignored."""
        return {key: given.get(key, default) for key, default in self.options.items()}

    def resolve_spacing(self, spacing: str | None) -> str:
        """`spacing`, with "auto" (or None) meaning this sampler's default."""
        return self.default_spacing if spacing in (None, "", "auto") else spacing

    def num_calls(self, num_steps: int, num_timesteps: int) -> int:
        """The network calls `num_steps` means (0: `default_steps`, or all T)."""
        return num_steps or self.default_steps or num_timesteps

    def timesteps(self, alphas_cumprod: np.ndarray, num_steps: int = 0,
                  spacing: str | None = "auto",
                  spacing_options: Mapping[str, Any] | None = None) -> np.ndarray:
        """The descending timesteps visited with `num_steps` network calls (0:
        `default_steps`, or all T) by `spacing` ("auto": `default_spacing`) of a discrete
        schedule; ValueError for a count it cannot do."""
        calls = self.num_calls(num_steps, len(alphas_cumprod))
        return spacings.timesteps(self.resolve_spacing(spacing), alphas_cumprod,
                                  self.grid_size(calls), spacing_options)


SAMPLERS: Registry[Sampler] = Registry("sampler")
