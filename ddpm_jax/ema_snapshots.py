"""Snapshots of a run's power-function EMAs (`ema.kind="power"`): WORKDIR/ema_snapshots/STEP.

Each snapshot is a small Orbax checkpoint of its own: ``emas`` (the EMA of each of
`ema.sigma_rels` at that step, in that order) and ``meta`` (the step, the sigma_rels and the
run's config, JSON). Every snapshot is kept: they are what the post-hoc reconstruction
(`ddpm_jax.ema reconstruct`) combines, and the training checkpoints' pruning never touches
them. A run that resumes from a checkpoint older than a snapshot writes that snapshot again
(the resumed run's trajectory is the one its later snapshots must describe).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax import checkpointing
from ddpm_jax.core.errors import MissingError

FOLDER = "ema_snapshots"


def directory(workdir: str | epath.Path) -> epath.Path:
    return checkpointing.absolute_path(str(workdir)) / FOLDER


def make_manager(folder: epath.Path, write: bool) -> ocp.CheckpointManager:
    """A manager of the snapshots under `folder` that keeps every one (`write`: saving in the
    background, after removing what a killed save left; else reading only)."""
    if not write:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        return ocp.CheckpointManager(folder, options=options)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(folder, options=options)


def every_steps(config: ml_collections.ConfigDict) -> int:
    """How often a power-EMA run snapshots (`ema.snapshot_every_steps`, 0: as it saves)."""
    return config.ema.snapshot_every_steps or config.save_every_steps


def save(manager: ocp.CheckpointManager, step: int, emas: tuple,
         config: ml_collections.ConfigDict) -> None:
    """Starts saving the snapshot of `step` (replacing one of the same step)."""
    if step in manager.all_steps():
        manager.delete(step)
    meta = {"step": int(step), "sigma_rels": [float(s) for s in config.ema.sigma_rels],
            "config": config.to_dict()}
    manager.save(step, args=ocp.args.Composite(emas=ocp.args.StandardSave(list(emas)),
                                               meta=ocp.args.JsonSave(meta)))


def steps(workdir: str) -> list[int]:
    """The steps of a run's finished snapshots."""
    return checkpointing.finished_steps(directory(workdir))


def read_meta(workdir: str) -> dict[int, dict]:
    """{step: meta (its "sigma_rels" and "config")} of every snapshot of a run."""
    folder = directory(workdir)
    found = steps(workdir)
    if not found:
        raise MissingError(f"no EMA snapshots under {folder}: the run must train with "
                           "--config.ema.kind=power (snapshots every ema.snapshot_every_steps)")
    manager = make_manager(folder, write=False)
    try:
        return {step: manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"] for step in found}
    finally:
        manager.close()


def weighted_sum(workdir: str, snapshots: dict[int, list[float]],
                 weights: dict[tuple[int, int], float], like: Any) -> Any:
    """sum over (step, k) of weights[(step, k)] x the k-th EMA of snapshot `step` (whose
    sigma_rels `snapshots` gives), as a tree of float32 NumPy arrays shaped as `like`
    (abstract parameters); summed in float64, one snapshot in memory at a time."""
    total = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float64), like)
    manager = make_manager(directory(workdir), write=False)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        for step in sorted({step for step, _ in weights}):
            count = len(snapshots[step])
            abstract = [jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                      sharding=device), like)
                        for _ in range(count)]
            emas = manager.restore(step, args=ocp.args.Composite(
                emas=ocp.args.StandardRestore(abstract)))["emas"]
            for k, ema in enumerate(emas):
                weight = weights.get((step, k), 0.0)
                if weight:
                    total = jax.tree.map(lambda t, e, w=weight: t + w * np.asarray(e, np.float64),
                                         total, ema)
    finally:
        manager.close()
    return jax.tree.map(lambda leaf: leaf.astype(np.float32), total)
