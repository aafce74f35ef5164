"""Denoising networks, by name (`config.model.name`; docs/extending.md).

One file per net family (`ddpm.py`: Ho et al.; `mirror.py`: the PyTorch project's), the
blocks they share (`blocks.py`) and the layer implementations handed in from outside
(`layers.py`). A registered `Network` (`base.py`) builds a net from a config.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from ddpm_jax.models import unet  # noqa: F401  (registers "unet")
from ddpm_jax.models.base import MODELS, Network
from ddpm_jax.models.layers import LayerOps


def registered_network(config: ml_collections.ConfigDict) -> Network:
    """The registered network `config.model.name` ("unet" for configs saved before the field)."""
    return MODELS.get(config.model.get("name", "unet"))


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
                 layer_ops: LayerOps | None = None) -> nnx.Module:
    """Builds the network described by `config.model` for images of `config.data.image_size`."""
    return registered_network(config).build(config, rngs, layer_ops)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError when the configured network cannot be built."""
    registered_network(config).check(config)


__all__ = ["MODELS", "LayerOps", "Network", "check_config", "create_model", "registered_network"]
