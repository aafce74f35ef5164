"""Samplers by name, and the settings that choose one (README, "Extending").

A sampler is one file that registers a `Sampler` in `SAMPLERS`; `diffusion.sample` runs any
of them as one `lax.scan`. `SamplerSettings` is the choice a run makes: which sampler, how
many steps and the sampler's knobs, read from a config section (`sample` or `eval`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax.registry import check_choice
from ddpm_jax.samplers import ddim, ddpm  # noqa: F401  (register the built-in samplers)
from ddpm_jax.samplers.base import SAMPLERS, Sampler, evenly_spaced, no_state


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """A sampler choice: `name` in `SAMPLERS`, `num_steps` (0: the sampler's default, all T
    for DDPM and DDIM) and `options`, the sampler's knobs (missing ones take its defaults)."""

    name: str = "ddpm"
    num_steps: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict | Mapping[str, Any],
                    **overrides: Any) -> SamplerSettings:
        """The settings of a config section (`sampler`, `num_steps` and the sampler's option
        fields); `overrides` that are not None (command-line flags) replace its values."""
        values = {**dict(section), **{k: v for k, v in overrides.items() if v is not None}}
        name = values["sampler"]
        return cls(name=name, num_steps=values.get("num_steps") or 0,
                   options=SAMPLERS.get(name).resolve_options(values))

    @property
    def sampler(self) -> Sampler:
        return SAMPLERS.get(self.name)

    def describe(self) -> dict[str, Any]:
        """For logs and JSON results."""
        return {"sampler": self.name, "num_steps": self.num_steps,
                **self.sampler.resolve_options(self.options)}




def check_section(section: ml_collections.ConfigDict, prefix: str,
                  num_timesteps: int) -> np.ndarray:
    """The timesteps the sampler a config section chooses visits; ValueError naming
    `prefix`.* when it cannot run."""
    check_choice(f"{prefix}.sampler", section.sampler, SAMPLERS.names())
    settings = SamplerSettings.from_config(section)
    try:
        return settings.sampler.timesteps(num_timesteps, settings.num_steps)
    except ValueError as error:
        raise ValueError(f"{prefix}.*: {error}") from error


__all__ = ["SAMPLERS", "Sampler", "SamplerSettings", "evenly_spaced", "check_section", "no_state"]
