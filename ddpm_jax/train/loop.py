"""Training: `train_and_evaluate` sets a run up, and `loop` runs it.

The state (`state.py`) is initialised on the devices or restored from the newest readable
checkpoint; the step (`step.py`) is compiled by the runtime for this mesh and backend
(`runtime.compile`); between calls of the step the loop runs its events (`events.py`): the
scalar log, the evaluators (sample grids, FID), the checkpoint and a profile. The batch is
sharded over every device of a (data, fsdp) mesh; the state is replicated or FSDP-split.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from etils import epath

from ddpm_jax import (
    checkpointing,
    data_sources,
    ema_snapshots,
    input_pipeline,
    metric_logs,
    preemption,
    recipe,
    workdir_lock,
)
from ddpm_jax.progress import TrainingProgress, format_seconds
from ddpm_jax.runtime import compiled_step, flops, memory, network, sharding
from ddpm_jax.train import config_checks, events
from ddpm_jax.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    is_power_ema,
    restore_train_state,
    train_state_shapes,
    train_state_shardings,
)
from ddpm_jax.train.step import train_step


def event_intervals(config: ml_collections.ConfigDict, with_fid: bool) -> list[int]:
    """The step intervals at which the loop logs, samples, saves and (`with_fid`) evaluates."""
    intervals = [config.log_every_steps, config.sample_every_steps, config.save_every_steps]
    if is_power_ema(config):
        intervals.append(ema_snapshots.every_steps(config))
    if with_fid:
        intervals.append(config.get("eval_every_steps", 0))
    return [interval for interval in intervals if interval > 0]


def steps_per_dispatch(config: ml_collections.ConfigDict, more_intervals: Sequence[int] = ()
                       ) -> int:
    """Train steps per compiled call for `config` on this backend (every event interval, and
    those of registered evaluators, `more_intervals`, a multiple of it)."""
    intervals = event_intervals(config, with_fid=True) + [i for i in more_intervals if i > 0]
    return compiled_step.steps_per_call(config, intervals)


def _step_fn(config: ml_collections.ConfigDict):
    """`train_step` bound to `config`'s network and schedule: `fn(state, batch, *,
    micro_batches)`."""
    return functools.partial(train_step, config=config, graphdef=network.graphdef(config),
                             schedule=recipe.schedule(config))


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    num_steps: int = 1):
    """The jitted train step of `config` for `mesh` (`runtime.compiled_step.jit_step`)."""
    return compiled_step.jit_step(_step_fn(config), config, mesh,
                                  train_state_shardings(config, mesh), num_steps)


def step_functions(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   more_intervals: Sequence[int] = ()) -> compiled_step.StepFunctions:
    """The train step of `config`, compiled by the runtime for `mesh` (one step per call, and
    as many per call as the loop's events allow)."""
    return compiled_step.StepFunctions(_step_fn(config), abstract_train_state(config, mesh),
                                       config, mesh, steps_per_dispatch(config, more_intervals))


def model_flops_per_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         conv_algorithm: str = "direct") -> float:
    """FLOPs of one train step of `config` over its global batch (`runtime.flops.step_flops`),
    its 3x3 convolutions computed by `conv_algorithm`: "direct" gives the network's own
    count, whichever algorithm the backend runs (Winograd executes fewer)."""
    counted = config.copy_and_resolve_references()
    counted.conv_algorithm = conv_algorithm
    return flops.step_flops(_step_fn(counted), train_state_shapes(config),
                            compiled_step.abstract_batch(config, mesh))


def step_performance(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                     ) -> events.Performance | None:
    """What the scalar log needs for model TFLOP/s per device and MFU (logged here once);
    None when `log_model_flops` is off, or, with a warning, where the step's FLOPs cannot
    be counted (training goes on)."""
    if not config.get("log_model_flops", True):
        return None
    try:
        step_flops = model_flops_per_step(config, mesh)
    except Exception as error:  # a metric must never stop a run
        logging.warning("could not count the train step's FLOPs (%s: %s); TensorBoard gets no "
                        "model_tflops_per_device or mfu", type(error).__name__, error)
        return None
    kind = jax.devices()[0].device_kind
    peak = flops.peak_flops_per_device(kind, config.get("peak_tflops_per_device", 0.0))
    logging.info("model FLOPs per train step: %s GFLOP (XLA's cost analysis); %s",
                 f"{step_flops / 1e9:,.4g}",
                 f"peak {peak / 1e12:g} TFLOP/s per device ({kind}): TensorBoard gets "
                 "model_tflops_per_device and mfu" if peak else
                 f"no known peak for device kind {kind!r}: TensorBoard gets "
                 "model_tflops_per_device (set peak_tflops_per_device for mfu)")
    return events.Performance(step_flops, jax.device_count(), peak)


def loop(state: TrainState, step_fns: compiled_step.StepFunctions, batches: Iterator,
         run_events: list[events.Event], scalars: events.ScalarLog, finite: events.FiniteCheck,
         watcher: preemption.PreemptionWatcher, end: int) -> TrainState:
    """Trains from `state` to step `end`: each call of the step runs as many steps as fit
    before the next event, then every event that is due runs; a stop request saves and
    stops."""
    step = int(state.step)
    while step < end:
        due_next = min([end] + [(step // e.every_steps + 1) * e.every_steps
                                for e in run_events if e.every_steps > 0])
        count = step_fns.steps_in_next_call(step, due_next)
        state, metrics = step_fns(state, [next(batches) for _ in range(count)])
        step += count
        finite.add(step, metrics)
        scalars.add(metrics)
        stop, last = watcher.should_stop(), step == end
        for event in run_events:
            if event.due(step, last, stop):
                stop = not event(step, state) or stop
        if stop:
            logging.warning("stopped at step %d; rerun the same command to resume", step)
            break
    finite.check_all()
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       steal_lock: bool = False,
                       allow_diffusion_change: bool = False) -> TrainState:
    """Trains for `config.num_train_steps`, resuming from the newest readable checkpoint in
    `workdir`, which this run holds alone while it trains (`workdir_lock`).

    `steal_lock` takes the workdir from a run that still seems to hold it;
    `allow_diffusion_change` resumes with other `diffusion.*` targets or schedules (a
    deliberate fine-tune) instead of refusing.
    """
    workdir_path = checkpointing.absolute_path(workdir)
    existed = workdir_path.exists()
    try:
        config_checks.validate(config, str(workdir_path), device_count=jax.device_count(),
                               process_count=jax.process_count())
        source = data_sources.make_source(config.data)  # fails fast on missing data
        # SIGTERM and Ctrl-C are caught from here on: one during start-up (a compile takes
        # minutes) stops the run before its first step, releasing the lock.
        with workdir_lock.hold(workdir_path, steal=steal_lock) as holding, \
                preemption.PreemptionWatcher() as watcher:
            return _train(config, workdir_path, workdir, source, allow_diffusion_change,
                          holding, watcher)
    except BaseException:
        if not existed:
            _remove_if_unused(workdir_path)
        raise


def _remove_if_unused(workdir_path: epath.Path) -> None:
    """Removes a workdir this run created and left empty (it failed before writing
    anything), so a failed start leaves nothing behind."""
    if jax.process_index() == 0 and workdir_path.exists() and not any(workdir_path.iterdir()):
        workdir_path.rmdir()


def _restore(config: ml_collections.ConfigDict, manager: Any, mesh: jax.sharding.Mesh,
             allow_diffusion_change: bool) -> tuple[TrainState | None, int]:
    """(state, examples seen) of the newest readable checkpoint; (None, 0) for a new run."""

    def read(step: int) -> tuple[TrainState, int]:
        stored = checkpointing.stored_config(manager, step)
        # Before anything is built from the config: a resumed run keeps its legacy values.
        checkpointing.keep_legacy_values(config, stored)
        config_checks.check_compatible(checkpointing.with_defaults(stored), config,
                                       allow_diffusion_change=allow_diffusion_change)
        state = restore_train_state(manager, step, config, mesh)
        return state, checkpointing.examples_seen(manager, step, stored)

    restored = checkpointing.newest_readable(manager, read, repair=True,
                                             passthrough=(config_checks.ConfigError,))
    return restored[1] if restored else (None, 0)


def _train(config: ml_collections.ConfigDict, workdir_path: epath.Path, workdir: str,
           source: Any, allow_diffusion_change: bool, holding: workdir_lock.Holding,
           watcher: preemption.PreemptionWatcher) -> TrainState:
    started = time.perf_counter()
    check_classes(config, source, workdir_path)
    manager = checkpointing.make_manager(workdir_path / "checkpoints", config)
    mesh = sharding.create_mesh(config)
    logging.info("mesh: %s over %d processes", dict(mesh.shape), jax.process_count())
    state, examples = _restore(config, manager, mesh, allow_diffusion_change)
    if state is not None and int(state.step) >= config.num_train_steps:
        manager.close()
        _log_lines(lambda: [
            f"{workdir} has already finished: its newest checkpoint is step {int(state.step)} "
            f"of num_train_steps={config.num_train_steps}; nothing to train (pass "
            f"--config.num_train_steps=N, N > {int(state.step)}, to train longer)",
            *([f"profile_steps={config.profile_steps}: nothing traced, as no step is left to "
               "train"] if config.profile_steps else []),
            *_where_things_are(workdir, workdir_path)])
        return state
    run = events.Run(config, str(workdir_path), mesh, None, None, watcher, holding, manager)
    evaluators = events.build_evaluators(run)
    step_fns = step_functions(config, mesh, [e.every_steps for e in evaluators])
    prefetch = 2 * step_fns.per_call  # the next call's batches are read while one runs
    batches = iter(input_pipeline.create_dataset(
        config, source, process_index=jax.process_index(), process_count=jax.process_count(),
        start_example=examples, prefetch_batches=prefetch))
    if config.check_memory:  # compiles the step training uses: no extra work
        step_fns.check_memory(host_memory_parts(config, prefetch, step_fns.per_call))
    if state is None:
        state = create_train_state(config, mesh)
    initial_step = int(state.step)
    if watcher.should_stop():  # during start-up: nothing trained, so nothing to save
        manager.close()
        logging.warning("stopped before step %d, during start-up: nothing was trained or "
                        "written; rerun the same command to start", initial_step)
        return state
    performance = step_performance(config, mesh)  # after the stop check: a stopped start skips it
    logging.info("starting at step %d of %d (example %d of the data stream)", initial_step,
                 config.num_train_steps, examples)

    run.writer, wandb_run = metric_logs.open_writer(config, workdir_path)
    if initial_step == 0:
        run.writer.write_hparams(metric_logs.flat_hparams(config))
        # the per-module table shows with --verbosity=1 (and in --dry_run)
        parameter_overview.log_parameter_overview(state.params, msg="model parameters",
                                                  jax_logging_process=0)
    logging.info("model: %s parameters", f"{parameter_overview.count_parameters(state.params):,}")
    run.progress = TrainingProgress(initial_step, config.num_train_steps, config.batch_size)

    finite = events.FiniteCheck(config)
    seen = [examples]  # position in the data stream, after the steps trained so far
    scalars = events.ScalarLog(run, lambda step: {
        e.name: events_left(config, step, e.every_steps) for e in evaluators}, performance)
    checkpoint = events.Checkpoint(run, finite, lambda: seen[0])
    profile = events.Profile(run)
    snapshots = [events.EMASnapshot(run)] if is_power_ema(config) else []
    counted = _CountingBatches(batches, seen, config.batch_size)
    failed = True
    try:
        state = loop(state, step_fns, counted, [profile, _SaveWatch(manager, checkpoint),
                                                 scalars, *evaluators, *snapshots, checkpoint],
                     scalars, finite, watcher, config.num_train_steps)
        failed = False
    finally:
        profile.close()
        try:  # never leave a half-written checkpoint (or EMA snapshot) behind
            checkpointing.check_saves(manager, checkpoint.last_saved, wait=True)
        finally:
            manager.close()
            try:
                for snapshot in snapshots:
                    snapshot.close()
            finally:
                metric_logs.flush(run.writer, workdir_path, failed)
                if wandb_run is not None:
                    wandb_run.close()
    if int(state.step) >= config.num_train_steps:
        _log_lines(lambda: _summary(run.progress, scalars, started, initial_step,
                                    int(state.step)) + _where_things_are(workdir, workdir_path))
    return state


def check_classes(config: ml_collections.ConfigDict, source: Any,
                  workdir_path: epath.Path) -> None:
    """A labelled run's classes: they must be `model.num_classes` many, and those saved with
    the run when it resumes (the net's class rows mean these classes); logged, and saved
    with the run."""
    names = list(data_sources.class_names(source))
    if not names:
        return
    if len(names) != config.model.num_classes:
        raise config_checks.ConfigError(
            f"data.label={config.data.label!r} gives {len(names)} classes, but "
            f"model.num_classes={config.model.num_classes}; set model.num_classes={len(names)}")
    saved = checkpointing.saved_classes(workdir_path)
    if saved is not None and saved != names:
        changed = [f"{i}: {old!r} -> {new!r}" for i, (old, new) in
                   enumerate(zip(saved, names, strict=False)) if old != new]
        if len(saved) != len(names):
            changed.insert(0, f"{len(saved)} classes -> {len(names)}")
        raise config_checks.ConfigError(
            f"{workdir_path} was trained with other classes than data.label="
            f"{config.data.label!r} gives ({', '.join(changed[:3])}"
            f"{' ...' if len(changed) > 3 else ''}); use a new --workdir or the same data")
    labels = getattr(source, "labels", None)
    counts = np.bincount(labels, minlength=len(names)).tolist() if labels is not None else None
    logging.info("%d classes (data.label=%r): %s", len(names), config.data.label, ", ".join(
        f"{i}: {name!r}" + (f" ({counts[i]} images)" if counts else "")
        for i, name in enumerate(names)))
    checkpointing.save_classes(workdir_path, names, counts)


class _CountingBatches:
    """The batch iterator, counting the examples taken (the data position a checkpoint
    saves)."""

    def __init__(self, batches: Iterator, seen: list[int], batch_size: int):
        self.batches, self.seen, self.batch_size = batches, seen, batch_size

    def __next__(self):
        batch = next(self.batches)
        self.seen[0] += self.batch_size
        return batch


class _SaveWatch(events.Event):
    """After every call: raises the error of a background checkpoint save that failed."""

    name = "save watch"
    at_stop = True

    def __init__(self, manager: Any, checkpoint: events.Checkpoint):
        self.manager, self.checkpoint = manager, checkpoint

    def due(self, step: int, last: bool, stop: bool) -> bool:
        return True

    def __call__(self, step: int, state: Any) -> bool:
        checkpointing.check_saves(self.manager, self.checkpoint.last_saved)
        return True


def events_left(config: ml_collections.ConfigDict, step: int, interval: int) -> int:
    """How many times an event every `interval` steps (and at the end) runs after `step`."""
    end = config.num_train_steps
    if interval <= 0 or step >= end:
        return 0
    return end // interval - step // interval + (end % interval != 0)


def host_memory_parts(config: ml_collections.ConfigDict, prefetch: int, per_call: int
                      ) -> dict[str, int]:
    """What the host holds besides the compiled step, in bytes: the batches read ahead, one
    call's batches taken from the pipeline and stacked (two copies), and the host copy of the
    state a checkpoint save makes."""
    batch = input_pipeline.batch_bytes(config, jax.process_count())
    state = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(train_state_shapes(config)))
    return {"data read ahead": input_pipeline.prefetch_bytes(config, jax.process_count(), prefetch),
            "a call's batches": 2 * per_call * batch,
            "checkpoint copy": state // jax.process_count()}


def _log_lines(lines: Callable[[], list[str]]) -> None:
    """Logs the lines `lines()` gives, on process 0 only (the others would repeat them, and
    listing a gs:// workdir from every host is wasted work)."""
    if jax.process_index() == 0:
        for line in lines():
            logging.info("%s", line)


def _summary(progress: TrainingProgress, scalars: events.ScalarLog, started: float,
             first_step: int, last_step: int) -> list[str]:
    """The end of a finished run: what it did, how long each part took, its last loss."""
    parts = [f"start-up {format_seconds(progress.started - started)}",
             f"training {format_seconds(progress.training_seconds())}"]
    parts += [f"{count} {kind}{'s' if count > 1 else ''} "
              f"{format_seconds(progress.evaluation_seconds[kind])}"
              for kind, count in progress.evaluation_counts.items()]
    lines = [f"finished: steps {first_step} to {last_step} in "
             f"{format_seconds(time.perf_counter() - started)} ({', '.join(parts)})"]
    if scalars.last_loss is not None:
        steps = scalars.last_loss_steps
        lines.append(f"final loss {scalars.last_loss:.4f} (mean of the last {steps} "
                     f"step{'s' if steps > 1 else ''})")
    peak = memory.peak_resident_bytes()
    if peak is not None:
        lines.append(f"peak resident memory {memory.human_bytes(peak)} (host)")
    return lines


def _where_things_are(workdir: str, workdir_path: epath.Path) -> list[str]:
    """Where a run's checkpoints, samples and logs are, and how to sample from it."""
    steps = checkpointing.finished_steps(workdir_path / "checkpoints")
    grids = sorted(p.name for p in (workdir_path / "samples").glob("step_*.png"))
    lines = [f"checkpoints: {workdir_path / 'checkpoints'} (steps {', '.join(map(str, steps))})"]
    if grids:
        lines.append(f"samples: {workdir_path / 'samples'} ({', '.join(grids[-3:])}"
                     f"{f' and {len(grids) - 3} more' if len(grids) > 3 else ''})")
    lines += [f"TensorBoard: tensorboard --logdir {workdir}",
              f"sample from it: python -m ddpm_jax.sample --workdir={workdir} --num_samples=64 "
              f"--output={workdir.rstrip('/')}/samples.png"]
    return lines
