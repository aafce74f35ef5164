"""Classifier-free guidance (Ho & Salimans 2022) for every sampler, as a denoiser.

A guided run samples with `guided(denoise, labels, null_label, guidance)`: a `DenoiseFn`
like any other, so each registered sampler is guided without code of its own. At scale s
its output is the unconditional output plus s times the difference to the conditional one
(diffusers' convention: s = 1 is the conditional model, s = 0 the unconditional one),
both from one network call on a doubled batch. Guidance is linear in the network output,
so guiding the eps, x0 or v prediction is the same. With a learned-range variance only the
mean channels are guided; the variance values are the conditional model's. A guidance
interval (Kynkäänniemi et al. 2024) guides only at timesteps inside it; outside it the
conditional model runs alone, in one network call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from ddpm_jax.core.diffusion import DenoiseFn
from ddpm_jax.core.errors import UserError

# fn(x_t [B, ...], t [B], labels [B]) -> network output [B, ..., C or 2C]
ConditionalDenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Guidance:
    """`scale`: s above; `interval`: (first, last) timesteps, inclusive, where guidance
    applies (empty: every timestep)."""

    scale: float = 1.0
    interval: Sequence[int] = ()

    def __post_init__(self):
        object.__setattr__(self, "interval", tuple(int(t) for t in self.interval))
        if self.interval and (len(self.interval) != 2 or self.interval[0] > self.interval[1]):
            raise UserError(f"guidance_interval must be (first, last) timesteps with first <= "
                            f"last, or empty for every timestep; got {self.interval}")

    @property
    def active(self) -> bool:
        """Whether any network call needs the unconditional output."""
        return self.scale != 1.0

    def describe(self) -> dict:
        """For logs and JSON results."""
        return {"guidance_scale": self.scale,
                **({"guidance_interval": list(self.interval)} if self.interval else {})}


def combine(conditional: jax.Array, unconditional: jax.Array, scale: float | jax.Array,
            mean_channels: int) -> jax.Array:
    """The guided output: (1 - s) uncond + s cond on the first `mean_channels` channels (the
    prediction), the conditional output's on the rest (learned variance values). Written as
    this interpolation, s = 1 gives `conditional` and s = 0 `unconditional` exactly."""
    mean = ((1.0 - scale) * unconditional[..., :mean_channels]
            + scale * conditional[..., :mean_channels])
    return jnp.concatenate([mean, conditional[..., mean_channels:]], axis=-1)


def guided(denoise: ConditionalDenoiseFn, labels: jax.Array, null_label: int,
           guidance: Guidance) -> DenoiseFn:
    """`fn(x_t, t)`: `denoise` for class `labels` [B], guided by `guidance` (see the module).

    At s = 1 (or outside the interval) one call of the conditional model; at s = 0 without
    an interval one call of the unconditional one; else one call on a doubled batch.
    """
    null = jnp.full_like(labels, null_label)

    def conditional(x, t):
        return denoise(x, t, labels)

    if not guidance.active:
        return conditional
    if guidance.scale == 0.0 and not guidance.interval:
        return lambda x, t: denoise(x, t, null)

    def both(x, t, scale=guidance.scale):
        output = denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                         jnp.concatenate([labels, null]))
        cond, uncond = jnp.split(output, 2)
        return combine(cond, uncond, scale, x.shape[-1]).astype(cond.dtype)

    if not guidance.interval:
        return both
    first, last = guidance.interval

    def interval_guided(x, t):
        inside = (t >= first) & (t <= last)
        # s inside the interval, 1 (the conditional output, exactly) outside it; the doubled
        # call only when some example is inside (in a sampler's step, all or none are).
        scale = jnp.where(inside, guidance.scale, 1.0).reshape((-1,) + (1,) * (x.ndim - 1))
        return jax.lax.cond(jnp.any(inside), lambda x, t: both(x, t, scale), conditional, x, t)

    return interval_guided
