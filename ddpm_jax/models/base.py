"""The table of networks (`config.model.name`) and what an entry provides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
from flax import nnx

from ddpm_jax.models.layers import LayerOps
from ddpm_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Network:
    """A registered network.

    build: `fn(config, rngs, layer_ops) -> module`; the module maps (x [B, H, W, 3],
        t [B] int, *, dropout_keys=None) to the prediction [B, H, W, 3].
    check: `fn(config)`, raising ValueError naming the field to change when `config.model`
        cannot be built for `config.data.image_size`; called before anything is compiled.
    """

    build: Callable[[ml_collections.ConfigDict, nnx.Rngs, LayerOps | None], nnx.Module]
    check: Callable[[ml_collections.ConfigDict], None]


MODELS: Registry[Network] = Registry("model.name")
