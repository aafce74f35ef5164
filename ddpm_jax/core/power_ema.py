"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", section 3 and appendix C).

A power-function EMA of exponent gamma averages the weights theta_tau of the steps so far
with a weight proportional to tau^gamma. Its update at step t (t = 1, 2, ...; t = 1 copies
the weights) is

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma + 1),

which gives theta_i the weight (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1): exactly the
integral over (i - 1, i] of the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma+1) on
[0, t]. Its length is said as sigma_rel, the profile's standard deviation over t:

    sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3)).

Training keeps EMAs of a few sigma_rels and snapshots them now and then. Any other profile
(another sigma_rel, at any snapshot's step) is then the combination of the snapshots whose
profiles come closest to it in L2 (least squares over the profiles' inner products), and
the same combination of the snapshots' weights is its EMA.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# sigma_rel of gamma = 0, the plain average of every step: the longest a power EMA can be.
MAX_SIGMA_REL = 1 / (2 * 3**0.5)


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the profile of exponent `gamma`."""
    return float(np.sqrt(gamma + 1) / ((gamma + 2) * np.sqrt(gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose profile has relative standard deviation `sigma_rel`: the largest
    real root of sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, that is of
    gamma^3 + 7 gamma^2 + (16 - 1/sigma_rel^2) gamma + 12 - 1/sigma_rel^2."""
    check_sigma_rel(sigma_rel)
    inverse_square = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def check_sigma_rel(sigma_rel: float) -> None:
    """Raises ValueError for a sigma_rel no power-function EMA has."""
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel {sigma_rel} is not in (0, {MAX_SIGMA_REL:.4f}]: the "
                         "longest power EMA (gamma 0, the mean of every step) has "
                         f"{MAX_SIGMA_REL:.4f}")


def beta(step: jnp.ndarray, gamma: float) -> jnp.ndarray:
    """The EMA's decay at `step` (the steps taken, counting this one): (1 - 1/t)^(gamma+1)."""
    t = jnp.asarray(step, jnp.float32)
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray,
                     gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = the integral over tau of p_{t_a, gamma_a}(tau) p_{t_b, gamma_b}(tau),
    broadcast over its arguments: with m = min(t_a, t_b),

        (gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1)
        / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1)),

    written with ratios of times at most 1, so large steps and exponents do not overflow."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    shorter = np.minimum(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (shorter / t_a) ** (gamma_a + 1) * (shorter / t_b) ** (gamma_b + 1) / shorter)


def reconstruction(steps: Sequence[int], sigma_rels: Sequence[float], step: int,
                   sigma_rel: float) -> tuple[np.ndarray, float]:
    """(coefficients, relative error) of the EMA of `sigma_rel` at `step` from snapshots:
    snapshot k is the EMA of `sigma_rels[k]` at `steps[k]`.

    The coefficients c minimise ||sum_k c_k p_k - p||, p the wanted profile (the normal
    equations A c = b, A_kl = <p_k, p_l>, b_k = <p_k, p>, solved by least squares, as A is
    ill-conditioned); the relative error is that minimum over ||p||, how far the wanted
    average of the weights is from what the snapshots can give.
    """
    times = np.asarray(steps, np.float64)
    gammas = np.asarray([gamma_of(s) for s in sigma_rels], np.float64)
    gamma = gamma_of(sigma_rel)
    gram = profile_products(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    target = profile_products(times, gammas, float(step), gamma)
    coefficients = np.linalg.lstsq(gram, target, rcond=None)[0]
    norm = float(profile_products(step, gamma, step, gamma))
    residual = coefficients @ gram @ coefficients - 2 * coefficients @ target + norm
    return coefficients, float(np.sqrt(max(residual, 0.0) / norm))
