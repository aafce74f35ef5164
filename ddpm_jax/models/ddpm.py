"""The UNet of Ho et al. (2020, Appendix B), as the reference code
(diffusion_tf/models/unet.py) builds it.

A sinusoidal timestep embedding and a two-layer MLP; a 3x3 conv in; per resolution level,
`num_res_blocks` residual blocks, each followed by self-attention at the resolutions in
`attention_resolutions`, and (but at the last level) a stride-2 conv downsample; a middle
of residual block, attention, residual block; an up path with `num_res_blocks + 1` blocks
per level, each fed the matching output of the down path, and a nearest x2 + conv
upsample; GroupNorm, SiLU and a zero-initialised conv out. Every output of the down path
(the conv in, each block, each downsample) is a skip that one block of the up path takes.

Parameters are nested as the paper's code and diffusers name them: `down[level].res[i]`,
`.attn[i]`, `.downsample`; `mid.res1`, `.attn`, `.res2`; `up[j].res[i]`, `.attn[i]`,
`.upsample` (`up[0]` is the lowest resolution, as diffusers' `up_blocks.0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddpm_jax.models.architecture import DOWNSAMPLE_PADDINGS, Architecture
from ddpm_jax.models.blocks import Blocks, ResBlock, embed_time
from ddpm_jax.models.layers import LayerOps, Layers


class DownLevel(nnx.Module):
    """One resolution of the down path: residual blocks, each one's attention (none where the
    level does not attend), and the downsample to the next level (None at the last)."""

    def __init__(self, res: list, attn: list, downsample: nnx.Module | None):
        self.res, self.attn, self.downsample = nnx.List(res), nnx.List(attn), downsample


class UpLevel(nnx.Module):
    """One resolution of the up path: residual blocks, the attention of each (none where the
    level does not attend; of the last block alone with `decoder_attention="last_block"`),
    and the upsample to the next level (None at the last)."""

    def __init__(self, res: list, attn: list, upsample: nnx.Module | None):
        self.res, self.attn, self.upsample = nnx.List(res), nnx.List(attn), upsample

    def attention_after(self, i: int) -> nnx.Module | None:
        """The attention block that follows residual block i, if any."""
        offset = len(self.res) - len(self.attn)  # blocks before the first that attends
        return self.attn[i - offset] if i >= offset and self.attn else None


def resampled(block: nnx.Module, h: jax.Array, temb: jax.Array,
              dropout_keys: jax.Array | None) -> jax.Array:
    """A downsample or upsample: a conv (Ho et al.) or a residual block (`resample="resblock"`)."""
    return block(h, temb, dropout_keys) if isinstance(block, ResBlock) else block(h)


class Middle(nnx.Module):
    """The middle of the net: residual block, attention, residual block."""

    def __init__(self, res1: nnx.Module, attn: nnx.Module, res2: nnx.Module):
        self.res1, self.attn, self.res2 = res1, attn, res2


class DDPMUNet(nnx.Module):
    """`model(x [B,H,W,C], t [B] int, *, class_labels=None, dropout_keys=None) ->
    [B,H,W,out_channels]`.

    A class-conditional net (`num_classes` > 0) takes `class_labels` [B] (None: the null
    label, the unconditional model); a net trained with augmentation (`augment_dim` > 0)
    takes `augment_labels` [B, augment_dim] (None: zeros, no augmentation). Pass
    `dropout_keys` (one PRNG key per example, [B]) when training; without them dropout is
    off.
    """

    def __init__(self, arch: Architecture, *, layer_ops: LayerOps | None = None,
                 rngs: nnx.Rngs):
        layers = Layers(jnp.dtype(arch.dtype), rngs, layer_ops, norm_eps=arch.norm_eps)
        blocks = Blocks(arch, layers)
        padding = DOWNSAMPLE_PADDINGS[arch.downsample_padding]
        self.arch = arch
        self.temb_dense1 = layers.dense(arch.temb_width, blocks.temb_dim)
        self.temb_dense2 = layers.dense(blocks.temb_dim, blocks.temb_dim)
        self.class_embedding = blocks.class_embedding()
        self.augment_map = blocks.augment_map()
        self.conv_in = layers.conv(arch.in_channels, arch.base_channels)

        channels, skips = arch.base_channels, [arch.base_channels]
        down = []
        for level, width in enumerate(arch.widths):
            attends = arch.attends(arch.image_size // 2**level)
            res, attn = [], []
            for _ in range(arch.num_res_blocks):
                res.append(blocks.res(channels, width))
                channels = width
                if attends:
                    attn.append(blocks.attention(channels))
                skips.append(channels)
            downsample = None
            if level < len(arch.widths) - 1:
                downsample = blocks.downsample(channels, padding)
                skips.append(channels)
            down.append(DownLevel(res, attn, downsample))
        self.down = nnx.List(down)

        self.mid = Middle(blocks.res(channels, channels), blocks.attention(channels),
                          blocks.res(channels, channels))

        up = []
        for level, width in reversed(list(enumerate(arch.widths))):
            attends = arch.attends(arch.image_size // 2**level)
            res, attn = [], []
            for i in range(arch.num_res_blocks + 1):
                res.append(blocks.res(channels + skips.pop(), width))
                channels = width
                if attends and (arch.decoder_attention == "every_block"
                                or i == arch.num_res_blocks):
                    attn.append(blocks.attention(channels))
            up.append(UpLevel(res, attn, blocks.upsample(channels) if level else None))
        self.up = nnx.List(up)
        assert not skips, "every skip must be taken"

        self.norm_out = layers.group_norm(channels, arch.norm_groups)
        self.conv_out = layers.conv(channels, arch.out_channels, zero=True)

    def __call__(self, x: jax.Array, t: jax.Array, *, class_labels: jax.Array | None = None,
                 augment_labels: jax.Array | None = None,
                 dropout_keys: jax.Array | None = None) -> jax.Array:
        temb = embed_time(t, self.arch, self.temb_dense1, self.temb_dense2,
                          self.class_embedding, class_labels, self.augment_map, augment_labels)

        # Down: every output is kept for the up path.
        hs = [self.conv_in(x)]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(hs[-1], temb, dropout_keys)
                if level.attn:
                    h = level.attn[i](h)
                hs.append(h)
            if level.downsample is not None:
                hs.append(resampled(level.downsample, hs[-1], temb, dropout_keys))

        # Middle.
        h = self.mid.res1(hs[-1], temb, dropout_keys)
        h = self.mid.attn(h)
        h = self.mid.res2(h, temb, dropout_keys)

        # Up: each block takes the newest unused output of the down path.
        for level in self.up:
            for i, block in enumerate(level.res):
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), temb, dropout_keys)
                attention = level.attention_after(i)
                if attention is not None:
                    h = attention(h)
            if level.upsample is not None:
                h = resampled(level.upsample, h, temb, dropout_keys)
        assert not hs

        h = nnx.silu(self.norm_out(h))
        return self.conv_out(h).astype(jnp.float32)


def legacy_block_paths(arch: Architecture) -> dict[str, list[tuple]]:
    """Where each block of the flat parameter tree of runs saved before the nesting
    (`encoder[i]`, `middle[i]`, `decoder[i]`, in the order the blocks run) is now."""
    encoder, decoder = [], []
    for level in range(len(arch.widths)):
        attends = arch.attends(arch.image_size // 2**level)
        for i in range(arch.num_res_blocks):
            encoder += [("down", level, "res", i)] + ([("down", level, "attn", i)] if attends else [])
        if level < len(arch.widths) - 1:
            encoder.append(("down", level, "downsample"))
    for j, level in enumerate(reversed(range(len(arch.widths)))):
        attends = arch.attends(arch.image_size // 2**level)
        for i in range(arch.num_res_blocks + 1):
            decoder += [("up", j, "res", i)] + ([("up", j, "attn", i)] if attends else [])
        if level:
            decoder.append(("up", j, "upsample"))
    middle = [("mid", "res1"), ("mid", "attn"), ("mid", "res2")]
    return {"encoder": encoder, "middle": middle, "decoder": decoder}
