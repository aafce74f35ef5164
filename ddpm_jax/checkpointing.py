"""Orbax checkpoints of the train state, the data iterator position and the resolved config.

Each step folder holds three items: ``state`` (the `TrainState` pytree), ``data``
(each process's grain iterator state) and ``config`` (JSON). Orbax writes a step
to a temporary folder and renames it when complete, so an interrupted save never
hides the previous good one; `restore_latest` picks the newest complete step.
"""

from __future__ import annotations

import logging as pylogging
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class _DropOrbaxInfo(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def hide_orbax_info() -> None:
    """Hides Orbax's INFO lines (it logs every file it writes) from the absl log of a
    command; its warnings and errors still show."""
    logging.get_absl_handler().addFilter(_DropOrbaxInfo())


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
    manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None,
    config: ml_collections.ConfigDict,
) -> None:
    """Starts saving `step` (the device-to-host copy happens before this returns).

    Without `data_iter` (weights converted from elsewhere) the step holds no data position,
    and a run resumed from it starts the data at its step.
    """
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items))


# Fields added after runs were saved, with the value such runs were trained with where it is
# not the field's default today: before `model.downsample_padding` existed, the stride-2
# convs were padded 1 on each side; before `spacing`, every sampler visited linspace steps.
LEGACY_VALUES = {("model", "downsample_padding"): "symmetric",
                 ("sample", "spacing"): "linspace", ("eval", "spacing"): "linspace"}


def legacy_values(saved: dict) -> dict[tuple[str, str], object]:
    """The `LEGACY_VALUES` of the fields that `saved` (a config as stored) predates."""
    return {(section, key): value for (section, key), value in LEGACY_VALUES.items()
            if key not in saved.get(section, {})}


def with_defaults(saved: dict) -> dict:
    """`saved` over the base config (configs/default.py): a field added after a run was saved
    takes its default there, or the value the run was trained with (`LEGACY_VALUES`), so
    every reader of a saved config sees every field as the run used it."""
    from configs import default

    merged = default.get_config().to_dict()
    for (section, key), value in legacy_values(saved).items():
        merged[section][key] = value

    def merge(base: dict, update: dict) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value

    merge(merged, saved)
    return merged


def stored_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with checkpoint `step`, as stored."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def config_at(manager: ocp.CheckpointManager, step: int) -> dict:
    """The resolved config saved with checkpoint `step`, fields added since then at their
    defaults (or `LEGACY_VALUES`)."""
    return with_defaults(stored_config(manager, step))


def latest_stored_config(manager: ocp.CheckpointManager) -> dict | None:
    """The config saved with the newest checkpoint as stored, or None when there is none."""
    step = manager.latest_step()
    return None if step is None else stored_config(manager, step)


def keep_legacy_values(config: ml_collections.ConfigDict, stored: dict) -> None:
    """Sets in `config` the fields `stored` predates to the values its run was trained with,
    so a run saved before a field existed resumes as it was trained (logged)."""
    for (section, key), value in legacy_values(stored).items():
        if config[section][key] != value:
            logging.warning("the checkpoints predate %s.%s: resuming with %r, the value they "
                            "were trained with (the config has %r)", section, key, value,
                            config[section][key])
            config[section][key] = value


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
    except Exception as error:  # saved by another number of processes, or converted weights
        logging.warning("step %d holds no data position for this process (%s); the data "
                        "starts where step %d starts in a fresh run", step, error, step)
        return state, False
    return state, True
