"""The table of networks (`config.model.name`) and what an entry provides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx

from ddpm_jax.core.registry import Registry
from ddpm_jax.models.layers import LayerOps


@dataclasses.dataclass(frozen=True)
class Network:
    """A registered network.

    build: `fn(config, rngs, layer_ops) -> module`; the module maps (x [B, H, W, 3],
        t [B] int, *, dropout_keys=None) to the prediction [B, H, W, 3], and a net that can
        be class-conditional (`model.num_classes` > 0) also takes `class_labels` [B].
    check: `fn(config)`, raising UserError naming the field to change when `config.model`
        cannot be built for `config.data.image_size`; called before anything is compiled.
    from_legacy, to_legacy: optional `fn(params, config) -> params`: parameters of an older
        layout of the net (a checkpoint saved before a change of its tree) in today's tree,
        and back (the tree such a checkpoint holds); None when the net never changed.
    """

    build: Callable[[ml_collections.ConfigDict, nnx.Rngs, LayerOps | None], nnx.Module]
    check: Callable[[ml_collections.ConfigDict], None]
    from_legacy: Callable[[Any, ml_collections.ConfigDict], Any] | None = None
    to_legacy: Callable[[Any, ml_collections.ConfigDict], Any] | None = None


MODELS: Registry[Network] = Registry("model.name")
