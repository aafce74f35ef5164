"""Device mesh and sharding rules: data parallelism, optionally with FSDP-sharded state.

The mesh has two axes: ``data`` and ``fsdp`` (`config.mesh.fsdp` devices; 1 means pure
data parallelism). The batch is split over both. Parameters, their EMA and the optimizer
state are replicated, or with fsdp > 1 split along ``fsdp`` on their largest dimension
that divides evenly (arrays smaller than `config.mesh.fsdp_min_size` stay replicated);
XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax.core.errors import UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def create_mesh(
    config: ml_collections.ConfigDict | None = None, devices: list[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of every process)."""
    devices = devices if devices is not None else jax.devices()
    fsdp = config.mesh.fsdp if config is not None else 1
    if len(devices) % fsdp:
        raise UserError(f"mesh.fsdp={fsdp} must divide the {len(devices)} devices")
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp), BATCH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices,
    )


def check_config(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """Raises ValueError naming the field when the batch or the mesh cannot be split evenly."""
    accum = config.grad_accum_steps
    if config.batch_size % (device_count * accum) or config.batch_size % process_count:
        raise UserError(
            f"batch_size={config.batch_size} must be divisible by the {device_count} devices "
            f"over {process_count} processes x grad_accum_steps={accum}; use a multiple of "
            f"{device_count * accum}"
        )
    if device_count % config.mesh.fsdp:
        raise UserError(f"mesh.fsdp={config.mesh.fsdp} must divide the {device_count} devices")


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[steps or snapshots, batch, ...]: the batch axis split over every device."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def padded_to_devices(count: int, mesh: jax.sharding.Mesh) -> int:
    """Smallest multiple of the mesh's device count >= count, so a batch shards evenly."""
    devices = mesh.devices.size
    return -(-count // devices) * devices


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Splits the largest dimension divisible by `fsdp`; replicates small or indivisible arrays."""
    size = 1
    for dim in shape:
        size *= dim
    if fsdp == 1 or size < min_size:
        return P()
    candidates = [(dim, axis) for axis, dim in enumerate(shape) if dim % fsdp == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*([None] * axis + [FSDP_AXIS]))


def tree_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh,
                   config: ml_collections.ConfigDict) -> Any:
    """Shardings for a model-sized tree (params, EMA, optimizer state) by the FSDP rule."""
    fsdp = mesh.shape[FSDP_AXIS]

    def rule(leaf):
        return NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp, config.mesh.fsdp_min_size))

    return jax.tree.map(rule, abstract_tree)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict) -> Any:
    """Shardings for a `TrainState`: model-sized trees (the weights, their EMAs and the
    optimizer state) by the FSDP rule, the rest replicated."""
    model_sized = [name for name in ("params", "ema_params", "opt_state", "more_emas")
                   if hasattr(abstract_state, name)]
    return abstract_state.replace(
        step=replicated(mesh), rng=replicated(mesh),
        **{name: tree_shardings(getattr(abstract_state, name), mesh, config)
           for name in model_sized})
