"""Denoising networks."""

from __future__ import annotations

import ml_collections
from flax import nnx

from ddpm_jax.models.unet import UNet


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> UNet:
    """Builds the UNet described by `config.model` for images of `config.data.image_size`."""
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
        in_channels=3,
        out_channels=3,
        dtype=m.dtype,
        remat=m.remat,
        rngs=rngs,
    )


__all__ = ["UNet", "create_model"]
