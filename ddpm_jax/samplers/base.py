"""What a sampler is, and the table of samplers by name (`sample.sampler`, `eval.sampler`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ddpm_jax.registry import Registry


def no_state(x: jax.Array) -> tuple:
    """The carry of a sampler that remembers nothing between steps."""
    del x
    return ()


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A reverse-diffusion sampler: which timesteps it visits and one step between two.

    timesteps: `fn(num_timesteps, num_steps) -> int array`, the descending timesteps visited
        (`num_steps` 0 means the sampler's default); raises ValueError for a count it cannot do.
    step: `fn(schedule, model_output, x_t, t, t_prev, noise, state, *, prediction, variance,
        clip_x0, **options) -> (x_prev, state)`: one step from x_t at timesteps `t` [B] to
        `t_prev` [B] (-1: the final, noise-free image); `noise` is fresh N(0, I) of x_t's shape.
    init_state: `fn(x_T) -> pytree`, the sampler's own carry through the scan (for example the
        previous model outputs of a multistep solver); `no_state` for none.
    options: the sampler's knobs and their defaults (e.g. DDIM's ``eta``); the config's
        sampling sections (`sample`, `eval`) hold a field of the same name.
    """

    timesteps: Callable[[int, int], np.ndarray]
    step: Callable[..., tuple[jax.Array, Any]]
    init_state: Callable[[jax.Array], Any] = no_state
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every knob of this sampler: its value in `given`, else its default; other keys of
        `given` are ignored."""
        return {key: given.get(key, default) for key, default in self.options.items()}


SAMPLERS: Registry[Sampler] = Registry("sampler")


def evenly_spaced(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` timesteps evenly spaced over [0, T), descending (0 or None: all T)."""
    num_steps = num_steps or num_timesteps
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    steps = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)
    return steps[::-1].copy()
