"""The training objective: the simple regression loss, its weighting over timesteps, and the
variational-bound term that trains learned variances (Nichol & Dhariwal 2021).

Per example: L = w(t) * L_simple + vlb_weight * T * L_vlb(t) with
  * L_simple: the `loss` (MSE, L1, Huber) between the network's prediction and its
    target (eps, x0 or v);
  * w(t): 1, or min-SNR-gamma (Hang et al. 2023): min(SNR_t, gamma) over the target's own
    SNR factor, i.e. min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and
    min(SNR, gamma) / (SNR + 1) for v, with SNR_t = abar_t / (1 - abar_t);
  * L_vlb(t): the bound's term at t in bits/dim (`likelihood.vb_term_bpd`) with the mean
    held fixed (stop-gradient), so only the variance output learns from it; only with
    `diffusion.variance="learned_range"`. T * L_vlb(t) estimates the whole bound, so
    vlb_weight = 0.001 is the paper's lambda.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax.core import diffusion, likelihood
from ddpm_jax.core.registry import check_choice

PREDICTIONS = diffusion.PREDICTIONS
LOSSES = ("mse", "l1", "huber")
LOSS_WEIGHTINGS = ("none", "min_snr")


class Objective(NamedTuple):
    """What a network is trained on (the fields of `config.diffusion` of the same names)."""

    prediction: str = "eps"
    loss: str = "mse"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    variance: str = "fixed_small"
    vlb_weight: float = 0.001

    @classmethod
    def of(cls, section) -> Objective:
        """The objective a config section (or any mapping with these fields) names."""
        return cls(**{field: section[field] for field in cls._fields})


def regression_loss(prediction: jax.Array, target: jax.Array, loss_type: str = "mse") -> jax.Array:
    """Per-example loss, averaged over every non-batch axis."""
    check_choice("loss", loss_type, LOSSES)
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    if loss_type == "mse":
        elementwise = jnp.square(diff)
    elif loss_type == "l1":
        elementwise = jnp.abs(diff)
    else:  # Huber with delta 1, as torch.nn.functional.smooth_l1_loss.
        elementwise = jnp.where(jnp.abs(diff) < 1.0, 0.5 * jnp.square(diff), jnp.abs(diff) - 0.5)
    return jnp.mean(elementwise, axis=tuple(range(1, diff.ndim)))


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
    """Uniform training timesteps in [0, T)."""
    return jax.random.randint(rng, (batch_size,), 0, num_timesteps)


def signal_to_noise(schedule: diffusion.Schedule, t: jax.Array) -> jax.Array:
    """SNR_t = abar_t / (1 - abar_t) per example."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


def min_snr_weight(schedule: diffusion.Schedule, t: jax.Array, prediction: str,
                   gamma: float) -> jax.Array:
    """Per-example min-SNR-gamma weight of the loss on `prediction`'s target."""
    snr = signal_to_noise(schedule, t)
    clipped = jnp.minimum(snr, gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]


def loss_terms(schedule: diffusion.Schedule, network_output: jax.Array, x0: jax.Array,
               x_t: jax.Array, t: jax.Array, noise: jax.Array,
               settings: Objective) -> tuple[jax.Array, jax.Array | None]:
    """(loss [B], L_vlb(t) [B] in bits/dim or None) of the objective `settings`."""
    model_output, values = diffusion.split_output(network_output, settings.variance)
    target = diffusion.prediction_target(schedule, settings.prediction, x0, t, noise)
    loss = regression_loss(model_output, target, settings.loss)
    if settings.loss_weighting == "min_snr":
        loss = loss * min_snr_weight(schedule, t, settings.prediction, settings.min_snr_gamma)
    if values is None:
        return loss, None
    frozen = jnp.concatenate([jax.lax.stop_gradient(model_output), values], axis=-1)
    vlb = likelihood.vb_term_bpd(schedule, frozen, x0, x_t, t, prediction=settings.prediction,
                                 variance=settings.variance, clip_x0=False)
    return loss + settings.vlb_weight * schedule.num_timesteps * vlb, vlb
