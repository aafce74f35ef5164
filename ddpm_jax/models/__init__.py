"""Denoising networks, by name (`config.model.name`; README, "Extending")."""

from __future__ import annotations

import ml_collections
from flax import nnx

from ddpm_jax.models import unet  # noqa: F401  (registers "unet")
from ddpm_jax.models.base import MODELS, Network
from ddpm_jax.models.layers import LayerOps
from ddpm_jax.models.unet import UNet


def network(config: ml_collections.ConfigDict) -> Network:
    """The registered network `config.model.name` ("unet" for configs saved before the field)."""
    return MODELS.get(config.model.get("name", "unet"))


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
                 layer_ops: LayerOps | None = None) -> nnx.Module:
    """Builds the network described by `config.model` for images of `config.data.image_size`."""
    return network(config).build(config, rngs, layer_ops)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError when the configured network cannot be built."""
    network(config).check(config)


__all__ = ["MODELS", "LayerOps", "Network", "UNet", "check_config", "create_model", "network"]
