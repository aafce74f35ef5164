"""Orbax checkpoints of the train state, the data iterator position and the resolved config.

Each step folder holds three items: ``state`` (the `TrainState` pytree), ``data``
(each process's grain iterator state) and ``config`` (JSON). Orbax writes a step
to a temporary folder and renames it when complete, so an interrupted save never
hides the previous good one; `restore_latest` picks the newest complete step.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def make_manager(
    directory: epath.Path, config: ml_collections.ConfigDict | None = None
) -> ocp.CheckpointManager:
    """A manager keeping the newest `config.keep_checkpoints` steps, saving asynchronously.

    Without `config` it only reads: it deletes nothing, not even the temporary folder of a
    save that a running training job is writing.
    """
    if config is None:
        return ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
        )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        keep_period=config.keep_every_steps or None,  # permanent steps beside the rolling ones
        create=True,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # leftovers of a save killed half-way
    )
    return ocp.CheckpointManager(directory, options=options)


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
    config: ml_collections.ConfigDict,
) -> None:
    """Starts saving `step` (the device-to-host copy happens before this returns)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
    )


def with_defaults(saved: dict) -> dict:
    """`saved` over the base config (configs/default.py): a field added after a run was saved
    takes its default there, so every reader of a saved config sees every field."""
    from configs import default

    merged = default.get_config().to_dict()

    def merge(base: dict, update: dict) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value

    merge(merged, saved)
    return merged


def config_at(manager: ocp.CheckpointManager, step: int) -> dict:
    """The resolved config saved with checkpoint `step`, fields added since then at their
    defaults."""
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return with_defaults(saved)


def latest_config(manager: ocp.CheckpointManager) -> dict | None:
    """The config saved with the newest checkpoint, or None when there is none."""
    step = manager.latest_step()
    return None if step is None else config_at(manager, step)


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """The train state of checkpoint `step`, in `abstract_state`'s shapes and shardings."""
    state = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )["state"]
    logging.info("restored checkpoint of step %d from %s", step, manager.directory)
    return state


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None
) -> tuple[Any | None, bool]:
    """Restores the newest step into `abstract_state`'s shapes and shardings.

    Also moves `data_iter` to the saved position when the checkpoint holds one for this
    process (it does not after a change in the number of processes). Returns the state
    (None when the folder holds no checkpoint) and whether the data position was restored.
    """
    step = manager.latest_step()
    if step is None:
        return None, False
    state = restore_step(manager, step, abstract_state)
    if data_iter is None:
        return state, False
    try:
        manager.restore(
            step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter))
        )
    except Exception as error:  # e.g. saved by another number of processes
        logging.warning("no data-iterator state for this process in step %d (%s)", step, error)
        return state, False
    return state, True
