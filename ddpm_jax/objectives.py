"""The training objective: the simple regression loss, its weighting over timesteps, and the
variational-bound term that trains learned variances (Nichol & Dhariwal 2021).

Per example: L = w(t) * L_simple + vlb_weight * T * L_vlb(t) with
  * L_simple: the `diffusion.loss` (MSE, L1, Huber) between the network's prediction and its
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

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import diffusion, likelihood


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
               settings: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array | None]:
    """(loss [B], L_vlb(t) [B] in bits/dim or None) for `settings` = `config.diffusion`."""
    model_output, values = diffusion.split_output(network_output, settings.variance)
    target = diffusion.prediction_target(schedule, settings.prediction, x0, t, noise)
    loss = diffusion.regression_loss(model_output, target, settings.loss)
    if settings.loss_weighting == "min_snr":
        loss = loss * min_snr_weight(schedule, t, settings.prediction, settings.min_snr_gamma)
    if values is None:
        return loss, None
    frozen = jnp.concatenate([jax.lax.stop_gradient(model_output), values], axis=-1)
    vlb = likelihood.vb_term_bpd(schedule, frozen, x0, x_t, t, prediction=settings.prediction,
                                 variance=settings.variance, clip_x0=False)
    return loss + settings.vlb_weight * schedule.num_timesteps * vlb, vlb
