"""The denoising UNet (Flax NNX), configured entirely by `config.model`.

Two layouts share every block:
  * ``ddpm`` (Ho et al. 2020): a sinusoidal timestep embedding and a two-layer MLP;
    per resolution level `num_res_blocks` residual blocks (each followed by
    self-attention at the resolutions in `attention_resolutions`) and a stride-2 conv
    downsample (padded as TensorFlow's 'SAME': 0 before, 1 after; `downsample_padding`);
    a middle of res/attention/res; an up path with `num_res_blocks + 1` blocks per level
    fed with concatenated skips, nearest x2 + conv upsampling; GroupNorm, SiLU and a
    zero-initialised conv to the output.
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

Inputs are NHWC. Parameters are float32; `dtype` sets the compute dtype. How convolutions,
norms and upsampling are computed comes from outside (`layer_ops`, see `layers.py`); by
default they are Flax's `nnx.Conv` and `nnx.GroupNorm`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ddpm_jax.models.base import MODELS, Network
from ddpm_jax.models.layers import LayerOps, Layers
from ddpm_jax.registry import check_choice

ATTENTION_TYPES = ("ddpm", "transformer")
TIME_PROJECTIONS = ("silu_linear", "linear")
# (before, after) zero padding of the stride-2 downsample conv on each spatial axis:
# "same" is TensorFlow's 'SAME' on an even map (Ho et al.), "symmetric" PyTorch's padding=1.
DOWNSAMPLE_PADDINGS = {"same": (0, 1), "symmetric": (1, 1)}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, *,
                       freq_shift: float = 1.0, cos_first: bool = False) -> jax.Array:
    """Sinusoidal embedding [B, dim] of integer timesteps.

    Frequencies are max_period^(-i / (dim/2 - freq_shift)), i < dim/2; sines then cosines.
    The defaults are the DDPM reference code's; `freq_shift` and `cos_first` cover the
    other embeddings diffusers' UNet2DModel offers (its `freq_shift`, `flip_sin_to_cos`).
    """
    half = dim // 2
    scale = math.log(max_period) / max(half - freq_shift, 1)
    freqs = jnp.exp(-scale * jnp.arange(half, dtype=jnp.float32))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.sin(angles), jnp.cos(angles)]
    embedding = jnp.concatenate(parts[::-1] if cos_first else parts, axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def dropout(x: jax.Array, rate: float, keys: jax.Array | None) -> jax.Array:
    """Inverted dropout; example i's mask is drawn from `keys[i]` alone (no-op without keys).

    Per-example keys make a training step's result independent of how its batch is split
    into chunks, micro-batches or devices.
    """
    if keys is None or rate == 0.0:
        return x
    keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv, plus a projection of the time embedding, GroupNorm-SiLU-dropout-conv.

    `time_activation` applies SiLU to the embedding before its projection (Ho et al.);
    without it the projection is linear (the PyTorch project's block).
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, *, dropout: float, norm_groups: int,
                 time_activation: bool, layers: Layers):
        self.time_activation = time_activation
        self.norm1 = layers.group_norm(cin, norm_groups)
        self.conv1 = layers.conv(cin, cout)
        self.temb_proj = layers.dense(temb_dim, cout)
        self.norm2 = layers.group_norm(cout, norm_groups)
        self.dropout_rate = dropout
        self.conv2 = layers.conv(cout, cout, zero=True)
        self.skip = layers.dense(cin, cout) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array, dropout_keys: jax.Array | None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.temb_proj(nnx.silu(temb) if self.time_activation else temb)[:, None, None, :]
        h = nnx.silu(self.norm2(h))
        h = dropout(h, self.dropout_rate, dropout_keys)
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

    def __init__(self, channels: int, *, num_heads: int, norm_groups: int, layers: Layers):
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
        block. The same parameters; values equal up to float rounding (`tests/test_unet.py`).
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

    def __init__(self, channels: int, *, num_heads: int, mlp_ratio: float, layers: Layers):
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
    """Stride-2 3x3 conv, zero-padded by `padding` (before, after) on each spatial axis."""

    def __init__(self, channels: int, layers: Layers, padding: tuple[int, int] = (1, 1)):
        self.conv = layers.conv(channels, channels, stride=2, padding=padding)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv (computed by the net's `LayerOps.upsample_conv`)."""

    def __init__(self, channels: int, layers: Layers):
        self.conv = layers.conv(channels, channels)
        self.upsample_conv = layers.ops.upsample_conv

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.upsample_conv(self.conv, x)


class _Plan:
    """Collects the encoder/decoder as flat lists of blocks with skip-connection flags.

    An encoder block with `push` stores its output as a skip; a decoder block with
    `pop` concatenates the newest skip to its input. Both layouts are written as
    such a plan, and one forward pass runs either.
    """

    def __init__(self, layers: Layers, make_attention, make_res_block,
                 downsample_padding: tuple[int, int]):
        self.layers = layers
        self.downsample_padding = downsample_padding
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

    def downsample(self, channels: int) -> Downsample:
        return Downsample(channels, self.layers, self.downsample_padding)

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
            plan.enc(plan.downsample(channels), channels)
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
        plan.enc(plan.downsample(width), width, push=not attend)
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
    variants; `downsample_padding` the padding of the stride-2 convs (`DOWNSAMPLE_PADDINGS`);
    `norm_eps` the GroupNorm epsilon; `time_embedding_freq_shift` and
    `time_embedding_cos_first` the sinusoidal embedding (`timestep_embedding`); `remat`
    recomputes residual blocks in the backward pass to save memory; `layer_ops` says how
    layers are computed (default: Flax's). Pass `dropout_keys` (one
    PRNG key per example, [B]) when training; without them dropout is off.
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
        downsample_padding: str = "same",
        norm_eps: float = 1e-6,
        time_embedding_freq_shift: float = 1.0,
        time_embedding_cos_first: bool = False,
        in_channels: int = 3,
        out_channels: int = 3,
        dtype: str = "float32",
        remat: bool = False,
        layer_ops: LayerOps | None = None,
        rngs: nnx.Rngs,
    ):
        validate_architecture(image_size, channel_mults, attention_resolutions, attention_type,
                              base_channels, num_heads, layout, time_projection, norm_groups,
                              downsample_padding)
        layers = Layers(jnp.dtype(dtype), rngs, layer_ops, norm_eps=norm_eps)
        temb_dim = 4 * base_channels
        self.time_embedding_width = time_embedding_width or base_channels
        self.time_embedding_freq_shift = time_embedding_freq_shift
        self.time_embedding_cos_first = time_embedding_cos_first
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
        plan = _Plan(layers, attention, res_block, DOWNSAMPLE_PADDINGS[downsample_padding])
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

    def _apply(self, block: nnx.Module, index: int, h: jax.Array, temb: jax.Array,
               dropout_keys: jax.Array | None):
        """Runs block `index` (its position in the net); residual blocks get their own keys."""
        if not isinstance(block, ResBlock):
            return block(h)
        if dropout_keys is not None:
            dropout_keys = jax.vmap(jax.random.fold_in, (0, None))(dropout_keys, index)
        if self.remat:  # keep only block inputs; recompute the inside in the backward pass
            return nnx.remat(lambda blk, x, e, k: blk(x, e, k))(block, h, temb, dropout_keys)
        return block(h, temb, dropout_keys)

    def __call__(self, x: jax.Array, t: jax.Array, *,
                 dropout_keys: jax.Array | None = None) -> jax.Array:
        temb = timestep_embedding(t, self.time_embedding_width,
                                  freq_shift=self.time_embedding_freq_shift,
                                  cos_first=self.time_embedding_cos_first)
        temb = self.temb_dense2(nnx.silu(self.temb_dense1(temb)))

        h = self.conv_in(x)
        skips = [h]
        blocks = iter(range(len(self.encoder) + len(self.middle) + len(self.decoder)))
        for block, push in zip(self.encoder, self.push, strict=True):
            h = self._apply(block, next(blocks), h, temb, dropout_keys)
            if push:
                skips.append(h)
        for block in self.middle:
            h = self._apply(block, next(blocks), h, temb, dropout_keys)
        for block, pop in zip(self.decoder, self.pop, strict=True):
            if pop:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self._apply(block, next(blocks), h, temb, dropout_keys)

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
    norm_groups: int = 1,
    downsample_padding: str = "same",
) -> None:
    """Checks that the net can be built for this image size; messages name the field to change."""
    check_choice("model.layout", layout, tuple(LAYOUTS))
    check_choice("model.time_projection", time_projection, TIME_PROJECTIONS)
    check_choice("model.attention_type", attention_type, ATTENTION_TYPES)
    check_choice("model.downsample_padding", downsample_padding, tuple(DOWNSAMPLE_PADDINGS))
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
    widths = [base_channels * m for m in channel_mults]
    for field, value, divided in (("num_heads", num_heads, widths),
                                  ("norm_groups", norm_groups, [base_channels, *widths])):
        if any(width % value for width in divided):
            raise ValueError(
                f"model.{field}={value} must divide every level width "
                f"(base_channels={base_channels} x channel_mults={tuple(channel_mults)})"
            )


def output_channels(config: ml_collections.ConfigDict) -> int:
    """3 (the prediction), or 6 with learned variances (the prediction, then the values v
    that interpolate each pixel's log variance; `diffusion.split_output`)."""
    return 6 if config.diffusion.get("variance") == "learned_range" else 3


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
          layer_ops: LayerOps | None = None) -> UNet:
    """The UNet of `config.model` for images of `config.data.image_size`."""
    m = config.model
    return UNet(
        image_size=config.data.image_size,
        base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        attention_type=m.attention_type,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        dropout=m.dropout,
        norm_groups=m.norm_groups,
        layout=m.layout,
        time_embedding_width=m.time_embedding_width,
        time_projection=m.time_projection,
        downsample_padding=m.downsample_padding,
        norm_eps=m.norm_eps,
        time_embedding_freq_shift=m.time_embedding_freq_shift,
        time_embedding_cos_first=m.time_embedding_cos_first,
        in_channels=3,
        out_channels=output_channels(config),
        dtype=m.dtype,
        remat=m.remat,
        layer_ops=layer_ops,
        rngs=rngs,
    )


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when `config.model` cannot be built for
    `config.data.image_size`."""
    m = config.model
    for field in ("base_channels", "num_res_blocks", "num_heads", "norm_groups"):
        value = m[field]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"model.{field} must be a positive integer, got {value!r}")
    for field in ("channel_mults", "attention_resolutions"):
        values = m[field]
        if not isinstance(values, (tuple, list)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"model.{field} must be a tuple of positive integers, such as "
                             f"(1, 2, 2), got {values!r}")
    if not m.channel_mults:
        raise ValueError("model.channel_mults must have at least one level, such as (1, 2, 2)")
    check_choice("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not m.norm_eps > 0:
        raise ValueError(f"model.norm_eps must be positive, got {m.norm_eps}")
    half = (m.time_embedding_width or m.base_channels) // 2
    if not m.time_embedding_freq_shift < half:
        raise ValueError(f"model.time_embedding_freq_shift={m.time_embedding_freq_shift} must be "
                         f"below half the time embedding width ({half})")
    validate_architecture(config.data.image_size, tuple(m.channel_mults),
                          tuple(m.attention_resolutions), m.attention_type, m.base_channels,
                          m.num_heads, m.layout, m.time_projection, m.norm_groups,
                          m.downsample_padding)


MODELS.register("unet", Network(build=build, check=check))
