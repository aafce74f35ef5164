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
    """A reverse-diffusion sampler: one step between two timesteps, and its defaults.

    step: `fn(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance,
        clip_x0, **options) -> (x_prev, state)`: one step from x_t at timesteps `t` [B] to
        `t_prev` [B] (-1: the final, noise-free image); `noise` is fresh N(0, I) of x_t's shape;
        `variance` names a fixed rule, or (learned range) is the network's variance values.
    init_state: `fn(x_T) -> pytree`, the sampler's own carry through the scan (for example the
        previous model outputs of a multistep solver); `no_state` for none.
    options: the sampler's knobs and their defaults (e.g. DDIM's ``eta``); the config's
        sampling sections (`sample`, `eval`) hold a field of the same name.
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
    default_steps: int = 0
    default_spacing: str = "linspace"
    prepare: Callable[..., Any] | None = None

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every knob of this sampler: its value in `given`, else its default; other keys of
        `given` are ignored."""
        return {key: given.get(key, default) for key, default in self.options.items()}

    def resolve_spacing(self, spacing: str | None) -> str:
        """`spacing`, with "auto" (or None) meaning this sampler's default."""
        return self.default_spacing if spacing in (None, "", "auto") else spacing

    def timesteps(self, alphas_cumprod: np.ndarray, num_steps: int = 0,
                  spacing: str | None = "auto") -> np.ndarray:
        """The descending timesteps visited with `num_steps` (0: `default_steps`, or all T)
        by `spacing` ("auto": `default_spacing`); ValueError for a count it cannot do."""
        count = num_steps or self.default_steps or len(alphas_cumprod)
        return spacings.timesteps(self.resolve_spacing(spacing), alphas_cumprod, count)


SAMPLERS: Registry[Sampler] = Registry("sampler")
