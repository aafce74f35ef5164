"""The run's TensorBoard (and W&B) writer, whose failures stop the run with one line."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from ddpm_jax import console, metric_writers, wandb_writer
from ddpm_jax.core.errors import UserError


class LogWriteError(UserError, RuntimeError):
    """The TensorBoard logs could not be written (disk full, permissions)."""


def write_error(workdir_path: epath.Path, error: BaseException) -> LogWriteError:
    """The one-line error of a failed TensorBoard write (the asynchronous writer reports the
    cause of an earlier write at the next call, chained)."""
    cause = error.__cause__ or error.__context__ or error
    return LogWriteError(
        f"could not write the TensorBoard logs in {workdir_path}: "
        f"{console.os_error_cause(error)} ({console.error_summary(cause)}); "
        "checkpoints are intact: fix it and rerun the same command")


class CheckedWriter:
    """A metric writer whose failures (a full disk, a permission) raise LogWriteError."""

    def __init__(self, writer, workdir_path: epath.Path):
        self._writer, self._workdir_path = writer, workdir_path

    def __getattr__(self, name: str):
        method = getattr(self._writer, name)

        def checked(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except LogWriteError:
                raise
            except Exception as error:
                raise write_error(self._workdir_path, error) from error

        return checked


def open_writer(config: ml_collections.ConfigDict, workdir_path: epath.Path
                ) -> tuple[CheckedWriter, Any]:
    """(the run's checked writer, its W&B run or None): TensorBoard files in the workdir on
    process 0 (the others only log), plus W&B where `config.wandb.project` is set."""
    writer = metric_writers.create_default_writer(
        str(workdir_path), just_logging=jax.process_index() > 0)
    wandb_run = None
    if config.wandb.project and jax.process_index() == 0:
        wandb_run = wandb_writer.WandbWriter(config, str(workdir_path))
        writer = metric_writers.MultiWriter([writer, wandb_run])
    return CheckedWriter(writer, workdir_path), wandb_run


def flush(writer, workdir_path: epath.Path, failed: bool) -> None:
    """Flushes the metric writers; a failure is a warning when the run already failed (its
    own error is the one to report), else LogWriteError."""
    try:
        writer.flush()
    except Exception as error:
        if failed:
            logging.warning("could not flush the TensorBoard logs: %s", error)
            return
        if isinstance(error, LogWriteError):
            raise
        raise write_error(workdir_path, error) from error


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Config as flat scalars for TensorBoard's hparams plugin."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                visit(f"{prefix}{key}.", sub)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config.to_dict())
    return flat
