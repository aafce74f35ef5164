"""Samplers by name, and the settings that choose one (README, "Extending").

A sampler is one file that registers a `Sampler` in `SAMPLERS`; `diffusion.sample` runs any
of them as one `lax.scan`. Which timesteps it visits is a spacing (`spacing.py`), shared by
every sampler. `SamplerSettings` is the choice a run makes: which sampler, how many steps,
which spacing and the sampler's knobs, read from a config section (`sample` or `eval`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax.registry import check_choice
from ddpm_jax.samplers import ddim, ddpm, dpm_solver  # noqa: F401  (register the built-ins)
from ddpm_jax.samplers.base import SAMPLERS, Sampler, no_state
from ddpm_jax.samplers.spacing import SPACINGS


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """A sampler choice: `name` in `SAMPLERS`, `num_steps` (0: the sampler's default, all T
    for DDPM and DDIM), `spacing` (in `SPACINGS`; "auto": the sampler's default) and
    `options`, the sampler's knobs (missing ones take its defaults)."""

    name: str = "ddpm"
    num_steps: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    spacing: str = "auto"

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict | Mapping[str, Any],
                    **overrides: Any) -> SamplerSettings:
        """The settings of a config section (`sampler`, `num_steps`, `spacing` and the
        sampler's option fields); `overrides` that are not None (command-line flags) replace
        its values."""
        values = {**dict(section), **{k: v for k, v in overrides.items() if v is not None}}
        name = values["sampler"]
        return cls(name=name, num_steps=values.get("num_steps") or 0,
                   options=SAMPLERS.get(name).resolve_options(values),
                   spacing=values.get("spacing") or "auto")

    @property
    def sampler(self) -> Sampler:
        return SAMPLERS.get(self.name)

    def describe(self) -> dict[str, Any]:
        """For logs and JSON results (the step count and spacing as resolved)."""
        sampler = self.sampler
        return {"sampler": self.name, "num_steps": self.num_steps or sampler.default_steps,
                "spacing": sampler.resolve_spacing(self.spacing),
                **sampler.resolve_options(self.options)}

    def summary(self) -> str:
        """These settings as a person reads them: `ddim, 100 steps, logsnr spacing, eta=0.0`."""
        described = self.describe()
        steps = described.pop("num_steps")
        text = (f"{described.pop('sampler')}, {f'{steps} steps' if steps else 'every timestep'}, "
                f"{described.pop('spacing')} spacing")
        return ", ".join([text] + [f"{key}={value}" for key, value in described.items()])

    def sample_kwargs(self) -> dict[str, Any]:
        """These settings as keyword arguments of `diffusion.sample`."""
        return {"sampler": self.name, "num_steps": self.num_steps, "spacing": self.spacing,
                "options": dict(self.options)}


def check_section(section: ml_collections.ConfigDict, prefix: str,
                  alphas_cumprod: np.ndarray) -> np.ndarray:
    """The timesteps the sampler a config section chooses visits; ValueError naming
    `prefix`.* when it cannot run."""
    check_choice(f"{prefix}.sampler", section.sampler, SAMPLERS.names())
    settings = SamplerSettings.from_config(section)
    spacing = settings.sampler.resolve_spacing(settings.spacing)
    check_choice(f"{prefix}.spacing", spacing, SPACINGS.names())
    try:
        return settings.sampler.timesteps(alphas_cumprod, settings.num_steps, spacing)
    except ValueError as error:
        raise ValueError(f"{prefix}.*: {error}") from error


__all__ = ["SAMPLERS", "SPACINGS", "Sampler", "SamplerSettings", "check_section", "no_state"]
