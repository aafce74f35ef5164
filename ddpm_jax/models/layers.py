"""The layer implementations a network computes with, handed to it from outside.

A net builds its convolutions, norms, upsampling convs and attention blocks through
`Layers`, whose `LayerOps` say how each is computed. The defaults are Flax's and XLA's own
(`nnx.Conv` with `lax.conv_general_dilated`, `nnx.GroupNorm`, nearest x2 then a conv, the
attention block as written); faster implementations for one backend live in `ddpm_jax.ops`,
which picks them per config and passes them in (as the Flax ImageNet ResNet takes
`conv=`). Every implementation takes the same parameters, so a checkpoint does not depend
on which one computed it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Ho et al. initialise every layer with variance_scaling(1, fan_avg, uniform) and
# the last layer of each residual branch with (near) zero.
default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nnx.initializers.zeros_init()


def upsample_nearest2x(x: jax.Array) -> jax.Array:
    """NHWC nearest-neighbour x2 upsampling: each position repeated in a 2x2 block."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample_then_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """Nearest x2 upsampling of `x`, then `conv`'s own convolution (the definition every
    implementation of `LayerOps.upsample_conv` matches)."""
    return nnx.Conv.__call__(conv, upsample_nearest2x(x))


class UpsamplingConv(nnx.Conv):
    """A conv of the nearest x2 upsampling of its input (an `nnx.Conv`'s parameters); how it
    is computed is the `upsample_conv` it is given (by default, literally so)."""

    def __init__(self, *args, upsample_conv: Callable[[nnx.Conv, jax.Array], jax.Array],
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.upsample_conv = upsample_conv

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.upsample_conv(self, x)


@dataclasses.dataclass(frozen=True)
class LayerOps:
    """How a net's layers are computed; same parameters and (up to float rounding) values.

    conv_general_dilated: the convolution `nnx.Conv` calls (`lax.conv_general_dilated`'s
        signature).
    group_norm: the GroupNorm class (`nnx.GroupNorm`'s constructor and parameters).
    upsample_conv: `fn(conv, x)`: nearest x2 upsampling of `x` then `conv`.
    attention: the class of Ho et al.'s attention block (`blocks.DDPMAttention`'s constructor
        and parameters); None: `blocks.DDPMAttention` itself.
    """

    conv_general_dilated: Callable[..., jax.Array] = jax.lax.conv_general_dilated
    group_norm: type[nnx.GroupNorm] = nnx.GroupNorm
    upsample_conv: Callable[[nnx.Conv, jax.Array], jax.Array] = upsample_then_conv
    attention: type[nnx.Module] | None = None


class Layers:
    """Builds layers with the shared dtype, initialisers and `LayerOps` of one network."""

    def __init__(self, dtype: jnp.dtype, rngs: nnx.Rngs, ops: LayerOps | None = None,
                 norm_eps: float = 1e-6):
        self.dtype = dtype
        self.norm_eps = norm_eps
        self.rngs = rngs
        self.ops = ops or LayerOps()

    def conv(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, zero: bool = False,
             padding: tuple[int, int] | None = None) -> nnx.Conv:
        """A kernel x kernel conv, padded by (before, after) = `padding` on both spatial axes
        (default kernel // 2 on every side)."""
        before, after = padding or (kernel // 2, kernel // 2)
        return nnx.Conv(
            cin, cout, (kernel, kernel), strides=stride,
            padding=((before, after), (before, after)),
            dtype=self.dtype, kernel_init=zero_init if zero else default_init, rngs=self.rngs,
            conv_general_dilated=self.ops.conv_general_dilated,
        )

    def upsampling_conv(self, cin: int, cout: int) -> UpsamplingConv:
        """A 3x3 conv of the nearest x2 upsampling of its input."""
        return UpsamplingConv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                              kernel_init=default_init, rngs=self.rngs,
                              conv_general_dilated=self.ops.conv_general_dilated,
                              upsample_conv=self.ops.upsample_conv)

    def dense(self, cin: int, cout: int, zero: bool = False, bias: bool = True) -> nnx.Linear:
        return nnx.Linear(
            cin, cout, use_bias=bias, dtype=self.dtype,
            kernel_init=zero_init if zero else default_init, rngs=self.rngs,
        )

    def embed(self, num_embeddings: int, features: int) -> nnx.Embed:
        """A table of `num_embeddings` learned vectors (N(0, 1) at init, as torch's
        nn.Embedding)."""
        return nnx.Embed(num_embeddings, features, dtype=self.dtype,
                         embedding_init=nnx.initializers.normal(1.0), rngs=self.rngs)

    def group_norm(self, channels: int, groups: int) -> nnx.GroupNorm:
        return self.ops.group_norm(channels, num_groups=groups, epsilon=self.norm_eps,
                                   dtype=self.dtype, rngs=self.rngs)

    def layer_norm(self, channels: int) -> nnx.LayerNorm:
        return nnx.LayerNorm(channels, epsilon=1e-5, dtype=self.dtype, rngs=self.rngs)
