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
        options = SAMPLERS.get(name).options
        return cls(name=name, num_steps=values.get("num_steps") or 0,
                   options={key: values.get(key, default) for key, default in options.items()})

    @property
    def sampler(self) -> Sampler:
        return SAMPLERS.get(self.name)

    def resolved_options(self) -> dict[str, Any]:
        """Every knob of the sampler: the given ones, the sampler's defaults for the rest."""
        defaults = self.sampler.options
        return {key: self.options.get(key, default) for key, default in defaults.items()}

    def describe(self) -> dict[str, Any]:
        """For logs and JSON results."""
        return {"sampler": self.name, "num_steps": self.num_steps, **self.resolved_options()}




def check_section(section: ml_collections.ConfigDict, prefix: str, num_timesteps: int) -> None:
    """Raises ValueError naming `prefix`.* when the sampler a config section chooses cannot run."""
    if section.sampler not in SAMPLERS:
        raise ValueError(f"unknown {prefix}.sampler={section.sampler!r}; choose one of "
                         f"{', '.join(SAMPLERS.names())}")
    settings = SamplerSettings.from_config(section)
    try:
        settings.sampler.timesteps(num_timesteps, settings.num_steps)
    except ValueError as error:
        raise ValueError(f"{prefix}.*: {error}") from error


__all__ = ["SAMPLERS", "Sampler", "SamplerSettings", "evenly_spaced", "check_section", "no_state"]
