"""Samplers by name, the sampling engine, and the settings that choose a sampler
(docs/extending.md).

A sampler is one file that registers a `Sampler` in `SAMPLERS` (`base.py`); the engine
(`engine.py`) runs any of them as one loop over its steps. Which timesteps it visits is a
spacing (`spacing.py`), shared by every sampler. `SamplerSettings` (`settings.py`) is the
choice a run makes, read from a config section (`sample` or `eval`), with its
classifier-free guidance (`guidance.py`), which any sampler takes. Samplers import only
the core (`ddpm_jax.core`).
"""

from __future__ import annotations

from ddpm_jax.samplers import ddim, ddpm, dpm_solver, edm  # noqa: F401  (register the built-ins)
from ddpm_jax.samplers.base import SAMPLERS, Sampler, no_state
from ddpm_jax.samplers.engine import (
    ReversePlan,
    check_section,
    reverse_init,
    reverse_plan,
    reverse_result,
    reverse_steps,
    sample,
    sampling_sigmas,
    sampling_timesteps,
    sampling_variance,
    snapshot_slots,
)
from ddpm_jax.samplers.guidance import Guidance, guided
from ddpm_jax.samplers.settings import SamplerSettings
from ddpm_jax.samplers.spacing import CONTINUOUS_SPACINGS, SPACINGS

__all__ = ["CONTINUOUS_SPACINGS", "SAMPLERS", "SPACINGS", "Guidance", "ReversePlan", "Sampler",
           "SamplerSettings",
           "check_section", "guided", "no_state", "reverse_init", "reverse_plan",
           "reverse_result", "reverse_steps", "sample", "sampling_sigmas", "sampling_timesteps",
           "sampling_variance", "snapshot_slots"]
