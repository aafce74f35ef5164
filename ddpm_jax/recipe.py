"""The diffusion recipe a config names (`config.diffusion`, and `config.data.augment`), as
the core's objects.

The core (`ddpm_jax.core`) takes plain values; this is where a config's `diffusion` section
becomes a `Schedule`, an `Objective` and the settings of the reverse process, its
augmentation `AugmentSettings`, and where those sections are checked before anything is
built.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ddpm_jax.core import augment, diffusion, edm, objectives, schedules
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice


def schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:
    """The noise schedule of `config.diffusion`."""
    d = config.diffusion
    return diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def objective(config: ml_collections.ConfigDict) -> objectives.Objective:
    """The training objective of `config.diffusion`."""
    return objectives.Objective.of(config.diffusion)


def is_edm(config: ml_collections.ConfigDict) -> bool:
    """Whether the net is trained with EDM's preconditioning and continuous noise levels."""
    return config.diffusion.get("formulation", "ddpm") == "edm"


def edm_settings(config: ml_collections.ConfigDict) -> edm.EDMSettings:
    """EDM's settings in `config.diffusion` (its defaults for fields a run lacks)."""
    defaults = edm.EDMSettings()._asdict()
    return edm.EDMSettings(**{key: float(config.diffusion.get(key, value))
                              for key, value in defaults.items()})


def preconditioning(config: ml_collections.ConfigDict) -> edm.Preconditioning:
    """The net as a denoiser in sigma (`core/edm.py`): on the discrete schedule, or EDM's."""
    if is_edm(config):
        return edm.EDMPreconditioning(edm_settings(config))
    d = config.diffusion
    betas = schedules.make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    return edm.DiscretePreconditioning(schedules.alphas_cumprod(betas), d.prediction)


def refuse_edm(config: ml_collections.ConfigDict, what: str) -> None:
    """Raises UserError when `config` is an EDM-formulation run, which `what` cannot take."""
    if is_edm(config):
        raise UserError(f"{what} needs a model of the discrete DDPM schedule (its timesteps and "
                        "posterior); this run was trained with diffusion.formulation='edm', "
                        "which has continuous noise levels")


def reverse_process(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """How the network's output is read when sampling (`prediction`, `variance`, `clip_x0`):
    keyword arguments of `samplers.reverse_plan` and `likelihood.bits_per_dim`."""
    d = config.diffusion
    return {"prediction": d.prediction, "variance": d.variance, "clip_x0": d.clip_x0}


def augment_settings(config: ml_collections.ConfigDict) -> augment.AugmentSettings | None:
    """The non-leaky augmentation of `config.data.augment` (None: off, probability 0)."""
    return augment.settings_of(config.data.augment)


def _check_augment(a: ml_collections.ConfigDict) -> None:
    if not 0.0 <= a.probability <= 1.0:
        raise UserError(f"data.augment.probability must be in [0, 1] (0: off; EDM uses 0.12 "
                        f"to 0.15), got {a.probability}")
    negative = [name for name in augment.TRANSFORMS if not a[name] >= 0]
    if negative:
        raise UserError(f"data.augment.{negative[0]}={a[negative[0]]}: a probability "
                        "multiplier must be >= 0 (0: off)")
    if a.probability and not any(a[name] > 0 for name in augment.TRANSFORMS):
        raise UserError(f"data.augment.probability={a.probability} with every transform's "
                        f"multiplier 0: turn one on (data.augment.{augment.TRANSFORMS[0]}=1, "
                        "...)")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the field when `config.diffusion` or `config.data.augment`
    cannot train or sample."""
    _check_augment(config.data.augment)
    d = config.diffusion
    check_choice("diffusion.formulation", d.formulation, edm.FORMULATIONS)
    if d.formulation == "edm":
        _check_edm(d)
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


def _check_edm(d: ml_collections.ConfigDict) -> None:
    """EDM's own fields, and the DDPM options it has no use for."""
    for field, value, wanted in (("loss", d.loss, "mse"), ("loss_weighting", d.loss_weighting,
                                                           "none")):
        if value != wanted:
            raise UserError(f"diffusion.formulation='edm' trains with EDM's weighted MSE; "
                            f"diffusion.{field}={value!r} does not apply: set it to {wanted!r}")
    if d.variance == "learned_range":
        raise UserError("diffusion.variance='learned_range' learns the variance of the discrete "
                        "chain's steps, which diffusion.formulation='edm' does not have; use "
                        "'fixed_large' (unused by EDM's samplers)")
    if not 0 < d.sigma_min < d.sigma_max:
        raise UserError(f"diffusion.sigma_min={d.sigma_min} and diffusion.sigma_max="
                        f"{d.sigma_max} must satisfy 0 < sigma_min < sigma_max (EDM: 0.002, 80)")
    if not d.sigma_data > 0 or not d.p_std > 0:
        raise UserError(f"diffusion.sigma_data={d.sigma_data} and diffusion.p_std={d.p_std} "
                        "must be positive (EDM: 0.5 and 1.2)")
