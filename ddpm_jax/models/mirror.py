"""The UNet of the PyTorch project this trainer reimplements (`model.layout="mirror"`).

Per level, `num_res_blocks` residual blocks, a stride-2 downsample, attention where the
downsampled map's side is in `attention_resolutions`, and (but at the last level) a
residual block that widens to the next level; two residual blocks in the middle; an up
path that mirrors the down path block for block, every residual block taking a skip; a
last residual block and a conv out. Parameters are nested by level: `down[level].res[i]`,
`.downsample`, `.attn`, `.widen`; `mid.res1`, `.res2`; `up[j].res_in`, `.attn`,
`.upsample`, `.res[i]`, `.narrow`; `res_out` (`up[0]` is the lowest resolution).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddpm_jax.models.architecture import DOWNSAMPLE_PADDINGS, Architecture
from ddpm_jax.models.blocks import Blocks, embed_time
from ddpm_jax.models.layers import LayerOps, Layers


class DownLevel(nnx.Module):
    """Residual blocks, a downsample, attention (or None), a widening block (or None)."""

    def __init__(self, res, downsample, attn, widen):
        self.res = nnx.List(res)
        self.downsample, self.attn, self.widen = downsample, attn, widen


class UpLevel(nnx.Module):
    """A block taking a skip, attention (or None), an upsample, residual blocks each taking a
    skip, and a narrowing block taking a skip (or None)."""

    def __init__(self, res_in, attn, upsample, res, narrow):
        self.res_in, self.attn, self.upsample = res_in, attn, upsample
        self.res = nnx.List(res)
        self.narrow = narrow


class Middle(nnx.Module):
    def __init__(self, res1, res2):
        self.res1, self.res2 = res1, res2


class MirrorUNet(nnx.Module):
    """`model(x [B,H,W,C], t [B] int, *, class_labels=None, dropout_keys=None) ->
    [B,H,W,out_channels]` (`class_labels` as `ddpm.DDPMUNet`'s)."""

    def __init__(self, arch: Architecture, *, layer_ops: LayerOps | None = None,
                 rngs: nnx.Rngs):
        layers = Layers(jnp.dtype(arch.dtype), rngs, layer_ops, norm_eps=arch.norm_eps)
        blocks = Blocks(arch, layers)
        padding = DOWNSAMPLE_PADDINGS[arch.downsample_padding]
        widths = arch.widths
        self.arch = arch
        self.temb_dense1 = layers.dense(arch.temb_width, blocks.temb_dim)
        self.temb_dense2 = layers.dense(blocks.temb_dim, blocks.temb_dim)
        self.class_embedding = blocks.class_embedding()
        self.augment_map = blocks.augment_map()
        self.conv_in = layers.conv(arch.in_channels, arch.base_channels)

        channels, down = arch.base_channels, []
        for level, width in enumerate(widths):
            res = []
            for _ in range(arch.num_res_blocks):
                res.append(blocks.res(channels, width))
                channels = width
            downsample = blocks.downsample(width, padding)
            attends = arch.attends(arch.image_size // 2 ** (level + 1))
            attn = blocks.attention(width) if attends else None
            widen = None
            if level < len(widths) - 1:
                widen = blocks.res(width, widths[level + 1])
                channels = widths[level + 1]
            down.append(DownLevel(res, downsample, attn, widen))
        self.down = nnx.List(down)
        self.mid = Middle(blocks.res(channels, channels), blocks.res(channels, channels))

        # Every residual block of the up path takes a skip as wide as its own output.
        up = []
        for level, width in reversed(list(enumerate(widths))):
            res_in = blocks.res(channels + width, width)
            attends = arch.attends(arch.image_size // 2 ** (level + 1))
            attn = blocks.attention(width) if attends else None
            upsample = blocks.upsample(width)
            res = [blocks.res(2 * width, width) for _ in range(arch.num_res_blocks)]
            narrow = None
            if level:
                narrow = blocks.res(2 * width, widths[level - 1])  # skip: the widened map
                channels = widths[level - 1]
            else:
                channels = width
            up.append(UpLevel(res_in, attn, upsample, res, narrow))
        self.up = nnx.List(up)
        self.res_out = blocks.res(channels + arch.base_channels, arch.base_channels)
        self.conv_out = layers.conv(arch.base_channels, arch.out_channels, zero=True)

    def __call__(self, x: jax.Array, t: jax.Array, *, class_labels: jax.Array | None = None,
                 augment_labels: jax.Array | None = None,
                 dropout_keys: jax.Array | None = None) -> jax.Array:
        temb = embed_time(t, self.arch, self.temb_dense1, self.temb_dense2,
                          self.class_embedding, class_labels, self.augment_map, augment_labels)

        def res(block, h, skip=None):
            if skip is not None:
                h = jnp.concatenate([h, skip], axis=-1)
            return block(h, temb, dropout_keys)

        hs = [self.conv_in(x)]
        for level in self.down:
            h = hs[-1]
            for block in level.res:
                h = res(block, h)
                hs.append(h)
            h = level.downsample(h)
            if level.attn is not None:
                h = level.attn(h)
            hs.append(h)
            if level.widen is not None:
                hs.append(res(level.widen, h))

        h = res(self.mid.res2, res(self.mid.res1, hs[-1]))

        for level in self.up:
            h = res(level.res_in, h, hs.pop())
            if level.attn is not None:
                h = level.attn(h)
            h = level.upsample(h)
            for block in level.res:
                h = res(block, h, hs.pop())
            if level.narrow is not None:
                h = res(level.narrow, h, hs.pop())
        h = res(self.res_out, h, hs.pop())
        assert not hs
        return self.conv_out(h).astype(jnp.float32)


def legacy_block_paths(arch: Architecture) -> dict[str, list[tuple]]:
    """Where each block of the flat parameter tree of runs saved before the nesting
    (`encoder[i]`, `middle[i]`, `decoder[i]`, in the order the blocks run) is now."""
    encoder, decoder = [], []
    levels = len(arch.widths)
    for level in range(levels):
        encoder += [("down", level, "res", i) for i in range(arch.num_res_blocks)]
        encoder.append(("down", level, "downsample"))
        if arch.attends(arch.image_size // 2 ** (level + 1)):
            encoder.append(("down", level, "attn"))
        if level < levels - 1:
            encoder.append(("down", level, "widen"))
    for j, level in enumerate(reversed(range(levels))):
        decoder.append(("up", j, "res_in"))
        if arch.attends(arch.image_size // 2 ** (level + 1)):
            decoder.append(("up", j, "attn"))
        decoder.append(("up", j, "upsample"))
        decoder += [("up", j, "res", i) for i in range(arch.num_res_blocks)]
        if level:
            decoder.append(("up", j, "narrow"))
    decoder.append(("res_out",))
    return {"encoder": encoder, "middle": [("mid", "res1"), ("mid", "res2")],
            "decoder": decoder}
