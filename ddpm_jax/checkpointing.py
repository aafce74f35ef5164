"""Orbax checkpoints of the train state, the data position and the resolved config.

Each step folder holds ``state`` (the `TrainState` pytree), ``position`` (examples of the
data stream consumed, JSON) and ``config`` (JSON); checkpoints written before the position
was counted in examples hold ``data`` (grain's iterator state) instead. Orbax writes a step
to a temporary folder and renames it when complete, so an interrupted save never hides the
previous good one; `newest_readable` picks the newest step that reads, past damaged ones.
A failed save stops the run (`check_saves`) and its temporary folder is removed.
"""

from __future__ import annotations

import errno
import functools
import logging as pylogging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

T = TypeVar("T")


# Orbax's warnings that a read-only manager (the readers' own choice) is read-only
_READ_ONLY_NOTICES = ("read_only=True", "directory is read only")


class _DropOrbaxInfo(pylogging.Filter):
    """Drops Orbax's INFO lines, its notices that a read-only manager is read-only, and the
    tracebacks of its errors (a failed save is reported once, by `save_failed`, with its
    cause); its other warnings and error lines stay."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        if any(notice in record.getMessage() for notice in _READ_ONLY_NOTICES):
            return False
        return record.levelno >= pylogging.WARNING


def hide_orbax_info() -> None:
    """Hides Orbax's INFO lines (it logs every file it writes), its errors' tracebacks and
    the echo of abandoned reads and writes from a command's output; its warnings and error
    lines still show."""
    logging.get_absl_handler().addFilter(_DropOrbaxInfo())
    quiet_abandoned_io()
    # the coroutines of a failed save, collected at exit after the failure was reported
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)


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


def make_manager(
    directory: epath.Path, config: ml_collections.ConfigDict | None = None
) -> ocp.CheckpointManager:
    """A manager keeping the newest `config.keep_checkpoints` steps, saving asynchronously.

    Without `config` it only reads: it deletes nothing, not even the temporary folder of a
    save that a running training job is writing.
    """
    _write_small_arrays_whole()
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


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the run stops."""


class CheckpointReadError(RuntimeError):
    """No checkpoint of a run could be read."""


_OS_ERROR_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                    errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                    errno.EROFS: "the file system is read-only", errno.EFBIG: "a file is too large"}


def os_error_cause(error: BaseException) -> str:
    """The OS-level reason in `error` or the errors it came from, as a person reads it
    ("error" when there is none). TensorStore and TensorFlow report it in their messages."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OS_ERROR_CAUSES:
            where = f" ({error.filename})" if error.filename else ""
            return f"{_OS_ERROR_CAUSES[error.errno]}{where}"
        code = re.search(r"os_error_code='(\d+)'|\[Errno (\d+)\]", str(error))
        number = code and int(code.group(1) or code.group(2))
        if number in _OS_ERROR_CAUSES:
            return _OS_ERROR_CAUSES[number]
        for errno_value, cause in _OS_ERROR_CAUSES.items():
            if os.strerror(errno_value) in str(error):  # TensorFlow's file errors
                return cause
        error = error.__cause__ or error.__context__
    return "error"


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
    quiet_abandoned_io()
    removed = remove_temporary_saves(manager.directory)
    manager.reload()
    kept = manager.all_steps()
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    return CheckpointSaveError(
        f"saving {what} under {manager.directory} failed: {os_error_cause(error)} "
        f"[{error_summary(error)}]."
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


def examples_seen(manager: ocp.CheckpointManager, step: int, stored: dict) -> int:
    """The data position saved with `step`; for checkpoints that predate it (they counted
    batches), `step` batches of the run's batch size."""
    if (epath.Path(manager.directory) / str(step) / "position").exists():
        position = manager.restore(
            step, args=ocp.args.Composite(position=ocp.args.JsonRestore()))["position"]
        return int(position["examples_seen"])
    return step * int(stored.get("batch_size", 0))


def error_summary(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports of long library errors."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()[:300] if lines else ''}"


def set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves checkpoint `step` out of the checkpoint folder, into
    `WORKDIR/damaged_checkpoints/`, so saves can reuse its number; nothing is deleted."""
    source = epath.Path(manager.directory) / str(step)
    target_dir = epath.Path(manager.directory).parent / "damaged_checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"step_{step}_{time.strftime('%Y%m%d-%H%M%S')}"
    source.rename(target)
    return target


class _DropAbandonedCheckpointIo(pylogging.Filter):
    """Drops asyncio's reports of the tasks of a failed save (they name Orbax) and of the
    futures of a failed read nobody awaited (their error is TensorStore's); other asyncio
    errors still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        error = str(record.exc_info[1]) if record.exc_info else ""
        return not ("orbax" in message
                    or ("never retrieved" in message and "tensorstore_spec" in message + error))


def quiet_abandoned_io() -> None:
    """Silences the echo of a failed restore or save: when one array of a checkpoint fails,
    the reads or writes still in flight are abandoned and each prints an 'Event loop is
    closed' traceback, 'Exception ignored in' a coroutine, or asyncio's 'Future exception
    was never retrieved' with TensorStore's error. The failure itself is reported once."""
    if getattr(sys.unraisablehook, "_ddpm_jax_quiet", False):
        return
    pylogging.getLogger("asyncio").addFilter(_DropAbandonedCheckpointIo())

    def echo_of_failed_read(error: BaseException | None, obj: object = None) -> bool:
        return (isinstance(error, RuntimeError) and "Event loop is closed" in str(error)) or (
            "read_array" in getattr(obj, "__qualname__", "") + repr(obj))

    def unraisable(info, previous=sys.unraisablehook):
        if not echo_of_failed_read(info.exc_value, info.object):
            previous(info)

    def excepthook(kind, value, traceback, previous=sys.excepthook):
        if not echo_of_failed_read(value):
            previous(kind, value, traceback)

    unraisable._ddpm_jax_quiet = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


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
            quiet_abandoned_io()
            if os_error_cause(caught) != "error":  # a permission, not damage: move nothing
                raise CheckpointReadError(
                    f"cannot read the checkpoint of step {step} in {manager.directory}: "
                    f"{os_error_cause(caught)} [{error_summary(caught)}]; nothing was moved or "
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
                        "before it", step, manager.directory, error_summary(error))
        failures.append((step, error_summary(error)))
    if failures:
        raise CheckpointReadError(
            f"none of the checkpoints in {manager.directory} can be read ("
            + "; ".join(f"step {step}: {error}" for step, error in failures)
            + "). They are left as they are; use another --workdir to start afresh")
    return None
