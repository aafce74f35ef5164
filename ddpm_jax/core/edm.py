"""The EDM view of a diffusion model (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): noise levels sigma, the denoiser D(x; sigma), its
preconditioning (Table 1), the Karras sigma grid (eq. 5) and EDM's training loss.

In this view x = y + sigma * n for clean data y, and the denoiser is

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

for the raw network F. Two kinds of model fit it:

  * `DiscretePreconditioning`: a net trained with a discrete DDPM schedule (every run with
    `diffusion.formulation="ddpm"` and every imported diffusers model). Its x_t is
    sqrt(abar) x with sigma = sqrt((1 - abar) / abar); it only knows the T sigmas of its table
    (EDM's iDDPM wrapper), so every sigma is rounded to the nearest of them, and c_noise is
    that sigma's timestep. c_skip and c_out follow from its prediction target (eps, x0, v).
  * `EDMPreconditioning`: a net trained with EDM's own preconditioning (`formulation="edm"`),
    at any sigma: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, with sd = sigma_data.

The samplers that work in sigma (`samplers/edm.py`, `samplers/dpm_solver.py`) take either.
Host-side quantities are float64 NumPy; the loss is traced JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core.errors import UserError

FORMULATIONS = ("ddpm", "edm")


class EDMSettings(NamedTuple):
    """EDM's training and noise-level settings (the `diffusion` config fields of the same
    names; EDM's defaults)."""

    sigma_data: float = 0.5  # std of the data
    sigma_min: float = 0.002  # the noise levels a model samples between
    sigma_max: float = 80.0
    p_mean: float = -1.2  # ln(sigma) ~ N(p_mean, p_std^2) in training
    p_std: float = 1.2

    @classmethod
    def of(cls, section) -> EDMSettings:
        return cls(**{field: float(section[field]) for field in cls._fields})


def edm_coefficients(sigma: Any, sigma_data: float) -> tuple[Any, Any, Any]:
    """(c_skip, c_out, c_in) of EDM's preconditioning (Table 1) at `sigma` (NumPy or JAX)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total**0.5, 1.0 / total**0.5


def discrete_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of a discrete schedule, ascending in t."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - abar) / abar)


def nearest_timesteps(table: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """For each of `sigma`, the timestep whose sigma in `table` (ascending in t) is nearest
    (EDM's `round_sigma` for the nets of a discrete schedule)."""
    sigma = np.asarray(sigma, np.float64)
    return np.abs(sigma[..., None] - table).argmin(-1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class DiscretePreconditioning:
    """A net trained on the discrete schedule with cumulative alphas `alphas_cumprod`,
    predicting `prediction` (eps, x0 or v), as a denoiser in sigma."""

    alphas_cumprod: np.ndarray
    prediction: str = "eps"
    continuous = False

    @property
    def sigmas(self) -> np.ndarray:
        return discrete_sigmas(self.alphas_cumprod)

    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(self.sigmas[0]), float(self.sigmas[-1])

    def timesteps(self, sigma: np.ndarray) -> np.ndarray:
        """The timestep whose sigma is nearest each of `sigma` (EDM's `round_sigma`)."""
        return nearest_timesteps(self.sigmas, sigma)

    def round(self, sigma: np.ndarray) -> np.ndarray:
        return self.sigmas[self.timesteps(sigma)]

    def coefficients(self, sigma: np.ndarray) -> dict[str, np.ndarray]:
        """c_skip, c_out, c_in and the net's time input (the timestep) at table sigmas."""
        sigma = np.asarray(sigma, np.float64)
        abar = 1.0 / (1.0 + sigma**2)  # x_t = sqrt(abar) x
        c_skip, c_out = {"eps": (np.ones_like(sigma), -sigma),
                         "x0": (np.zeros_like(sigma), np.ones_like(sigma)),
                         "v": (abar, -sigma * np.sqrt(abar))}[self.prediction]
        return {"c_skip": c_skip, "c_out": c_out, "c_in": np.sqrt(abar),
                "c_noise": self.timesteps(sigma)}


@dataclasses.dataclass(frozen=True)
class EDMPreconditioning:
    """A net trained with EDM's preconditioning, a denoiser at any sigma in its range."""

    settings: EDMSettings = EDMSettings()
    continuous = True

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.settings.sigma_min, self.settings.sigma_max

    def round(self, sigma: np.ndarray) -> np.ndarray:
        return np.asarray(sigma, np.float64)

    def coefficients(self, sigma: np.ndarray) -> dict[str, np.ndarray]:
        sigma = np.asarray(sigma, np.float64)
        c_skip, c_out, c_in = edm_coefficients(sigma, self.settings.sigma_data)
        with np.errstate(divide="ignore"):  # sigma 0 is never a network input
            c_noise = np.log(sigma) / 4.0
        return {"c_skip": c_skip, "c_out": c_out, "c_in": c_in, "c_noise": c_noise}


Preconditioning = DiscretePreconditioning | EDMPreconditioning


def karras_sigmas(num_sigmas: int, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> np.ndarray:
    """EDM eq. (5): `num_sigmas` noise levels from sigma_max down to sigma_min, evenly spaced
    in sigma^(1/rho) (rho = 7 spends more of them at low noise)."""
    if num_sigmas == 1:
        return np.array([sigma_max], np.float64)
    ramp = np.linspace(0.0, 1.0, num_sigmas)
    low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (high + ramp * (low - high)) ** rho


def narrowed_range(low: float, high: float, sigma_min: float = 0.0,
                   sigma_max: float = 0.0) -> tuple[float, float]:
    """[low, high] narrowed to `sigma_min`/`sigma_max` where they are given (0: not)."""
    narrow_low = max(low, sigma_min) if sigma_min else low
    narrow_high = min(high, sigma_max) if sigma_max else high
    if not 0 < narrow_low < narrow_high:
        raise UserError(f"sigma_min={sigma_min} and sigma_max={sigma_max} leave no noise levels "
                        f"in the model's range [{low:.4g}, {high:.4g}]; choose values with "
                        "0 <= sigma_min < sigma_max inside it (0: the model's own)")
    return narrow_low, narrow_high


def training_sigma(key: jax.Array, settings: EDMSettings) -> jax.Array:
    """One training noise level: ln(sigma) ~ N(P_mean, P_std^2) (EDM, section 5)."""
    return jnp.exp(settings.p_mean + settings.p_std * jax.random.normal(key, (), jnp.float32))


def loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the loss of the raw
    network's output unit-weighted at every sigma (EDM, section 5)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def network_inputs(x_noisy: jax.Array, sigma: jax.Array, settings: EDMSettings
                   ) -> tuple[jax.Array, jax.Array]:
    """(c_in x, c_noise) per example: what the raw network sees."""
    _, _, c_in = edm_coefficients(sigma, settings.sigma_data)
    return _per_example(c_in, x_noisy) * x_noisy, jnp.log(sigma) / 4.0


def loss(network_output: jax.Array, x_noisy: jax.Array, x0: jax.Array, sigma: jax.Array,
         settings: EDMSettings) -> jax.Array:
    """EDM's loss per example: lambda(sigma) |D(x; sigma) - y|^2, averaged over the pixels
    (EDM sums them; the mean keeps the scale of the DDPM losses)."""
    c_skip, c_out, _ = edm_coefficients(sigma, settings.sigma_data)
    denoised = (_per_example(c_skip, x_noisy) * x_noisy
                + _per_example(c_out, x_noisy) * network_output.astype(jnp.float32))
    squared = jnp.square(denoised - x0)
    return loss_weight(sigma, settings.sigma_data) * jnp.mean(
        squared, axis=tuple(range(1, squared.ndim)))


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def optimal_gaussian_network(preconditioning: EDMPreconditioning, mean: float, std: float):
    """The raw network F whose denoiser is the exact E[y | x] for data ~ N(mean, std^2) in
    every dimension: the oracle of an EDM-formulation model, for tests and benchmarks."""
    sigma_data = preconditioning.settings.sigma_data

    def network(x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
        sigma = jnp.exp(4.0 * c_noise.astype(jnp.float32))
        sigma = sigma.reshape(sigma.shape + (1,) * (x_in.ndim - sigma.ndim))
        c_skip, c_out, c_in = edm_coefficients(sigma, sigma_data)
        x = x_in / c_in
        denoised = mean + std**2 / (std**2 + sigma**2) * (x - mean)
        return (denoised - c_skip * x) / c_out

    return network
