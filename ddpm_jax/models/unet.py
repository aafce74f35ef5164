"""The denoising UNet (Flax NNX), configured entirely by `config.model`.

Two layouts share every block:
  * ``ddpm`` (Ho et al. 2020): a sinusoidal timestep embedding and a two-layer MLP;
    per resolution level `num_res_blocks` residual blocks (each followed by
    self-attention at the resolutions in `attention_resolutions`) and a stride-2 conv
    downsample; a middle of res/attention/res; an up path with `num_res_blocks + 1`
    blocks per level fed with concatenated skips, nearest x2 + conv upsampling;
    GroupNorm, SiLU and a zero-initialised conv to the output.
  * ``mirror`` (the PyTorch project this trainer reimplements): per level
    `num_res_blocks` residual blocks, a stride-2 downsample, attention, and (but for
    the last level) a residual block that widens to the next level; two residual
    blocks in the middle; a decoder that mirrors the encoder block for block with a
    skip into every residual block; a last residual block and a conv to the output.

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

from ddpm_jax.models import conv, group_norm, winograd

ATTENTION_TYPES = ("ddpm", "transformer")
# How 3x3 convolutions are computed: XLA's convolution (`conv.py`: on CPU with gradients in
# the layout of XLA:CPU's fast kernel), or Winograd's F(4x4, 3x3) or F(2x2, 3x3) where that is
# faster (float32, 4x4 and larger maps, at least 32 input and output channels;
# `winograd.py`). Same parameters either way.
CONV_ALGORITHMS = {"direct": conv.conv_general_dilated,
                   "winograd": winograd.conv_general_dilated}
TIME_PROJECTIONS = ("silu_linear", "linear")

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

    def __init__(self, dtype: jnp.dtype, rngs: nnx.Rngs, conv_algorithm: str = "direct"):
        self.dtype = dtype
        self.rngs = rngs
        if conv_algorithm not in CONV_ALGORITHMS:
            raise ValueError(f"unknown conv_algorithm {conv_algorithm!r}; choose one of "
                             f"{tuple(CONV_ALGORITHMS)}")
        self.conv_fn = CONV_ALGORITHMS[conv_algorithm]

    def conv(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, zero: bool = False):
        pad = kernel // 2
        return nnx.Conv(
            cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
            dtype=self.dtype, kernel_init=zero_init if zero else default_init, rngs=self.rngs,
            conv_general_dilated=self.conv_fn,
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
        return group_norm.GroupNorm(channels, num_groups=groups, epsilon=1e-6,
                                    dtype=self.dtype, rngs=self.rngs)

    def layer_norm(self, channels: int):
        return nnx.LayerNorm(channels, epsilon=1e-5, dtype=self.dtype, rngs=self.rngs)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv, plus a projection of the time embedding, GroupNorm-SiLU-dropout-conv.

    `time_activation` applies SiLU to the embedding before its projection (Ho et al.);
    without it the projection is linear (the PyTorch project's block).
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, *, dropout: float, norm_groups: int,
                 time_activation: bool, layers: _Layers):
        self.time_activation = time_activation
        self.norm1 = layers.group_norm(cin, norm_groups)
        self.conv1 = layers.conv(cin, cout)
        self.temb_proj = layers.dense(temb_dim, cout)
        self.norm2 = layers.group_norm(cout, norm_groups)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = layers.conv(cout, cout, zero=True)
        self.skip = layers.dense(cin, cout) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.temb_proj(nnx.silu(temb) if self.time_activation else temb)[:, None, None, :]
        h = nnx.silu(self.norm2(h))
        h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return x + h


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
            scale: float | None = None) -> jax.Array:
    """Multi-head attention over [B, L, C] tokens via jax.nn.dot_product_attention (scores
    scaled by `scale`, default 1 / sqrt(head width))."""
    b, length, channels = q.shape
    split = lambda a: a.reshape(b, length, num_heads, channels // num_heads)  # noqa: E731
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), scale=scale)
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
        if self.num_heads == 1:
            out = self._single_head(h)
        else:
            out = self.proj_out(_attend(self.q(h), self.k(h), self.v(h), self.num_heads))
        return x + out.reshape(x.shape)

    def _single_head(self, h: jax.Array) -> jax.Array:
        """``proj_out(attention(q(h), k(h), v(h)))`` with the four projections folded into two.

        The scores ``(h Wq + bq)(h Wk + bk)^T / sqrt(C)`` are, up to terms that are the same
        for every key of a query (which the softmax over keys cancels), ``(h M + u) h^T`` with
        ``M = Wq Wk^T / sqrt(C)`` and ``u = Wk bq / sqrt(C)``; and since each query's weights
        sum to 1, ``softmax(s) (h Wv + bv) Wo + bo = softmax(s) h (Wv Wo) + (bv Wo + bo)``.
        So attention runs with queries ``h M + u``, keys ``h`` and values ``h (Wv Wo)``: two
        products per position with a [C, C] matrix instead of four, a third fewer FLOPs in the
        block (1.07 of 3.2 GFLOP per layer at batch 16 on 16x16 maps, 256 channels; the [C, C]
        products of weights are computed once per call, outside a sampling loop). The same
        parameters; values equal up to float rounding (`tests/test_unet.py`). Attention stays
        `jax.nn.dot_product_attention`: written as plain products, XLA:CPU hands the whole
        block to one YNNPACK fusion that ran DDIM no faster.
        """
        dtype = self.q.dtype
        (w_q, b_q), (w_k, _), (w_v, b_v), (w_o, b_o) = (
            (layer.kernel[...], layer.bias[...])
            for layer in (self.q, self.k, self.v, self.proj_out))
        h, w_q, b_q, w_k, w_v, b_v, w_o, b_o = self.q.promote_dtype(
            (h, w_q, b_q, w_k, w_v, b_v, w_o, b_o), dtype=dtype)
        scale = 1.0 / math.sqrt(h.shape[-1])
        queries = h @ (w_q @ w_k.T * scale) + w_k @ b_q * scale
        values = h @ (w_v @ w_o)
        out = _attend(queries, h, values, num_heads=1, scale=1.0)
        return out + (b_v @ w_o + b_o)


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


class Downsample(nnx.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels: int, layers: _Layers):
        self.conv = layers.conv(channels, channels, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv.

    With Winograd convolutions, computed where it pays as one convolution of the small map
    that gives the four output phases (`winograd.upsample_conv3x3`): the same parameters and
    values, up to float32 rounding.
    """

    def __init__(self, channels: int, layers: _Layers):
        self.conv = layers.conv(channels, channels)

    @property
    def by_phases(self) -> bool:
        """Whether this block's convolutions are Winograd's (then it may go by phases)."""
        return self.conv.conv_general_dilated is winograd.conv_general_dilated

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.by_phases:
            x, kernel, bias = self.conv.promote_dtype(
                (x, self.conv.kernel[...], self.conv.bias[...]), dtype=self.conv.dtype)
            y = winograd.upsample_conv3x3(x, kernel)
            if y is not None:
                return y + bias
        return self.conv(winograd.upsample_nearest2x(x))


class _Plan:
    """Collects the encoder/decoder as flat lists of blocks with skip-connection flags.

    An encoder block with `push` stores its output as a skip; a decoder block with
    `pop` concatenates the newest skip to its input. Both layouts are written as
    such a plan, and one forward pass runs either.
    """

    def __init__(self, layers: _Layers, make_attention, make_res_block):
        self.layers = layers
        self.attention = make_attention
        self.res_block = make_res_block
        self.encoder: list[nnx.Module] = []
        self.push: list[bool] = []
        self.middle: list[nnx.Module] = []
        self.decoder: list[nnx.Module] = []
        self.pop: list[bool] = []
        self.skip_channels: list[int] = []

    def enc(self, block: nnx.Module, channels: int, push: bool = True) -> None:
        self.encoder.append(block)
        self.push.append(push)
        if push:
            self.skip_channels.append(channels)

    def dec_res(self, cin: int, cout: int, pop: bool = True) -> None:
        self.decoder.append(self.res_block(cin + (self.skip_channels.pop() if pop else 0), cout))
        self.pop.append(pop)

    def dec(self, block: nnx.Module) -> None:
        self.decoder.append(block)
        self.pop.append(False)


def _ddpm_plan(plan: _Plan, base: int, mults: Sequence[int], num_res_blocks: int,
               image_size: int, attention_resolutions: Sequence[int]) -> int:
    """Ho et al.: per level, res blocks (+attention) then downsample; up path with +1 block."""
    channels = base
    plan.skip_channels.append(base)  # conv_in output
    for level, mult in enumerate(mults):
        attend = image_size // 2**level in attention_resolutions
        for _ in range(num_res_blocks):
            plan.enc(plan.res_block(channels, base * mult), base * mult, push=not attend)
            channels = base * mult
            if attend:
                plan.enc(plan.attention(channels), channels)
        if level < len(mults) - 1:
            plan.enc(Downsample(channels, plan.layers), channels)
    plan.middle = [plan.res_block(channels, channels), plan.attention(channels),
                   plan.res_block(channels, channels)]
    for level, mult in reversed(list(enumerate(mults))):
        attend = image_size // 2**level in attention_resolutions
        for _ in range(num_res_blocks + 1):
            plan.dec_res(channels, base * mult)
            channels = base * mult
            if attend:
                plan.dec(plan.attention(channels))
        if level:
            plan.dec(Upsample(channels, plan.layers))
    return channels


def _mirror_plan(plan: _Plan, base: int, mults: Sequence[int], num_res_blocks: int,
                 image_size: int, attention_resolutions: Sequence[int]) -> int:
    """The PyTorch project's net: per level, res blocks, downsample, attention, a widening res
    block; a decoder that mirrors it block for block, every res block taking a skip."""
    widths = [base * m for m in mults]
    plan.skip_channels.append(base)  # conv_in output
    channels = base
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            plan.enc(plan.res_block(channels, width), width)
            channels = width
        attend = image_size // 2 ** (level + 1) in attention_resolutions
        plan.enc(Downsample(width, plan.layers), width, push=not attend)
        if attend:
            plan.enc(plan.attention(width), width)
        if level < len(widths) - 1:
            plan.enc(plan.res_block(width, widths[level + 1]), widths[level + 1])
            channels = widths[level + 1]
    plan.middle = [plan.res_block(channels, channels) for _ in range(2)]
    for level, width in reversed(list(enumerate(widths))):
        plan.dec_res(channels, width)
        channels = width
        if image_size // 2 ** (level + 1) in attention_resolutions:
            plan.dec(plan.attention(width))
        plan.dec(Upsample(width, plan.layers))
        for _ in range(num_res_blocks):
            plan.dec_res(width, width)
        if level:
            plan.dec_res(width, widths[level - 1])
            channels = widths[level - 1]
    plan.dec_res(channels, base)  # the final res block, fed with the conv_in skip
    return base


LAYOUTS = {"ddpm": _ddpm_plan, "mirror": _mirror_plan}


class UNet(nnx.Module):
    """Denoising UNet: `model(x [B,H,W,C], t [B] int) -> [B,H,W,out_channels]`.

    `layout` picks the block arrangement (``ddpm``: Ho et al.; ``mirror``: the PyTorch
    project's encoder/decoder); `attention_type` and `time_projection` pick the block
    variants; `remat` recomputes residual blocks in the backward pass to save memory. Pass
    `rngs` (with a `dropout` stream) when training; without it dropout is off.
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
        layout: str = "ddpm",
        time_embedding_width: int = 0,
        time_projection: str = "silu_linear",
        in_channels: int = 3,
        out_channels: int = 3,
        dtype: str = "float32",
        remat: bool = False,
        conv_algorithm: str = "direct",
        rngs: nnx.Rngs,
    ):
        validate_architecture(image_size, channel_mults, attention_resolutions, attention_type,
                              base_channels, num_heads, layout, time_projection)
        layers = _Layers(jnp.dtype(dtype), rngs, conv_algorithm)
        temb_dim = 4 * base_channels
        self.time_embedding_width = time_embedding_width or base_channels
        self.remat = remat

        def attention(channels: int):
            if attention_type == "ddpm":
                return DDPMAttention(channels, num_heads=num_heads, norm_groups=norm_groups,
                                     layers=layers)
            return TransformerAttention(channels, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                        layers=layers)

        def res_block(cin: int, cout: int):
            return ResBlock(cin, cout, temb_dim, dropout=dropout, norm_groups=norm_groups,
                            time_activation=time_projection == "silu_linear", layers=layers)

        self.temb_dense1 = layers.dense(self.time_embedding_width, temb_dim)
        self.temb_dense2 = layers.dense(temb_dim, temb_dim)
        self.conv_in = layers.conv(in_channels, base_channels)
        plan = _Plan(layers, attention, res_block)
        channels = LAYOUTS[layout](plan, base_channels, channel_mults, num_res_blocks, image_size,
                                   attention_resolutions)
        assert not plan.skip_channels, "every skip must be consumed"
        self.encoder = nnx.List(plan.encoder)
        self.middle = nnx.List(plan.middle)
        self.decoder = nnx.List(plan.decoder)
        self.push = tuple(plan.push)
        self.pop = tuple(plan.pop)
        self.norm_out = layers.group_norm(channels, norm_groups) if layout == "ddpm" else None
        self.conv_out = layers.conv(channels, out_channels, zero=True)

    def _apply(self, block: nnx.Module, h: jax.Array, temb: jax.Array, rngs: nnx.Rngs | None):
        if not isinstance(block, ResBlock):
            return block(h)
        if self.remat:  # keep only block inputs; recompute the inside in the backward pass
            return nnx.remat(lambda blk, x, e, r: blk(x, e, r))(block, h, temb, rngs)
        return block(h, temb, rngs)

    def __call__(self, x: jax.Array, t: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        temb = timestep_embedding(t, self.time_embedding_width)
        temb = self.temb_dense2(nnx.silu(self.temb_dense1(temb)))

        h = self.conv_in(x)
        skips = [h]
        for block, push in zip(self.encoder, self.push, strict=True):
            h = self._apply(block, h, temb, rngs)
            if push:
                skips.append(h)
        for block in self.middle:
            h = self._apply(block, h, temb, rngs)
        for block, pop in zip(self.decoder, self.pop, strict=True):
            if pop:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self._apply(block, h, temb, rngs)

        if self.norm_out is not None:
            h = nnx.silu(self.norm_out(h))
        return self.conv_out(h).astype(jnp.float32)


def validate_architecture(
    image_size: int,
    channel_mults: Sequence[int],
    attention_resolutions: Sequence[int],
    attention_type: str,
    base_channels: int,
    num_heads: int,
    layout: str = "ddpm",
    time_projection: str = "silu_linear",
) -> None:
    """Checks that the net can be built for this image size; messages name the field to change."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown model.layout {layout!r}; choose one of {tuple(LAYOUTS)}")
    if time_projection not in TIME_PROJECTIONS:
        raise ValueError(
            f"unknown model.time_projection {time_projection!r}; choose one of {TIME_PROJECTIONS}"
        )
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(
            f"unknown model.attention_type {attention_type!r}; choose one of {ATTENTION_TYPES}"
        )
    if not channel_mults:
        raise ValueError("model.channel_mults must name at least one level")
    downsamples = len(channel_mults) - (1 if layout == "ddpm" else 0)
    factor = 2**downsamples
    if image_size % factor:
        raise ValueError(
            f"data.image_size={image_size} must be divisible by {factor} (the {layout} layout "
            f"downsamples {downsamples} times for model.channel_mults={tuple(channel_mults)})"
        )
    first = 0 if layout == "ddpm" else 1  # the mirror layout attends after each downsample
    resolutions = {image_size // 2**level for level in range(first, downsamples + 1)}
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
