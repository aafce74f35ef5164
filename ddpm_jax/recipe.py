"""The diffusion recipe a config names (`config.diffusion`), as the core's objects.

The core (`ddpm_jax.core`) takes plain values; this is where a config's `diffusion` section
becomes a `Schedule`, an `Objective` and the settings of the reverse process, and where that
section is checked before anything is built.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ddpm_jax.core import diffusion, objectives, schedules
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice


def schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:
    """The noise schedule of `config.diffusion`."""
    d = config.diffusion
    return diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def objective(config: ml_collections.ConfigDict) -> objectives.Objective:
    """The training objective of `config.diffusion`."""
    return objectives.Objective.of(config.diffusion)


def reverse_process(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """How the network's output is read when sampling (`prediction`, `variance`, `clip_x0`):
    keyword arguments of `samplers.reverse_plan` and `likelihood.bits_per_dim`."""
    d = config.diffusion
    return {"prediction": d.prediction, "variance": d.variance, "clip_x0": d.clip_x0}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the field when `config.diffusion` cannot train or sample."""
    d = config.diffusion
    for field, value, choices in (("prediction", d.prediction, diffusion.PREDICTIONS),
                                  ("loss", d.loss, objectives.LOSSES),
                                  ("variance", d.variance, diffusion.VARIANCES),
                                  ("loss_weighting", d.loss_weighting, objectives.LOSS_WEIGHTINGS)):
        check_choice(f"diffusion.{field}", value, choices)
    if not d.min_snr_gamma > 0:
        raise UserError(f"diffusion.min_snr_gamma must be positive, got {d.min_snr_gamma}")
    if not d.vlb_weight >= 0:
        raise UserError(f"diffusion.vlb_weight must be >= 0, got {d.vlb_weight}")
    if not 0 < d.beta_start <= d.beta_end < 1:
        raise UserError(
            f"diffusion.beta_start={d.beta_start} and diffusion.beta_end={d.beta_end} must "
            "satisfy 0 < beta_start <= beta_end < 1 (noise grows along the chain; Ho et al.: "
            "1e-4 and 0.02)")
    try:
        schedules.make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    except ValueError as error:
        raise UserError(f"diffusion.*: {error}") from error
