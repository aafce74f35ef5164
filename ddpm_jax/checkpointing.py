"""Orbax checkpoints of the train state, the data position and the resolved config.

Each step folder holds ``state`` (the `TrainState` pytree), ``position`` (examples of the
data stream consumed, JSON) and ``config`` (JSON); checkpoints written before the position
was counted in examples hold ``data`` (grain's iterator state) instead. Orbax writes a step
to a temporary folder and renames it when complete, so an interrupted save never hides the
previous good one; `newest_readable` picks the newest step that reads, past damaged ones.
A failed save stops the run (`check_saves`) and its temporary folder is removed.
"""

from __future__ import annotations

import ast
import functools
import json
import logging as pylogging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from configs import default
from ddpm_jax import console
from ddpm_jax.core.errors import UserError

T = TypeVar("T")


# Orbax splits each replicated array among its replicas so they share the writing; a slice
# under this size is not worth its own device-to-host copy (one dispatched op each), so
# smaller arrays are written whole by one replica. Only who writes changes, not what.
MIN_SLICE_BYTES_PER_REPLICA = 64 * 1024


@functools.cache
def _write_small_arrays_whole() -> None:
    """Registers Orbax's array handler with `MIN_SLICE_BYTES_PER_REPLICA`, once a process."""
    absl_logger = logging.get_absl_logger()  # Orbax warns of any override, even this one
    level = absl_logger.level
    absl_logger.setLevel(pylogging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_PER_REPLICA),
            override=True)
    finally:
        absl_logger.setLevel(level)


class _DropReadOnlyNotice(pylogging.Filter):
    """Drops Orbax's warning that a manager opened read-only is read-only."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


def make_manager(
    directory: epath.Path, config: ml_collections.ConfigDict | None = None
) -> ocp.CheckpointManager:
    """A manager keeping the newest `config.keep_checkpoints` steps, saving asynchronously.

    Without `config` it only reads: it deletes nothing, not even the temporary folder of a
    save that a running training job is writing.
    """
    _write_small_arrays_whole()
    if config is None:  # a reader: Orbax's notices that it will not write are dropped
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        notice = _DropReadOnlyNotice()
        logging.get_absl_logger().addFilter(notice)
        try:
            return ocp.CheckpointManager(directory, options=options)
        finally:
            logging.get_absl_logger().removeFilter(notice)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        keep_period=config.keep_every_steps or None,  # permanent steps beside the rolling ones
        create=True,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # leftovers of a save killed half-way
    )
    return ocp.CheckpointManager(directory, options=options)


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict,
    examples_seen: int | None = None,
) -> None:
    """Starts saving `step` (the device-to-host copy happens before this returns).

    `examples_seen` is the data position: how many examples of the data stream the run has
    consumed (default `step * batch_size`). Counted in examples, not batches, so a resume with
    another batch size continues at the next unseen example.
    """
    if examples_seen is None:
        examples_seen = step * config.batch_size
    position = {"examples_seen": int(examples_seen), "batch_size": int(config.batch_size)}
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict()),
             "position": ocp.args.JsonSave(position)}
    try:
        manager.save(step, args=ocp.args.Composite(**items))
    except Exception as error:  # this save, or the failure of one still in the background
        raise save_failed(manager, None, error) from error


class CheckpointSaveError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the run stops."""


class CheckpointReadError(UserError, RuntimeError):
    """No checkpoint of a run could be read."""


def absolute_path(path: str) -> epath.Path:
    """Local paths made absolute (Orbax requires it); URLs such as gs://... kept as they are."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def finished_steps(directory: epath.Path) -> list[int]:
    """The steps saved under `directory` (their folders; unfinished saves are named
    otherwise), without opening a manager."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def remove_temporary_saves(directory: epath.Path) -> list[str]:
    """Removes the temporary folders of unfinished saves under `directory` (only the run
    holding the workdir lock may); returns their names."""
    removed = []
    for path in epath.Path(directory).glob("*.orbax-checkpoint-tmp*"):
        try:
            path.rmtree() if path.is_dir() else path.unlink()
            removed.append(path.name)
        except OSError as error:
            logging.warning("could not remove the unfinished save %s: %s", path, error)
    return removed


def save_failed(manager: ocp.CheckpointManager, step: int | None, error: BaseException
                ) -> CheckpointSaveError:
    """The error that stops a run whose save failed, after removing what the save left."""
    console.quiet_abandoned_io()
    removed = remove_temporary_saves(manager.directory)
    manager.reload()
    kept = manager.all_steps()
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    return CheckpointSaveError(
        f"saving {what} under {manager.directory} failed: {console.os_error_cause(error)} "
        f"[{console.error_summary(error)}]."
        f"{' Removed the unfinished save.' if removed else ''} "
        + (f"The checkpoints of steps {kept} are intact; " if kept else "No checkpoint was "
           "complete yet; ")
        + "free space (or fix permissions) and rerun the same command to resume")


def check_saves(manager: ocp.CheckpointManager, step: int | None = None,
                wait: bool = False) -> None:
    """Raises CheckpointSaveError if a background save failed (`wait`: after waiting for
    the one in progress)."""
    try:
        manager.wait_until_finished() if wait else manager.check_for_errors()
    except Exception as error:
        raise save_failed(manager, step, error) from error


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


def saved_param_keys(manager: ocp.CheckpointManager, step: int) -> set[str] | None:
    """The top-level names of the parameter tree checkpoint `step` holds (read from its tree
    metadata, no arrays), or None when it cannot tell."""
    path = epath.Path(manager.directory) / str(step) / "state" / "_METADATA"
    try:
        paths = json.loads(path.read_text())["tree_metadata"]
    except (OSError, ValueError, KeyError):
        return None
    keys = set()
    for text in paths:
        try:
            key = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
        if isinstance(key, tuple) and len(key) > 1 and key[0] == "params":
            keys.add(str(key[1]))
    return keys or None


def examples_seen(manager: ocp.CheckpointManager, step: int, stored: dict) -> int:
    """The data position saved with `step`; for checkpoints that predate it (they counted
    batches), `step` batches of the run's batch size."""
    if (epath.Path(manager.directory) / str(step) / "position").exists():
        position = manager.restore(
            step, args=ocp.args.Composite(position=ocp.args.JsonRestore()))["position"]
        return int(position["examples_seen"])
    return step * int(stored.get("batch_size", 0))


def set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves checkpoint `step` out of the checkpoint folder, into
    `WORKDIR/damaged_checkpoints/`, so saves can reuse its number; nothing is deleted."""
    source = epath.Path(manager.directory) / str(step)
    target_dir = epath.Path(manager.directory).parent / "damaged_checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"step_{step}_{time.strftime('%Y%m%d-%H%M%S')}"
    source.rename(target)
    return target


def newest_readable(
    manager: ocp.CheckpointManager, read: Callable[[int], T], *,
    repair: bool, passthrough: tuple[type[BaseException], ...] = (),
) -> tuple[int, T] | None:
    """(step, read(step)) for the newest step `read` succeeds on; None when there are none.

    A step that fails to read is skipped with a warning naming it and the error; with
    `repair` (the run holding the workdir lock), once an older step was read, the damaged
    newer ones are moved aside (`set_aside`). When no step can be read, nothing is moved
    and CheckpointReadError says so. Errors of the `passthrough` types (a config that does
    not match the checkpoint) are raised as they are. All processes take the same step.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            result, error = read(step), None
        except passthrough:
            raise
        except Exception as caught:  # TensorStore, JSON, missing files: all mean damage
            result, error = None, caught
            console.quiet_abandoned_io()
            if console.os_error_cause(caught) != "error":  # a permission, not damage: move nothing
                raise CheckpointReadError(
                    f"cannot read the checkpoint of step {step} in {manager.directory}: "
                    f"{console.os_error_cause(caught)} [{console.error_summary(caught)}]; nothing was moved or "
                    "changed: fix it and rerun") from caught
        if jax.process_count() > 1:  # one process that cannot read makes it unreadable
            flags = multihost_utils.process_allgather(np.int32(error is None))
            if error is None and not np.all(flags):
                error = RuntimeError("another process could not read it")
        if error is None:
            if repair and failures:
                if jax.process_index() == 0:
                    for damaged, _ in failures:
                        logging.warning("moved the unreadable checkpoint of step %d to %s",
                                        damaged, set_aside(manager, damaged))
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices("damaged checkpoints set aside")
                manager.reload()
            return step, result
        logging.warning("the checkpoint of step %d in %s cannot be read (%s); trying the one "
                        "before it", step, manager.directory, console.error_summary(error))
        failures.append((step, console.error_summary(error)))
    if failures:
        raise CheckpointReadError(
            f"none of the checkpoints in {manager.directory} can be read ("
            + "; ".join(f"step {step}: {error}" for step, error in failures)
            + "). They are left as they are; use another --workdir to start afresh")
    return None


# A class-conditional run's classes, in label order: written at its start, read by a resume
# (which must see the same classes) and by the commands that sample it (`--class_labels`).
CLASSES_FILE = "classes.json"


def saved_classes(workdir: str | epath.Path) -> list[str] | None:
    """The class names saved with a run (None: none saved, an unconditional run)."""
    path = absolute_path(str(workdir)) / CLASSES_FILE
    if not path.exists():
        return None
    return list(json.loads(path.read_text())["classes"])


def saved_class_counts(workdir: str | epath.Path) -> list[int] | None:
    """The image count of each class saved with a run (None: not counted or not saved)."""
    path = absolute_path(str(workdir)) / CLASSES_FILE
    return json.loads(path.read_text()).get("counts") if path.exists() else None


def save_classes(workdir: epath.Path, names: list[str], counts: list[int] | None) -> None:
    """Writes the run's classes (and their image counts, where known) on process 0."""
    if jax.process_index() != 0:
        return
    text = json.dumps({"classes": list(names), "counts": counts}, indent=1)
    temporary = workdir / f".{CLASSES_FILE}.tmp"
    temporary.write_text(text)
    temporary.rename(workdir / CLASSES_FILE)  # whole, or not at all
