"""GroupNorm for channels-last maps, with statistics summed channel rows first.

`nnx.GroupNorm` reduces over the positions and a group's channels in one strided reduction
(the channel axis split into [groups, group_size]), which XLA:CPU runs at a fraction of its
memory bandwidth, and its gradient repeats that pattern. Here every mean over a group is
summed in two stages: per channel over the positions (contiguous rows of C), then over the
group's channels (a tiny [B, G, C/G] sum). Group statistics go back onto the channels by
a product with a one-hot [G, C] matrix (`_per_channel`). The gradient is the closed form of
GroupNorm's backward pass with the same two-stage sums (a custom VJP), so the train step does
not inherit autodiff's reductions over the split channel axis.

Same parameters and, up to float rounding, the same outputs and gradients as `nnx.GroupNorm`
(`tests/test_group_norm.py` checks both). Like Flax, statistics are float32 and the variance is
E[x^2] - E[x]^2 clamped at 0, whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx


def _per_channel(per_group: jax.Array, group_size: int) -> jax.Array:
    """[B, G] -> [B, G * group_size]: each group's value on each of its channels.

    A product with a one-hot [G, C] matrix rather than `jnp.repeat`: the same values (each
    output is one value times 1 plus zeros; full precision on every backend), computed once
    into a small [B, C] array, where XLA:CPU fused the repeat's per-element index arithmetic
    into every consumer (docs/performance-notes.md).
    """
    num_groups = per_group.shape[-1]
    one_hot = jnp.repeat(jnp.eye(num_groups, dtype=per_group.dtype), group_size, axis=1)
    return jnp.dot(per_group, one_hot, precision=jax.lax.Precision.HIGHEST)


def _group_mean(values: jax.Array, num_groups: int) -> jax.Array:
    """Mean over the positions and each group's channels: [B, ..., C] -> [B, 1.., C].

    The result is broadcast back over each group's channels (and has size-1 position axes),
    ready to combine with `values`-shaped arrays.
    """
    batch, channels = values.shape[0], values.shape[-1]
    group_size = channels // num_groups
    per_channel = values.sum(tuple(range(1, values.ndim - 1)))  # [B, C]
    per_group = per_channel.reshape(batch, num_groups, group_size).sum(-1)
    mean = per_group / (math.prod(values.shape[1:-1]) * group_size)
    return _per_channel(mean, group_size).reshape(
        (batch,) + (1,) * (values.ndim - 2) + (channels,))


def _statistics(x: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """(mean, 1 / sqrt(variance + epsilon)) per example and group, broadcastable to x."""
    mean = _group_mean(x, num_groups)
    variance = jnp.maximum(_group_mean(jnp.square(x), num_groups) - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
    """GroupNorm of float32 channels-last `x` [B, ..., C] with per-channel scale and bias."""
    return _group_norm_forward(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_forward(x, scale, bias, num_groups, epsilon):
    """The output and what the backward pass needs (x, scale and the statistics)."""
    mean, inverse_std = _statistics(x, num_groups, epsilon)
    return (x - mean) * (inverse_std * scale) + bias, (x, scale, mean, inverse_std)


def _group_norm_backward(num_groups, epsilon, residuals, grad):
    """dx = r * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * scale, r = 1/std;
    d scale = sum(dy * x_hat), d bias = sum(dy) over the batch and positions."""
    x, scale, mean, inverse_std = residuals
    normalized = (x - mean) * inverse_std
    scaled_grad = grad * scale
    grad_x = inverse_std * (scaled_grad - _group_mean(scaled_grad, num_groups)
                            - normalized * _group_mean(scaled_grad * normalized, num_groups))
    axes = tuple(range(x.ndim - 1))
    return grad_x, (grad * normalized).sum(axes), grad.sum(axes)


group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm(nnx.GroupNorm):
    """`nnx.GroupNorm` (same constructor and parameters) computed by `group_norm`.

    Falls back to Flax's own computation for what `group_norm` does not cover: masks,
    explicit reduction axes, cross-device axis names, the two-pass variance, or a missing
    scale or bias.
    """

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if (mask is not None or self.reduction_axes is not None or self.axis_name is not None
                or not self.use_fast_variance or self.scale is None or self.bias is None
                or x.ndim < 3):
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]),
                                            dtype=self.dtype)
        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
        y = group_norm(x.astype(stats_dtype), scale.astype(stats_dtype),
                       bias.astype(stats_dtype), self.num_groups, self.epsilon)
        return y.astype(self.dtype or x.dtype)
