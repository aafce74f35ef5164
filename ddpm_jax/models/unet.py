"""The denoising UNet (Flax NNX), configured entirely by `config.model`.

The layout is the one of Ho et al. (2020): a sinusoidal timestep embedding and a
two-layer MLP; per resolution level `num_res_blocks` residual blocks (each followed
by self-attention at the resolutions in `attention_resolutions`) and a stride-2
conv downsample; a middle of res/attention/res; an up path with
`num_res_blocks + 1` blocks per level fed with concatenated skips, nearest x2 +
conv upsampling; GroupNorm, SiLU and a zero-initialised conv to the output.

Attention comes in two styles, chosen by `attention_type`:
  * ``ddpm``: GroupNorm, single- or multi-head attention over the H*W positions,
    zero-initialised output projection, residual (Ho et al.);
  * ``transformer``: pre-LayerNorm multi-head attention and a GELU MLP, each with
    a residual (the block of the PyTorch project this trainer reimplements).

Inputs are NHWC. Parameters are float32; `dtype` sets the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_TYPES = ("ddpm", "transformer")

# Ho et al. initialise every layer with variance_scaling(1, fan_avg, uniform) and
# the last layer of each residual branch with (near) zero.
default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nnx.initializers.zeros_init()


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] of integer timesteps, as in the DDPM reference code."""
    half = dim // 2
    scale = math.log(max_period) / max(half - 1, 1)
    freqs = jnp.exp(-scale * jnp.arange(half, dtype=jnp.float32))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


class _Layers:
    """Builds layers with the shared dtype/initialiser settings of one network."""

    def __init__(self, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.rngs = rngs

    def conv(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, zero: bool = False):
        pad = kernel // 2
        return nnx.Conv(
            cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
            dtype=self.dtype, kernel_init=zero_init if zero else default_init, rngs=self.rngs,
        )

    def dense(self, cin: int, cout: int, zero: bool = False):
        return nnx.Linear(
            cin, cout, dtype=self.dtype, kernel_init=zero_init if zero else default_init,
            rngs=self.rngs,
        )

    def group_norm(self, channels: int, groups: int):
        if channels % groups:
            raise ValueError(
                f"model.norm_groups={groups} does not divide a layer width of {channels}; "
                "choose norm_groups that divides base_channels * every channel multiplier"
            )
        return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, dtype=self.dtype,
                             rngs=self.rngs)

    def layer_norm(self, channels: int):
        return nnx.LayerNorm(channels, epsilon=1e-5, dtype=self.dtype, rngs=self.rngs)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv, plus a projection of the time embedding, GroupNorm-SiLU-dropout-conv."""

    def __init__(self, cin: int, cout: int, temb_dim: int, *, dropout: float, norm_groups: int,
                 layers: _Layers):
        self.norm1 = layers.group_norm(cin, norm_groups)
        self.conv1 = layers.conv(cin, cout)
        self.temb_proj = layers.dense(temb_dim, cout)
        self.norm2 = layers.group_norm(cout, norm_groups)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = layers.conv(cout, cout, zero=True)
        self.skip = layers.dense(cin, cout) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
        h = nnx.silu(self.norm2(h))
        h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return x + h


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
    """Multi-head attention over [B, L, C] tokens via jax.nn.dot_product_attention."""
    b, length, channels = q.shape
    split = lambda a: a.reshape(b, length, num_heads, channels // num_heads)  # noqa: E731
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    return out.reshape(b, length, channels)


class DDPMAttention(nnx.Module):
    """GroupNorm, q/k/v projections, attention over positions, zero-init projection, residual."""

    def __init__(self, channels: int, *, num_heads: int, norm_groups: int, layers: _Layers):
        self.num_heads = num_heads
        self.norm = layers.group_norm(channels, norm_groups)
        self.q = layers.dense(channels, channels)
        self.k = layers.dense(channels, channels)
        self.v = layers.dense(channels, channels)
        self.proj_out = layers.dense(channels, channels, zero=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, channels = x.shape
        h = self.norm(x).reshape(b, height * width, channels)
        h = _attend(self.q(h), self.k(h), self.v(h), self.num_heads)
        return x + self.proj_out(h).reshape(x.shape)


class TransformerAttention(nnx.Module):
    """Pre-LayerNorm multi-head self-attention and GELU MLP, each with a residual."""

    def __init__(self, channels: int, *, num_heads: int, mlp_ratio: float, layers: _Layers):
        self.num_heads = num_heads
        self.norm1 = layers.layer_norm(channels)
        self.qkv = layers.dense(channels, 3 * channels)
        self.proj_out = layers.dense(channels, channels)
        self.norm2 = layers.layer_norm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp_in = layers.dense(channels, hidden)
        self.mlp_out = layers.dense(hidden, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, channels = x.shape
        h = x.reshape(b, height * width, channels)
        q, k, v = jnp.split(self.qkv(self.norm1(h)), 3, axis=-1)
        h = h + self.proj_out(_attend(q, k, v, self.num_heads))
        h = h + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(h)), approximate=False))
        return h.reshape(x.shape)


class Level(nnx.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then a resample."""

    def __init__(self, res_blocks: list, attn_blocks: list, resample: nnx.Module | None):
        self.res_blocks = nnx.List(res_blocks)
        self.attn_blocks = nnx.List(attn_blocks)
        self.resample = resample


class Downsample(nnx.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels: int, layers: _Layers):
        self.conv = layers.conv(channels, channels, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, layers: _Layers):
        self.conv = layers.conv(channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class UNet(nnx.Module):
    """DDPM UNet: `model(x [B,H,W,C], t [B] int) -> [B,H,W,out_channels]`.

    Pass `rngs` (with a `dropout` stream) when training; without it dropout is off.
    """

    def __init__(
        self,
        *,
        image_size: int,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        attention_type: str = "ddpm",
        num_heads: int = 1,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        norm_groups: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        validate_architecture(image_size, channel_mults, attention_resolutions, attention_type,
                              base_channels, num_heads)
        layers = _Layers(jnp.dtype(dtype), rngs)
        self.base_channels = base_channels
        temb_dim = 4 * base_channels

        def attention(channels: int):
            if attention_type == "ddpm":
                return DDPMAttention(channels, num_heads=num_heads, norm_groups=norm_groups,
                                     layers=layers)
            return TransformerAttention(channels, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                        layers=layers)

        def res_block(cin: int, cout: int):
            return ResBlock(cin, cout, temb_dim, dropout=dropout, norm_groups=norm_groups,
                            layers=layers)

        self.temb_dense1 = layers.dense(base_channels, temb_dim)
        self.temb_dense2 = layers.dense(temb_dim, temb_dim)
        self.conv_in = layers.conv(in_channels, base_channels)

        channels = base_channels
        skip_channels = [channels]
        down = []
        for level, mult in enumerate(channel_mults):
            resolution = image_size // 2**level
            res_blocks, attn_blocks = [], []
            for _ in range(num_res_blocks):
                res_blocks.append(res_block(channels, base_channels * mult))
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    attn_blocks.append(attention(channels))
                skip_channels.append(channels)
            last = level == len(channel_mults) - 1
            down.append(Level(res_blocks, attn_blocks, None if last else Downsample(channels, layers)))
            if not last:
                skip_channels.append(channels)
        self.down = nnx.List(down)

        self.mid_res1 = res_block(channels, channels)
        self.mid_attn = attention(channels)
        self.mid_res2 = res_block(channels, channels)

        up = []
        for level, mult in reversed(list(enumerate(channel_mults))):
            resolution = image_size // 2**level
            res_blocks, attn_blocks = [], []
            for _ in range(num_res_blocks + 1):
                res_blocks.append(res_block(channels + skip_channels.pop(), base_channels * mult))
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    attn_blocks.append(attention(channels))
            up.append(Level(res_blocks, attn_blocks, Upsample(channels, layers) if level else None))
        self.up = nnx.List(up)

        self.norm_out = layers.group_norm(channels, norm_groups)
        self.conv_out = layers.conv(channels, out_channels, zero=True)

    def __call__(self, x: jax.Array, t: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        temb = timestep_embedding(t, self.base_channels)
        temb = self.temb_dense2(nnx.silu(self.temb_dense1(temb)))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res_blocks):
                h = block(h, temb, rngs)
                if len(level.attn_blocks):
                    h = level.attn_blocks[i](h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_res1(h, temb, rngs)
        h = self.mid_attn(h)
        h = self.mid_res2(h, temb, rngs)

        for level in self.up:
            for i, block in enumerate(level.res_blocks):
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), temb, rngs)
                if len(level.attn_blocks):
                    h = level.attn_blocks[i](h)
            if level.resample is not None:
                h = level.resample(h)

        h = self.conv_out(nnx.silu(self.norm_out(h)))
        return h.astype(jnp.float32)


def validate_architecture(
    image_size: int,
    channel_mults: Sequence[int],
    attention_resolutions: Sequence[int],
    attention_type: str,
    base_channels: int,
    num_heads: int,
) -> None:
    """Checks that the net can be built for this image size; messages name the field to change."""
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(
            f"unknown model.attention_type {attention_type!r}; choose one of {ATTENTION_TYPES}"
        )
    if not channel_mults:
        raise ValueError("model.channel_mults must name at least one level")
    factor = 2 ** (len(channel_mults) - 1)
    if image_size % factor:
        raise ValueError(
            f"data.image_size={image_size} must be divisible by {factor} (the net downsamples "
            f"{len(channel_mults) - 1} times for model.channel_mults={tuple(channel_mults)})"
        )
    resolutions = {image_size // 2**level for level in range(len(channel_mults))}
    unknown = sorted(set(attention_resolutions) - resolutions)
    if unknown:
        raise ValueError(
            f"model.attention_resolutions has {unknown}, but at data.image_size={image_size} "
            f"the net only has resolutions {sorted(resolutions, reverse=True)}"
        )
    if any((base_channels * m) % num_heads for m in channel_mults):
        raise ValueError(
            f"model.num_heads={num_heads} must divide every level width "
            f"(base_channels={base_channels} x channel_mults={tuple(channel_mults)})"
        )
