"""The configured network as pure functions over a dict of parameters.

Binds the registered net (`config.model.name`) to the layer implementations `ops` picks for
this backend, then splits it into a static `graphdef` and pure parameters, which the train
step and the sampler pass through `jax.jit` as pytrees.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ddpm_jax import models, ops
from ddpm_jax.runtime import sharding


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The network of `config`, computed with this backend's layer implementations."""
    return models.create_model(config, rngs, ops.layer_ops(config))


class _InitStream(nnx.RngStream):
    """flax's RngStream, drawing the same keys (fold_in(key, draw count)), but advancing its
    count without `Variable.set_value`: under a trace that update asks the new count for a
    `sharding` it does not have, and the error it raises (and discards) first renders the
    trace so far, once per draw, which made tracing a net's initialisation quadratic in its
    size."""

    def __call__(self) -> jax.Array:
        self.count._check_can_update()
        key = jax.random.fold_in(self.key[...], self.count[...])
        self.count.set_raw_value(self.count.get_raw_value() + 1)
        return key


def init_rngs(key: jax.Array | int) -> nnx.Rngs:
    """Rngs with one `params` stream (an `_InitStream`) for building a net."""
    rngs = nnx.Rngs()
    rngs.params = _InitStream(jax.random.key(key) if isinstance(key, int) else key, tag="params")
    return rngs


def config_key(config: ml_collections.ConfigDict) -> str:
    """A key of everything `config` decides, with the layer implementations the net is built
    with, for caching what is derived from them (tracing a net's construction is slow, and
    a run asks for it many times)."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str) + repr(ops.layer_ops(config))


def cached_per_config(fn: Callable[[ml_collections.ConfigDict], Any]):
    """`fn(config)` computed once per distinct `config_key` (for pure, slow derivations)."""
    results: dict[str, Any] = {}

    @functools.wraps(fn)
    def wrapper(config: ml_collections.ConfigDict) -> Any:
        key = config_key(config)
        if key not in results:
            results[key] = fn(config)
        return results[key]

    return wrapper


@cached_per_config
def _abstract(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, abstract parameter state) of `config`'s net."""
    return nnx.split(nnx.eval_shape(lambda: build(config, init_rngs(0))), nnx.Param)


def graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
    """The static structure of the network, built without allocating parameters."""
    return _abstract(config)[0]


def abstract_params(config: ml_collections.ConfigDict) -> Any:
    """Parameter shapes and dtypes (a pure dict of ShapeDtypeStruct), allocating nothing."""
    return nnx.to_pure_dict(_abstract(config)[1])


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
    """Fresh parameters as a pure dict (call under jit to place them directly)."""
    return nnx.to_pure_dict(nnx.state(build(config, init_rngs(rng)), nnx.Param))


def params_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
    """Where each parameter lives: replicated, or split by the FSDP rule of `config.mesh`."""
    return sharding.tree_shardings(abstract_params(config), mesh, config)


def apply(definition: nnx.GraphDef, params: Any, x_t: jax.Array, t: jax.Array,
          dropout_keys: jax.Array | None = None, class_labels: jax.Array | None = None,
          augment_labels: jax.Array | None = None) -> jax.Array:
    """Runs the network on pure parameters; dropout is on only with per-example
    `dropout_keys`; `class_labels` [B] for a class-conditional net (None: unconditional);
    `augment_labels` [B, D] for a net trained with augmentation (None: zeros, none)."""
    # nets registered before conditioning or augmentation need not take them
    conditioning = {name: value for name, value in (("class_labels", class_labels),
                                                    ("augment_labels", augment_labels))
                    if value is not None}
    return nnx.merge(definition, params)(x_t, t, dropout_keys=dropout_keys, **conditioning)


def random_params(config: ml_collections.ConfigDict, seed: int = 0, scale: float = 0.05) -> Any:
    """N(0, scale^2) float32 NumPy arrays for every parameter of `config`'s network.

    For checks that compare two implementations on weights with no structure (conversions,
    round trips); drawn on the host, so nothing is compiled.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(np.float32),
                        abstract_params(config))


def perturbed(params: Any, scale: float = 0.05, seed: int = 0) -> Any:
    """`params` plus N(0, scale^2) noise (fixed seed), each leaf kept where it lives.

    Zero-initialised output layers make a fresh network's output independent of everything
    before them; checks that two ways of computing the network agree need random weights.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [jax.device_put(leaf + scale * jax.random.normal(key, leaf.shape), leaf.sharding)
             for leaf, key in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)
