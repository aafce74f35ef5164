"""A saved run, read back: the config and weights of one of its checkpoints; and a run made
of given weights (`write_run`: an imported model, a post-hoc EMA).

The sample and evaluate commands, the exporter and `ddpm_jax.load_model` read runs through
here. Reading never changes a run: a damaged checkpoint is skipped with a warning, never
moved; checkpoints of any earlier parameter layout are read into today's
(`train.state.restore_train_state`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from ddpm_jax import checkpointing, console, workdir_lock
from ddpm_jax.core.errors import MissingError, UserError
from ddpm_jax.runtime import compiled_sampler, sharding
from ddpm_jax.train import state


def _open_run(workdir: str, step: int | None, read):
    """(step, read(manager, step)) of checkpoint `step`, or of the newest readable one.

    Reads only: a damaged checkpoint is skipped with a warning (never moved or deleted); a
    `step` that was asked for and cannot be read is one error naming it.
    """
    directory = checkpointing.absolute_path(workdir) / "checkpoints"
    if not directory.exists():
        raise MissingError(f"no checkpoints under {directory}; is --workdir a training run?")
    manager = checkpointing.make_manager(directory)  # read-only
    try:
        if step is None:
            found = checkpointing.newest_readable(manager, lambda s: read(manager, s),
                                                  repair=False)
            if found is None:
                raise MissingError(f"no checkpoints under {directory}")
            return found
        if step not in manager.all_steps():
            raise MissingError(f"checkpoint step {step} not in {manager.all_steps()}")
        try:
            return step, read(manager, step)
        except Exception as error:
            console.quiet_abandoned_io()
            raise checkpointing.CheckpointReadError(
                f"the checkpoint of step {step} in {directory} cannot be read "
                f"({console.error_summary(error)}); other steps: "
                f"{[s for s in manager.all_steps() if s != step]}") from error
    finally:
        manager.close()


def _read_config(manager, step: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(checkpointing.config_at(manager, step))


def run_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """(config, step) of a run's checkpoint `step` (default: the newest readable), reading no
    weights; the config has every field, those added since the run at their defaults."""
    step, config = _open_run(workdir, step, _read_config)
    return config, step


class NonFiniteWeightsError(UserError):
    """A checkpoint's weights hold NaN or infinite values."""


def load_run(workdir: str, step: int | None = None, weights: str = "ema"):
    """(config, params, step, mesh) of a run's checkpoint `step` (default: the newest
    readable), restored onto this host's mesh.

    `weights`: "ema" (the EMA when the run keeps one, else the raw weights) or "params";
    the config has every field, those added since the run at their defaults. Weights with
    NaN or infinite values are refused.
    """
    def read(manager, step):
        config = _read_config(manager, step)
        mesh = sharding.create_mesh(config)
        return config, mesh, state.restore_train_state(manager, step, config, mesh)

    step, (config, mesh, restored) = _open_run(workdir, step, read)
    params = compiled_sampler.sampling_params(config, restored, weights)
    finite = jax.tree.map(lambda x: bool(jax.numpy.isfinite(x).all()), params)
    bad = [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(finite)
           if not ok]
    if bad:
        raise NonFiniteWeightsError(
            f"the {weights} weights of step {step} in {workdir} hold NaN or infinite values "
            f"(in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); sample an earlier "
            "--step")
    return config, params, step, mesh


def write_run(config: ml_collections.ConfigDict, params: Any, workdir: str, step: int = 0
              ) -> epath.Path:
    """Writes a run at `workdir` whose checkpoint `step` has `params` as its weights and EMA
    (and a fresh optimizer state), with `config`; a folder that holds checkpoints already is
    refused. Returns the run's path."""
    path = checkpointing.absolute_path(workdir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{workdir} is a file; choose a new folder")
    with workdir_lock.hold(path):  # no training run writes there meanwhile
        # A killed writer left an unfinished save: it is not a checkpoint.
        checkpointing.remove_temporary_saves(path / "checkpoints")
        if checkpointing.finished_steps(path / "checkpoints"):
            raise UserError(f"{workdir} already holds checkpoints; choose a new folder")
        mesh = sharding.create_mesh(config)
        make = lambda p: state.train_state_from_params(config, p).replace(  # noqa: E731
            step=jnp.asarray(step, jnp.int32))
        saved = jax.jit(make, out_shardings=state.train_state_shardings(config, mesh))(params)
        manager = checkpointing.make_manager(path / "checkpoints", config)
        checkpointing.save(manager, step, saved, config)
        manager.wait_until_finished()
        manager.close()
    return path
