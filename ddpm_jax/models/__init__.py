"""Denoising networks."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ddpm_jax.models.unet import CONV_ALGORITHMS, UNet

CONV_ALGORITHM_CHOICES = ("auto", *CONV_ALGORITHMS)


def conv_algorithm(config: ml_collections.ConfigDict) -> str:
    """`config.conv_algorithm` with "auto" resolved.

    "auto" is Winograd on the CPU backend (against XLA's convolutions there: the denoiser's
    forward 1.4-1.7x faster, the train step 1.1-1.2x) and XLA's convolutions on every other
    backend (cuDNN and the TPU compiler choose their own algorithms). See docs/benchmarks.md.
    """
    choice = config.get("conv_algorithm", "auto")
    if choice == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "direct"
    return choice


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
        conv_algorithm=conv_algorithm(config),
        rngs=rngs,
    )


__all__ = ["CONV_ALGORITHM_CHOICES", "UNet", "conv_algorithm", "create_model"]
