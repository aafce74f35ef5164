"""The blocks every net here is made of: the timestep embedding, the residual block, the
attention blocks, and down- and upsampling.

Inputs are NHWC. Each block builds its layers through `Layers` (`layers.py`), so how a conv,
a norm or an attention block is computed is decided outside the net. `Blocks` builds a
net's blocks with its settings, numbering them in the order they are built.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ddpm_jax.models.layers import Layers


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


def embed_time(t: jax.Array, arch, dense1: nnx.Linear, dense2: nnx.Linear,
               class_embedding: ClassEmbedding | None = None,
               class_labels: jax.Array | None = None, augment_map: nnx.Linear | None = None,
               augment_labels: jax.Array | None = None) -> jax.Array:
    """The embedding [B, 4 * base_channels] every residual block takes (`arch`: the net's
    `Architecture`): the timestep, sinusoidal (`timestep_embedding`), then dense, SiLU, dense
    (Ho et al.); a class-conditional net adds its class's vector (diffusers' UNet2DModel with
    `num_class_embeds`, ADM). A net trained with augmentation first adds its map of the
    augmentation vector `augment_labels` [B, augment_dim] to the sinusoid (EDM); None: the
    zero vector, as at sampling."""
    temb = timestep_embedding(t, arch.temb_width, freq_shift=arch.time_embedding_freq_shift,
                              cos_first=arch.time_embedding_cos_first)
    if augment_map is not None:
        if augment_labels is None:
            augment_labels = jnp.zeros((len(t), arch.augment_dim), temb.dtype)
        temb = temb + augment_map(augment_labels)
    elif augment_labels is not None:
        raise ValueError("augment_labels given to a net trained without augmentation")
    temb = dense2(nnx.silu(dense1(temb)))
    if class_embedding is not None:
        temb = temb + class_embedding(class_labels, len(t))
    elif class_labels is not None:
        raise ValueError("class_labels given to an unconditional net (model.num_classes=0)")
    return temb


class ClassEmbedding(nnx.Module):
    """A learned vector per class, and one more for the null label `num_classes` ("no
    class": what classifier-free guidance's unconditional model is given)."""

    def __init__(self, num_classes: int, features: int, layers: Layers):
        self.num_classes = num_classes
        self.embedding = layers.embed(num_classes + 1, features)

    def __call__(self, class_labels: jax.Array | None, batch: int) -> jax.Array:
        """[B, features]: the vectors of `class_labels` [B] (ints in [0, num_classes]; None:
        the null label for every example)."""
        if class_labels is None:
            class_labels = jnp.full((batch,), self.num_classes, jnp.int32)
        return self.embedding(class_labels)


def dropout(x: jax.Array, rate: float, keys: jax.Array | None) -> jax.Array:
    """Inverted dropout; example i's mask is drawn from `keys[i]` alone (no-op without keys).

    Per-example keys make a training step's result independent of how its batch is split
    into chunks, micro-batches or devices.
    """
    if keys is None or rate == 0.0:
        return x
    keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def resample(x: jax.Array, direction: str | None) -> jax.Array:
    """x at half ("down": 2x2 average pooling) or twice ("up": nearest neighbour) the
    resolution, or as is (None): the resampling inside ADM's and DDPM++'s residual blocks."""
    if direction == "down":
        b, height, width, channels = x.shape
        return x.reshape(b, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
    if direction == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv, plus a projection of the time embedding, GroupNorm-SiLU-dropout-conv.

    `time_activation` applies SiLU to the embedding before its projection (Ho et al.);
    without it the projection is linear (the PyTorch project's block). `index`, the block's
    position in its net, picks its dropout masks from the per-example keys; `remat` keeps only
    the block's inputs and recomputes the rest in the backward pass (less memory).

    The later nets' variants (Dhariwal & Nichol 2021; Song et al. 2021, EDM's DDPM++), each off
    by default: `scale_shift` projects the embedding to a scale and a shift applied after the
    second GroupNorm, norm(h) (1 + scale) + shift, instead of adding it before; `resample`
    ("down"/"up") resamples both paths after the first SiLU (BigGAN's resampling block), and
    `resample_projection` gives such a block's skip a 1x1 conv even at equal widths;
    `skip_scale` multiplies the block's output (DDPM++: 1/sqrt(2)).
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, *, dropout: float, norm_groups: int,
                 time_activation: bool, layers: Layers, index: int = 0, remat: bool = False,
                 scale_shift: bool = False, resample: str | None = None,
                 resample_projection: bool = False, skip_scale: float = 1.0):
        self.time_activation = time_activation
        self.index = index
        self.remat = remat
        self.scale_shift = scale_shift
        self.resample = resample
        self.skip_scale = skip_scale
        self.norm1 = layers.group_norm(cin, norm_groups)
        self.conv1 = layers.conv(cin, cout)
        self.temb_proj = layers.dense(temb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = layers.group_norm(cout, norm_groups)
        self.dropout_rate = dropout
        self.conv2 = layers.conv(cout, cout, zero=True)
        projected = cin != cout or (resample is not None and resample_projection)
        self.skip = layers.dense(cin, cout) if projected else None

    def __call__(self, x: jax.Array, temb: jax.Array, dropout_keys: jax.Array | None) -> jax.Array:
        if dropout_keys is not None:
            dropout_keys = jax.vmap(jax.random.fold_in, (0, None))(dropout_keys, self.index)
        if self.remat:
            return nnx.remat(ResBlock.forward)(self, x, temb, dropout_keys)
        return self.forward(x, temb, dropout_keys)

    def forward(self, x: jax.Array, temb: jax.Array, dropout_keys: jax.Array | None) -> jax.Array:
        h = nnx.silu(self.norm1(x))
        if self.resample is not None:
            h, x = resample(h, self.resample), resample(x, self.resample)
        h = self.conv1(h)
        emb = self.temb_proj(nnx.silu(temb) if self.time_activation else temb)[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = nnx.silu(self.norm2(h) * (1.0 + scale) + shift)
        else:
            h = nnx.silu(self.norm2(h + emb))
        h = dropout(h, self.dropout_rate, dropout_keys)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return scaled(x + h, self.skip_scale)


def scaled(x: jax.Array, scale: float) -> jax.Array:
    """x * scale, and x itself (no operation) at scale 1."""
    return x if scale == 1.0 else x * scale


def attend(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
            scale: float | None = None) -> jax.Array:
    """Multi-head attention over [B, L, C] tokens via jax.nn.dot_product_attention (scores
    scaled by `scale`, default 1 / sqrt(head width))."""
    b, length, channels = q.shape
    split = lambda a: a.reshape(b, length, num_heads, channels // num_heads)  # noqa: E731
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.reshape(b, length, channels)


class DDPMAttention(nnx.Module):
    """Ho et al.'s self-attention block: GroupNorm, q, k, v projections, softmax(q k^T /
    sqrt(d)) v over the H*W positions (per head), a zero-initialised output projection, and
    a residual."""

    def __init__(self, channels: int, *, num_heads: int, norm_groups: int, layers: Layers,
                 skip_scale: float = 1.0):
        self.num_heads = num_heads
        self.skip_scale = skip_scale  # multiplies the block's output (DDPM++: 1/sqrt(2))
        self.norm = layers.group_norm(channels, norm_groups)
        self.q = layers.dense(channels, channels)
        self.k = layers.dense(channels, channels)
        self.v = layers.dense(channels, channels)
        self.proj_out = layers.dense(channels, channels, zero=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, channels = x.shape
        h = self.norm(x).reshape(b, height * width, channels)
        out = self.proj_out(attend(self.q(h), self.k(h), self.v(h), self.num_heads))
        return scaled(x + out.reshape(x.shape), self.skip_scale)


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
        h = h + self.proj_out(attend(q, k, v, self.num_heads))
        h = h + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(h)), approximate=False))
        return h.reshape(x.shape)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv, zero-padded by `padding` (before, after) on each spatial axis."""

    def __init__(self, channels: int, layers: Layers, padding: tuple[int, int] = (1, 1)):
        self.conv = layers.conv(channels, channels, stride=2, padding=padding)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, layers: Layers):
        self.conv = layers.upsampling_conv(channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)  # the conv of the nearest x2 upsampling of x


class Blocks:
    """Builds the blocks of one net with its settings (`arch`: a `unet.Architecture`),
    numbering them in the order they are built (a residual block's number picks its dropout
    masks, so it must not change for a net that exists)."""

    def __init__(self, arch, layers: Layers):
        self.arch = arch
        self.layers = layers
        self.temb_dim = 4 * arch.base_channels
        self.count = 0

    def class_embedding(self) -> ClassEmbedding | None:
        """The net's class embedding (None for an unconditional net)."""
        if not self.arch.num_classes:
            return None
        return ClassEmbedding(self.arch.num_classes, self.temb_dim, self.layers)

    def augment_map(self) -> nnx.Linear | None:
        """The linear map (no bias) of the augmentation vector onto the sinusoidal time
        embedding (EDM's `map_augment`); None for a net trained without augmentation."""
        if not self.arch.augment_dim:
            return None
        return self.layers.dense(self.arch.augment_dim, self.arch.temb_width, bias=False)

    def _numbered(self, block: nnx.Module) -> nnx.Module:
        self.count += 1
        return block

    def res(self, cin: int, cout: int, resample: str | None = None) -> ResBlock:
        a = self.arch
        return self._numbered(ResBlock(
            cin, cout, self.temb_dim, dropout=a.dropout, norm_groups=a.norm_groups,
            time_activation=a.time_projection == "silu_linear", layers=self.layers,
            index=self.count, remat=a.remat, scale_shift=a.scale_shift_norm, resample=resample,
            resample_projection=a.resample_projection, skip_scale=a.skip_scale))

    def attention(self, channels: int) -> nnx.Module:
        a = self.arch
        heads = channels // a.head_channels if a.head_channels else a.num_heads
        if a.attention_type == "transformer":
            block = TransformerAttention(channels, num_heads=heads, mlp_ratio=a.mlp_ratio,
                                         layers=self.layers)
        else:
            kind = self.layers.ops.attention or DDPMAttention
            block = kind(channels, num_heads=heads, norm_groups=a.norm_groups,
                         layers=self.layers, skip_scale=a.skip_scale)
        return self._numbered(block)

    def downsample(self, channels: int, padding: tuple[int, int]) -> nnx.Module:
        """A stride-2 conv, or with `resample="resblock"` a residual block that averages."""
        if self.arch.resample == "resblock":
            return self.res(channels, channels, resample="down")
        return self._numbered(Downsample(channels, self.layers, padding))

    def upsample(self, channels: int) -> nnx.Module:
        """Nearest x2 and a conv, or with `resample="resblock"` a residual block that does."""
        if self.arch.resample == "resblock":
            return self.res(channels, channels, resample="up")
        return self._numbered(Upsample(channels, self.layers))
