"""The train state: weights, their EMA, the optimizer and its state, the step and the base rng.

`TrainState` holds its optimizer (`tx`, a static field compared by its settings), so the
step applies updates with the optimizer that made the state. A run with power-function EMAs
(`ema.kind="power"`) has a `PowerEMATrainState`: `ema_params` is the EMA of the first
`ema.sigma_rels`, `more_emas` those of the others. Built directly on the devices
in its final sharding; restored from checkpoints of any earlier parameter layout.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import checkpointing, models
from ddpm_jax.runtime import network, sharding
from ddpm_jax.train import optimizer


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a checkpoint restores exactly its arrays."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # base key; step keys are fold_in(rng, step), so resuming needs nothing else
    tx: optimizer.Optimizer = flax.struct.field(pytree_node=False, default=None)

    def apply_gradients(self, grads: Any, ema_decays: tuple[jax.Array, ...]) -> TrainState:
        """One optimizer update of the weights, then of each EMA (`ema_decays`, one per EMA:
        `ema_params`, then `more_emas` where the state has them)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(params=params, opt_state=opt_state,
                            **self.updated_emas(params, ema_decays))

    def updated_emas(self, params: Any, ema_decays: tuple[jax.Array, ...]) -> dict[str, Any]:
        """The EMA fields after an update to `params`."""
        (ema_decay,) = ema_decays
        return {"ema_params": _ema_update(self.ema_params, params, ema_decay)}


def _ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


@flax.struct.dataclass
class PowerEMATrainState(TrainState):
    """The state of a run with power-function EMAs: `ema_params` is the EMA of the first
    of `ema.sigma_rels`, `more_emas` a tuple of those of the rest."""

    more_emas: tuple = ()

    def updated_emas(self, params: Any, ema_decays: tuple[jax.Array, ...]) -> dict[str, Any]:
        first, *rest = ema_decays
        return {"ema_params": _ema_update(self.ema_params, params, first),
                "more_emas": tuple(_ema_update(ema, params, decay)
                                   for ema, decay in zip(self.more_emas, rest, strict=True))}

    def emas(self) -> tuple:
        """Every EMA, in the order of `ema.sigma_rels`."""
        return (self.ema_params, *self.more_emas)


def is_power_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` trains power-function EMAs (`ema.kind="power"`)."""
    return config.get("ema", {}).get("kind", "exponential") == "power"


def init_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """Fresh parameters, EMA copy, optimizer state and base rng (call under jit)."""
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    return train_state_from_params(config, network.init_params(config, init_rng))


def train_state_from_params(config: ml_collections.ConfigDict, params: Any) -> TrainState:
    """The state at step 0 with `params` as weights and EMA, a fresh optimizer state and the
    base rng of `config.seed` (call under jit)."""
    _, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    tx = optimizer.Optimizer.of(config)
    fields = dict(step=jnp.zeros((), jnp.int32), params=params,
                  ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                  rng=train_rng, tx=tx)
    if is_power_ema(config):
        more = tuple(jax.tree.map(jnp.copy, params) for _ in config.ema.sigma_rels[1:])
        return PowerEMATrainState(**fields, more_emas=more)
    return TrainState(**fields)


@network.cached_per_config
def train_state_shapes(config: ml_collections.ConfigDict) -> TrainState:
    """Shapes and dtypes of the state of `config` (traced once per config)."""
    return jax.eval_shape(functools.partial(init_train_state, config))


def train_state_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Where each leaf of the state lives (replicated, or FSDP-split by `config.mesh`)."""
    return sharding.state_shardings(train_state_shapes(config), mesh, config)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Initialises the state directly on the devices, in its final sharding."""
    return jax.jit(functools.partial(init_train_state, config),
                   out_shardings=train_state_shardings(config, mesh))()


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint into."""
    shapes = train_state_shapes(config)
    shardings = sharding.state_shardings(shapes, mesh, config)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def _map_param_trees(tree: Any, like: Any, fn) -> Any:
    """`fn` applied to every subtree of `tree` shaped like the parameters `like` (the
    weights, their EMA, the optimizer's moments); every other leaf kept."""
    keys = set(like)
    is_params = lambda x: isinstance(x, dict) and set(x) == keys  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if is_params(x) else x, tree, is_leaf=is_params)


def restore_train_state(manager: Any, step: int, config: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh) -> TrainState:
    """The train state of checkpoint `step`, in this version's parameter tree: a checkpoint
    written with an earlier layout of the net is read in that layout and moved over (the
    network's `from_legacy`)."""
    abstract = abstract_train_state(config, mesh)
    net = models.registered_network(config)
    saved = checkpointing.saved_param_keys(manager, step)
    if net.to_legacy is None or saved is None or saved == set(abstract.params):
        return checkpointing.restore_step(manager, step, abstract)
    legacy = _map_param_trees(abstract, abstract.params, lambda p: net.to_legacy(p, config))
    state = checkpointing.restore_step(manager, step, legacy)
    return _map_param_trees(state, legacy.params, lambda p: net.from_legacy(p, config))
