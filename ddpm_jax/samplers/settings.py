"""The sampler a run chooses: which one, how many steps, which spacing and its knobs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ddpm_jax.core.registry import check_choice
from ddpm_jax.samplers.base import SAMPLERS, Sampler
from ddpm_jax.samplers.guidance import Guidance
from ddpm_jax.samplers.spacing import SPACINGS, spacing_options


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """A sampler choice: `name` in `SAMPLERS`, `num_steps` (0: the sampler's default, all T
    for DDPM and DDIM), `spacing` (in `SPACINGS`; "auto": the sampler's default),
    `options`, the sampler's knobs (missing ones take its defaults), `spacing_options`, the
    spacing's (as the same), and the classifier-free `guidance` of a class-conditional model
    (`guidance.py`; scale 1: none)."""

    name: str = "ddpm"
    num_steps: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    spacing: str = "auto"
    guidance: Guidance = Guidance()
    spacing_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # The one place a sampler's and a spacing's knobs are resolved: given values, else
        # their defaults (a spacing's from the sampler options given too, as a config
        # section holds both).
        given = {**self.options, **self.spacing_options}
        object.__setattr__(self, "options", self.sampler.resolve_options(given))
        for key, choices in self.sampler.option_choices.items():
            check_choice(f"{self.name} option {key}", self.options[key], choices)
        spacing = self.sampler.resolve_spacing(self.spacing)
        defaults = spacing_options(spacing) if spacing in SPACINGS else {}
        object.__setattr__(self, "spacing_options",
                           {key: given.get(key, default) for key, default in defaults.items()})

    @classmethod
    def from_config(cls, section: Mapping[str, Any],
                    **overrides: Any) -> SamplerSettings:
        """The settings of a config section (`sampler`, `num_steps`, `spacing`, the
        sampler's option fields, `guidance_scale` and `guidance_interval`); `overrides` that
        are not None (command-line flags) replace its values."""
        values = {**dict(section), **{k: v for k, v in overrides.items() if v is not None}}
        name = values["sampler"]
        guidance = Guidance(values.get("guidance_scale", 1.0),
                            values.get("guidance_interval") or ())
        return cls(name=name, num_steps=values.get("num_steps") or 0, options=values,
                   spacing=values.get("spacing") or "auto", guidance=guidance)

    @property
    def sampler(self) -> Sampler:
        return SAMPLERS.get(self.name)

    def describe(self) -> dict[str, Any]:
        """For logs and JSON results (the step count and spacing as resolved; an infinite
        knob, such as heun's s_tmax, as the string "inf", which strict JSON can hold)."""
        sampler = self.sampler
        knobs = {key: value if not isinstance(value, float) or math.isfinite(value) else str(value)
                 for key, value in {**self.spacing_options, **self.options}.items()}
        return {"sampler": self.name, "num_steps": self.num_steps or sampler.default_steps,
                "spacing": sampler.resolve_spacing(self.spacing), **knobs,
                **(self.guidance.describe() if self.guidance.active else {})}

    def summary(self) -> str:
        """These settings as a person reads them: `ddim, 100 steps, logsnr spacing, eta=0.0`."""
        described = self.describe()
        steps = described.pop("num_steps")
        text = (f"{described.pop('sampler')}, {f'{steps} steps' if steps else 'every timestep'}, "
                f"{described.pop('spacing')} spacing")
        return ", ".join([text] + [f"{key}={value}" for key, value in described.items()])

