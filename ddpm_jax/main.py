"""Entry point: `python -m ddpm_jax.main --config=configs/quickstart.py --workdir=DIR`.

Parses flags, joins the JAX distributed runtime when there are several processes,
and hands over to `train.train_and_evaluate`.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from clu import parameter_overview
from etils import epath
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags

from ddpm_jax import cli, console, train
from ddpm_jax.core.errors import UserError
from ddpm_jax.runtime import memory, network
from ddpm_jax.train import config_checks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py). Any field can be overridden with "
    "--config.FIELD=VALUE; every field is documented in configs/default.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder (local or gs://) for checkpoints, logs and samples.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs started by hand.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("dry_run", False,
                  "Validate the config, print the parameter overview and the compiled step's "
                  "memory, and exit without training.")
flags.DEFINE_bool("steal_lock", False,
                  "Take the workdir from a run that seems to hold it (its lock file names it); "
                  "only when that run is surely gone.")
flags.DEFINE_bool("allow_diffusion_change", False,
                  "Resume with other diffusion.* settings (prediction, schedule, T, betas) "
                  "than the checkpoints were trained with: a deliberate fine-tune.")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables that mean a cluster launcher started several processes, in which
# case `jax.distributed.initialize()` can discover everything by itself.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _launched_by_cluster() -> bool:
    for name in _CLUSTER_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if name == "TPU_WORKER_HOSTNAMES" and value.count(",") >= 1:
            return True
        if value.isdigit() and int(value) > 1:
            return True
    return False


def initialize_distributed() -> None:
    """Joins the JAX distributed runtime: explicitly from flags, or auto-detected on clusters."""
    if FLAGS.coordinator_address:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif _launched_by_cluster():
        jax.distributed.initialize()


def use_compilation_cache(config) -> None:
    """Points JAX's persistent compilation cache at `config.compilation_cache_dir`; "" turns
    it off. JAX_COMPILATION_CACHE_DIR in the environment, where set, takes precedence."""
    path = config.compilation_cache_dir
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    jax.config.update("jax_compilation_cache_dir", path)
    logging.info("compilation cache: %s", path)


def dry_run(config) -> None:
    """Validates `config`, prints the per-module parameter overview, and (unless
    `config.check_memory` is False) compiles the train step and prints and checks its
    memory; trains nothing and writes nothing."""
    config_checks.validate(config, device_count=jax.device_count(),
                           process_count=jax.process_count())
    params = network.abstract_params(config)
    print(parameter_overview.get_parameter_overview(params, include_stats=False))
    print(f"total parameters: {parameter_overview.count_parameters(params)}")
    if not config.check_memory:
        return
    step_fns = train.step_functions(config, train.create_mesh(config))
    compiled = step_fns.compiled(step_fns.per_call)
    needed, (available, where) = memory.step_bytes(compiled), memory.available_bytes()
    if needed is not None:
        print(f"train step memory: {memory.describe(needed, available, where)}")
    memory.check_step_fits(compiled, host=train.host_memory_parts(
        config, 2 * step_fns.per_call, step_fns.per_call))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("%s", cli.overrides_summary(FLAGS["config"]))
    use_compilation_cache(FLAGS.config)
    initialize_distributed()
    logging.info("JAX process %d of %d, %d local / %d global devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend())
    with console.exit_on_user_error("ddpm_jax"):
        if FLAGS.dry_run:
            dry_run(FLAGS.config)
        else:
            train_once_more_without_cache()


def train_once_more_without_cache() -> None:
    """Trains; after an unexplained failure with the compilation cache on, once more without
    it. A second Ctrl-C, a full disk or a permission end the command with one line."""
    suspect_cache = None  # the compilation cache a failed first attempt ran with
    for attempt in (1, 2):
        try:
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir, steal_lock=FLAGS.steal_lock,
                                     allow_diffusion_change=FLAGS.allow_diffusion_change)
            if suspect_cache:
                _clear_compilation_cache(suspect_cache)
            return
        except UserError:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: the first asked for a graceful stop
            sys.exit("ddpm_jax: interrupted (Ctrl-C twice); checkpoints saved so far are "
                     "intact: rerun the same command to resume")
        except Exception as error:  # a full disk or a permission, outside a checkpoint save
            cause = console.os_error_cause(error)
            if cause == "error" and attempt == 1:
                suspect_cache = _without_compilation_cache(error)
                if suspect_cache:
                    continue
            if cause == "error":
                raise
            sys.exit(f"ddpm_jax: {cause} [{console.error_summary(error)}]; checkpoints "
                     "saved so far are intact: fix it and rerun the same command to resume")


def _without_compilation_cache(error: Exception) -> str | None:
    """Turns the persistent compilation cache off after an unexplained failure, so that the
    run is tried once more without it: a damaged cache entry (a program stored under another
    program's key) fails every start with an error from deep inside JAX. Returns the cache
    folder when the run should be tried again (one process, the cache was on), else None."""
    cache = jax.config.jax_compilation_cache_dir
    if not (cache and jax.config.jax_enable_compilation_cache and jax.process_count() == 1):
        return None
    logging.warning("the run failed (%s) with the compilation cache %s on; trying once more "
                    "without it, from the newest checkpoint (a damaged cache entry fails every "
                    "start)", console.error_summary(error), cache)
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is used: again now
    jax.clear_caches()
    return cache


def _clear_compilation_cache(cache: str) -> None:
    """Empties a compilation cache that failed a run which then went through without it: it
    holds a damaged entry, which would fail the next start too. Its programs are compiled and
    stored again as they are needed."""
    removed = 0
    for path in epath.Path(cache).iterdir():
        if path.is_file():
            path.unlink()
            removed += 1
    logging.warning("the run went through without the compilation cache, so %s held a damaged "
                    "entry: removed its %d files", cache, removed)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("ddpm_jax.main"))
