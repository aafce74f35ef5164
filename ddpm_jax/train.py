"""Training: the train state, the jitted sharded train step and the loop.

The network is a Flax NNX module, split once into a static `graphdef` and a pure
dict of parameters (`network.py`); the train step is a plain `jax.jit` function over
the `TrainState` pytree that merges them back inside the trace. The batch is sharded
over every device of a (data, fsdp) mesh; the state is replicated or FSDP-split
(`sharding.py`). Every example draws its own timestep, noise and dropout masks, so a
step gives the same result however its batch is cut into devices, chunks or
micro-batches. Samples and FID during training come from `sampling.py`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from etils import epath
from flax import nnx

from ddpm_jax import (
    checkpointing,
    config_checks,
    diffusion,
    fid,
    input_pipeline,
    memory,
    metric_logs,
    network,
    objectives,
    ops,
    optimizer,
    preemption,
    sampling,
    sharding,
    workdir_lock,
)
from ddpm_jax.progress import TrainingProgress, format_seconds
from ddpm_jax.samplers import SamplerSettings

# What an in-loop evaluation logs to TensorBoard (kid only with reference features).
FID_SCALARS = ("fid", "inception_score", "kid")

create_mesh = sharding.create_mesh
replicated = sharding.replicated
batch_sharding = sharding.batch_sharding


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a checkpoint restores exactly this."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # base key; step keys are fold_in(rng, step), so resuming needs nothing else


# -------------------------------------------------------------------------- building blocks


def init_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """Fresh parameters, EMA copy, optimizer state and base rng (call under jit)."""
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    return train_state_from_params(config, network.init_params(config, init_rng))


def train_state_from_params(config: ml_collections.ConfigDict, params: Any) -> TrainState:
    """The state at step 0 with `params` as weights and EMA, a fresh optimizer state and the
    base rng of `config.seed` (call under jit)."""
    _, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.make_optimizer(config).init(params),
        rng=train_rng,
    )


@network.cached_per_config
def train_state_shapes(config: ml_collections.ConfigDict) -> TrainState:
    """Shapes and dtypes of the state of `config` (traced once per config)."""
    return jax.eval_shape(functools.partial(init_train_state, config))


def train_state_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Where each leaf of the state lives (replicated, or FSDP-split by `config.mesh`)."""
    return sharding.state_shardings(train_state_shapes(config), mesh, config)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Initialises the state directly on the devices, in its final sharding."""
    return jax.jit(functools.partial(init_train_state, config),
                   out_shardings=train_state_shardings(config, mesh))()


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint into."""
    shapes = train_state_shapes(config)
    shardings = sharding.state_shardings(shapes, mesh, config)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def images_to_model_space(batch: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return batch.astype(jnp.float32) / 127.5 - 1.0


def ema_decay_at(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    decay = jnp.asarray(config.ema_decay, jnp.float32)
    if config.ema_warmup:
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


# ------------------------------------------------------------------------------- train step


def example_randomness(
    rng: jax.Array, image_shape: tuple[int, ...], num_timesteps: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example i of a batch: its timestep, its noise and its dropout key.

    Each is drawn from `fold_in(rng, i)` alone (i the example's index in the global batch),
    so an example gets the same draws however the batch is split over devices, chunks or
    micro-batches.
    """

    def draw(key):
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        t = diffusion.sample_timesteps(t_key, 1, num_timesteps)[0]
        return t, jax.random.normal(noise_key, image_shape[1:], jnp.float32), dropout_key

    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(image_shape[0]))
    return jax.vmap(draw)(keys)



def train_step(
    state: TrainState,
    batch: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    schedule: diffusion.Schedule,
    micro_batches: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global uint8 batch; returns the new state and scalar metrics.

    With `micro_batches` > 1 the gradient is the mean of that many sequential micro-batch
    gradients: the same value as one pass over the batch (to float rounding), in less memory.
    """
    x0 = images_to_model_space(batch)
    t, noise, dropout_keys = example_randomness(
        jax.random.fold_in(state.rng, state.step), x0.shape, schedule.num_timesteps)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    use_dropout = config.model.dropout > 0
    learned = config.diffusion.variance == "learned_range"

    def loss_fn(params, x0, x_t, t, noise, dropout_keys):
        output = network.apply(graphdef, params, x_t, t, dropout_keys if use_dropout else None)
        loss, vlb = objectives.loss_terms(schedule, output, x0, x_t, t, noise, config.diffusion)
        return jnp.mean(loss), (jnp.mean(vlb) if learned else jnp.zeros(()))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = micro_batches
    if accum == 1:
        (loss, vlb), grads = grad_fn(state.params, x0, x_t, t, noise, dropout_keys)
    else:
        # Micro-batch i takes rows i, i + accum, ...: with the batch split over devices in
        # contiguous blocks, every device holds an equal share of every micro-batch.
        def micro(array, i):
            array = array.reshape((array.shape[0] // accum, accum) + array.shape[1:])
            return jax.lax.dynamic_index_in_dim(array, i, axis=1, keepdims=False)

        # A loop, so that the micro-batches run one after another (the memory saving of
        # accumulation) and compile once.
        def accumulate(carry, i):
            loss, vlb, grads = carry
            (micro_loss, micro_vlb), micro_grads = grad_fn(
                state.params, micro(x0, i), micro(x_t, i), micro(t, i), micro(noise, i),
                micro(dropout_keys, i),
            )
            grads = jax.tree.map(lambda g, m: g + m / accum, grads, micro_grads)
            return (loss + micro_loss / accum, vlb + micro_vlb / accum, grads), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                 jax.tree.map(jnp.zeros_like, state.params))
        (loss, vlb, grads), _ = jax.lax.scan(accumulate, zeros, jnp.arange(accum))
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply_gradients(state: TrainState) -> TrainState:
        updates, opt_state = optimizer.make_optimizer(config).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(config, state.step)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                  state.ema_params, params)
        return state.replace(params=params, ema_params=ema_params, opt_state=opt_state)

    # A non-finite loss or gradient never reaches the weights: the step keeps the old
    # params, EMA and optimizer state (the loop then stops or goes on, by config.on_nonfinite).
    # A conditional, not a select per leaf, which would make XLA copy every leaf it updates.
    new_state = jax.lax.cond(finite, apply_gradients, lambda state: state, state)
    metrics = {
        "loss": loss,
        **({"vlb_bits_per_dim": vlb} if learned else {}),
        "grad_norm": grad_norm,
        "learning_rate": optimizer.learning_rate_schedule(config)(state.step),
        "nonfinite": (~finite).astype(jnp.int32),
    }
    new_state = new_state.replace(step=state.step + 1)
    return new_state, metrics


def steps_per_dispatch(config: ml_collections.ConfigDict) -> int:
    """Train steps per compiled call for `config` on this backend (`ops.steps_per_dispatch`)."""
    return ops.steps_per_dispatch(config, event_intervals(config, with_fid=True))


def event_intervals(config: ml_collections.ConfigDict, with_fid: bool) -> list[int]:
    """The step intervals at which the loop logs, samples, saves and (`with_fid`) evaluates."""
    intervals = [config.log_every_steps, config.sample_every_steps, config.save_every_steps]
    if with_fid:
        intervals.append(config.get("eval_every_steps", 0))
    return [interval for interval in intervals if interval > 0]


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    num_steps: int = 1):
    """The jitted train step: state in its mesh sharding and donated, batch split over devices.

    With `num_steps` > 1, `fn(state, batches)` runs that many steps in one call (a `lax.scan`
    over `batches` [num_steps, batch, ...]) and returns metrics with a leading [num_steps]
    axis: the same steps, with one dispatch and one set of temporary buffers for all of them.
    """
    accum = config.grad_accum_steps
    per_device = config.batch_size // (mesh.devices.size * accum)
    step_fn = functools.partial(
        train_step, config=config, graphdef=network.graphdef(config),
        schedule=diffusion.schedule_from_config(config),
        micro_batches=accum * ops.compute_chunks(config, per_device),
    )
    data_sharding = batch_sharding(mesh)
    if num_steps > 1:
        step_fn = functools.partial(jax.lax.scan, step_fn)
        data_sharding = sharding.stacked_batch_sharding(mesh)
    state_sharding = train_state_shardings(config, mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=ops.compiler_options(config),
    )


# ------------------------------------------------------------------------------------ loop


def global_batch(local_batch: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """Assembles the global sharded batch from each process's slice."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def global_batches(local_batches: list[np.ndarray], mesh: jax.sharding.Mesh) -> jax.Array:
    """Several steps' batches, stacked [steps, batch, ...], from each process's slices."""
    return jax.make_array_from_process_local_data(sharding.stacked_batch_sharding(mesh),
                                                  np.stack(local_batches))


def absolute_path(path: str) -> epath.Path:
    """Local paths made absolute (Orbax requires it); URLs such as gs://... kept as they are."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       steal_lock: bool = False,
                       allow_diffusion_change: bool = False) -> TrainState:
    """Trains for `config.num_train_steps`, resuming from the newest readable checkpoint in
    `workdir`, which this run holds alone while it trains (`workdir_lock`).

    `steal_lock` takes the workdir from a run that still seems to hold it;
    `allow_diffusion_change` resumes with other `diffusion.*` targets or schedules (a
    deliberate fine-tune) instead of refusing.
    """
    workdir_path = absolute_path(workdir)
    existed = workdir_path.exists()
    try:
        config_checks.validate(config, str(workdir_path), device_count=jax.device_count(),
                               process_count=jax.process_count())
        source = input_pipeline.make_source(config.data)  # fails fast on missing data
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


def _train(config: ml_collections.ConfigDict, workdir_path: epath.Path, workdir: str,
           source: Any, allow_diffusion_change: bool, holding: workdir_lock.Holding,
           watcher: preemption.PreemptionWatcher) -> TrainState:
    started = time.perf_counter()
    manager = checkpointing.make_manager(workdir_path / "checkpoints", config)
    mesh = create_mesh(config)
    logging.info("mesh: %s over %d processes", dict(mesh.shape), jax.process_count())

    def read(step: int) -> tuple[TrainState, int]:
        stored = checkpointing.stored_config(manager, step)
        # Before anything is built from the config: a resumed run keeps its legacy values.
        checkpointing.keep_legacy_values(config, stored)
        config_checks.check_compatible(checkpointing.with_defaults(stored), config,
                                       allow_diffusion_change=allow_diffusion_change)
        state = checkpointing.restore_step(manager, step, abstract_train_state(config, mesh))
        return state, checkpointing.examples_seen(manager, step, stored)

    restored = checkpointing.newest_readable(manager, read, repair=True,
                                             passthrough=(config_checks.ConfigError,))
    state, examples = restored[1] if restored else (None, 0)
    if state is not None and int(state.step) >= config.num_train_steps:
        manager.close()
        _log_lines(lambda: [
            f"{workdir} has already finished: its newest checkpoint is step {int(state.step)} "
            f"of num_train_steps={config.num_train_steps}; nothing to train (pass "
            f"--config.num_train_steps=N, N > {int(state.step)}, to train longer)",
            *_where_things_are(workdir, workdir_path)])
        return state
    evaluate_fid = sampling.make_fid_evaluator(config, mesh)  # fails fast on missing files
    step_fns = StepFunctions(config, mesh)
    prefetch = 2 * step_fns.per_call  # the next call's batches are read while one runs
    data_iter = iter(input_pipeline.create_dataset(
        config, source, process_index=jax.process_index(), process_count=jax.process_count(),
        start_example=examples, prefetch_batches=prefetch))
    # Imported here: clu's writers load TensorFlow (slow to import), which the train step, the
    # sampler, the other commands and the benchmarks do not need (and GPU hosts may lack).
    # Before the memory check, which counts what the process holds.
    from ddpm_jax import cli

    cli.import_tensorflow()
    if config.check_memory:  # compiles the step training uses: no extra work
        memory.check_step_fits(step_fns.compiled(step_fns.per_call),
                               host=host_memory_parts(config, prefetch, step_fns.per_call))
    if state is None:
        state = create_train_state(config, mesh)
    initial_step = int(state.step)
    if watcher.should_stop():  # during start-up: nothing trained, so nothing to save
        manager.close()
        logging.warning("stopped before step %d, during start-up: nothing was trained or "
                        "written; rerun the same command to start", initial_step)
        return state
    logging.info("starting at step %d of %d (example %d of the data stream)", initial_step,
                 config.num_train_steps, examples)

    writer, wandb_run = metric_logs.open_writer(config, workdir_path)
    if initial_step == 0:
        writer.write_hparams(metric_logs.flat_hparams(config))
        # the per-module table shows with --verbosity=1 (and in --dry_run)
        parameter_overview.log_parameter_overview(state.params, msg="model parameters",
                                                  jax_logging_process=0)
    logging.info("model: %s parameters", f"{parameter_overview.count_parameters(state.params):,}")

    sample_fn = sampling.make_sample_fn(
        config, mesh, SamplerSettings.from_config(config.sample),
        num_images=config.sample.num_images, num_snapshots=config.sample.num_snapshots,
    ) if config.sample_every_steps > 0 else None

    progress = TrainingProgress(initial_step, config.num_train_steps, config.batch_size)
    loop = _Loop(config, workdir_path, writer, manager, data_iter, sample_fn, evaluate_fid,
                 progress, examples, holding)
    failed = True
    try:
        state = loop.run(state, step_fns, watcher)
        failed = False
    finally:
        try:  # never leave a half-written checkpoint behind
            checkpointing.check_saves(manager, loop.last_saved, wait=True)
        finally:
            manager.close()
            metric_logs.flush(writer, workdir_path, failed)
            if wandb_run is not None:
                wandb_run.close()
    if int(state.step) >= config.num_train_steps:
        _log_lines(lambda: _summary(loop, started, initial_step, int(state.step))
                   + _where_things_are(workdir, workdir_path))
    return state


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


def _summary(loop: _Loop, started: float, first_step: int, last_step: int) -> list[str]:
    """The end of a finished run: what it did, how long each part took, its last loss."""
    progress = loop.progress
    parts = [f"start-up {format_seconds(progress.started - started)}",
             f"training {format_seconds(progress.training_seconds())}"]
    parts += [f"{count} {kind}{'s' if count > 1 else ''} "
              f"{format_seconds(progress.evaluation_seconds[kind])}"
              for kind, count in progress.evaluation_counts.items()]
    lines = [f"finished: steps {first_step} to {last_step} in "
             f"{format_seconds(time.perf_counter() - started)} ({', '.join(parts)})"]
    if loop.last_loss is not None:
        lines.append(f"final loss {loop.last_loss:.4f} (mean of the last {loop.last_loss_steps} "
                     f"step{'s' if loop.last_loss_steps > 1 else ''})")
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


class StepFunctions:
    """The train step as one step per call, and as `steps_per_dispatch` steps per call:
    `fns(state, local_batches)` runs one step per local batch, in one call.

    Each is compiled on its first use (`compiled`): a run whose events (logging, samples,
    checkpoints, FID, its end) all fall on multiples of `steps_per_dispatch` from its start
    only ever compiles the second. The training loop and the benchmarks call it.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.config = config
        self.per_call = steps_per_dispatch(config)
        self._compiled: dict[int, Any] = {}
        logging.info("%d train steps per call", self.per_call)

    def compiled(self, steps: int):
        """The step function running `steps` steps per call, compiled ahead of time."""
        if steps not in self._compiled:
            image = (self.config.data.image_size,) * 2 + (3,)
            shape, where = (self.config.batch_size, *image), batch_sharding(self.mesh)
            if steps > 1:
                shape, where = (steps, *shape), sharding.stacked_batch_sharding(self.mesh)
            batch = jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=where)
            started = time.perf_counter()
            logging.info("compiling the train step (%d step%s per call)...", steps,
                         "s" if steps > 1 else "")
            self._compiled[steps] = make_train_step(self.config, self.mesh, steps).lower(
                abstract_train_state(self.config, self.mesh), batch).compile()
            logging.info("compiled the train step in %.1f s", time.perf_counter() - started)
        return self._compiled[steps]

    def steps_in_next_call(self, step: int, next_event: int) -> int:
        """`steps_per_dispatch` steps where no event falls inside them, else one."""
        return self.per_call if step + self.per_call <= next_event else 1

    def __call__(self, state: TrainState, local_batches: list[np.ndarray]):
        if len(local_batches) == 1:
            return self.compiled(1)(state, global_batch(local_batches[0], self.mesh))
        return self.compiled(len(local_batches))(state, global_batches(local_batches, self.mesh))


class StepProfiler:
    """Traces `config.profile_steps` train steps with `jax.profiler`, once, on process 0: it
    starts after the first call of the step (compiled, warm) and stops at the end of the call
    that reaches the count, writing under WORKDIR/plugins/profile."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.steps = config.profile_steps if jax.process_index() == 0 else 0
        self.workdir = workdir
        self.start_step: int | None = None

    def after_call(self, step: int, state: TrainState) -> None:
        if self.steps <= 0:
            return
        if self.start_step is None:  # the first call: compiled and warm from here on
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.workdir)
            self.start_step = step
        elif self.start_step is not None and step - self.start_step >= self.steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            logging.info("traced steps %d to %d into %s/plugins/profile (TensorBoard's profile "
                         "tab)", self.start_step + 1, step, self.workdir)
            self.steps = 0

    def close(self) -> None:
        """Ends a trace the run stopped inside of."""
        if self.start_step is not None and self.steps > 0:
            jax.profiler.stop_trace()
            self.steps = 0


class NonFiniteError(FloatingPointError):
    """The loss or gradient became NaN or infinite and `config.on_nonfinite` is "stop"."""


class _Loop:
    """The host side of training: logging, samples, checkpoints, non-finite and stop checks."""

    def __init__(self, config, workdir_path, writer, manager, data_iter, sample_fn,
                 evaluate_fid, progress, examples_seen, holding=None):
        self.config = config
        # the workdir lock: checked before every log and save
        self.holding = holding or workdir_lock.Holding(None)
        self.evaluate_fid = evaluate_fid
        self.workdir = str(workdir_path)
        self.writer = writer
        self.manager = manager
        self.data_iter = data_iter
        self.sample_fn = sample_fn
        self.sample_rng = jax.random.PRNGKey(config.seed + 2)
        self.progress = progress
        self.last_loss: float | None = None  # mean loss of the last logging interval
        self.last_loss_steps = 0
        self.pending: list[dict[str, jax.Array]] = []
        self.examples_seen = examples_seen  # position in the data stream
        self.last_saved: int | None = None
        self.profiler = StepProfiler(config, self.workdir)
        self.interval_start = time.perf_counter()

    def run(self, state: TrainState, step_fns: StepFunctions, watcher) -> TrainState:
        config = self.config
        step = int(state.step)
        previous = None  # (step, metrics) of the call before, checked while this one runs
        while step < config.num_train_steps:
            count = step_fns.steps_in_next_call(step, self.next_event(step))
            batches = [next(self.data_iter) for _ in range(count)]
            state, metrics = step_fns(state, batches)
            step += count
            self.examples_seen += count * config.batch_size
            self.profiler.after_call(step, state)
            checkpointing.check_saves(self.manager, self.last_saved)  # a failed background save
            if previous is not None:
                self.check_finite(*previous)
            previous = (step, metrics)
            self.pending.append(metrics)
            last = step == config.num_train_steps
            stop = watcher.should_stop()
            if step % config.log_every_steps == 0 or last or stop:
                self.holding.check(step)  # a run whose lock was taken writes nothing more
                self.log_scalars(step)
                self.log_progress(step, last)
            if not stop and self.sample_fn and (step % config.sample_every_steps == 0 or last):
                stop = not self.log_samples(step, state, watcher)
            if not stop and self.evaluate_fid and (step % config.eval_every_steps == 0 or last):
                stop = not self.log_fid(step, state, watcher)
            if step % config.save_every_steps == 0 or last or stop:
                self.check_finite(*previous)  # never checkpoint past an unchecked step
                self.holding.check(step)
                checkpointing.save(self.manager, step, state, config, self.examples_seen)
                self.last_saved = step
            if stop:
                logging.warning("stopped at step %d; rerun the same command to resume", step)
                break
        if previous is not None:
            self.check_finite(*previous)
        self.profiler.close()
        return state

    def log_samples(self, step: int, state: TrainState, watcher) -> bool:
        """Logs a sample grid; False when a stop request abandoned it."""
        start = time.perf_counter()
        logging.info("step %d: sampling %d images (%s)...", step, self.config.sample.num_images,
                     SamplerSettings.from_config(self.config.sample).summary())
        done = sampling.log_sample_grid(
            self.sample_fn, sampling.sampling_params(self.config, state),
            jax.random.fold_in(self.sample_rng, step), step, self.config.sample.num_images,
            self.writer, self.workdir, should_stop=watcher.should_stop)
        elapsed = time.perf_counter() - start
        self.interval_start += elapsed  # keep sampling out of steps_per_sec and the ETA
        if not done:
            logging.warning("step %d: stop requested: sample grid abandoned after %.0f s", step,
                            elapsed)
            return False
        self.progress.evaluation("sample grid", elapsed)
        logging.info("step %d: sampled %d images in %s", step, self.config.sample.num_images,
                     format_seconds(elapsed))
        return True

    def log_progress(self, step: int, last: bool) -> None:
        """A progress line (at most every `TrainingProgress.every_seconds`, not at the end,
        which the summary covers)."""
        if last or self.last_loss is None:
            return
        line = self.progress.line(step, self.last_loss, {
            "sample grid": self.events_left(step, self.config.sample_every_steps),
            "FID": (self.events_left(step, self.config.eval_every_steps)
                    if self.evaluate_fid else 0)})
        if line is not None:
            logging.info("%s", line)

    def events_left(self, step: int, interval: int) -> int:
        """How many steps after `step` an event every `interval` steps (and at the end) takes."""
        end = self.config.num_train_steps
        if interval <= 0 or step >= end:
            return 0
        return end // interval - step // interval + (end % interval != 0)

    def next_event(self, step: int) -> int:
        """The first step after `step` that logs, samples, evaluates, saves or ends the run."""
        intervals = event_intervals(self.config, with_fid=self.evaluate_fid is not None)
        return min([self.config.num_train_steps]
                   + [(step // interval + 1) * interval for interval in intervals])

    def log_fid(self, step: int, state: TrainState, watcher) -> bool:
        """Logs FID, Inception Score and (with reference features) KID; False when a stop
        request abandoned them."""
        start = time.perf_counter()
        logging.info("step %d: FID over %d samples (%s)...", step, self.config.eval.num_samples,
                     SamplerSettings.from_config(self.config.eval).summary())
        scores = self.evaluate_fid(sampling.sampling_params(self.config, state),
                                   watcher.should_stop)
        elapsed = time.perf_counter() - start
        self.interval_start += elapsed  # keep evaluation out of steps_per_sec and the ETA
        if scores is None:
            logging.warning("step %d: stop requested: FID abandoned after %.0f s", step, elapsed)
            return False
        self.progress.evaluation("FID", elapsed)
        logging.info("step %d: %s over %d samples (%.0f s)", step, fid.describe(scores),
                     scores["num_images"], elapsed)
        self.writer.write_scalars(step, {key: scores[key] for key in FID_SCALARS
                                         if scores.get(key) is not None})
        return True

    def check_finite(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Raises for a non-finite step among those of the call that ended at `step`."""
        if self.config.on_nonfinite != "stop":
            return
        nonfinite = np.atleast_1d(jax.device_get(metrics["nonfinite"]))
        if nonfinite.any():
            first = int(np.argmax(nonfinite))
            loss = np.atleast_1d(jax.device_get(metrics["loss"]))[first]
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step - len(nonfinite) + first + 1} "
                f"(loss={float(loss)}); the update was not applied and checkpoints up to the "
                "last save are intact. Lower learning_rate, check the data, or set "
                "on_nonfinite='skip' to skip such steps."
            )

    def log_scalars(self, step: int) -> None:
        fetched = jax.device_get(self.pending)  # per call: scalars, or [steps] arrays
        elapsed = time.perf_counter() - self.interval_start
        per_step = {key: np.concatenate([np.atleast_1d(m[key]) for m in fetched])
                    for key in fetched[0]}
        steps = len(per_step["loss"])
        scalars = {key: float(np.mean(values)) for key, values in per_step.items()}
        scalars["learning_rate"] = float(per_step["learning_rate"][-1])
        scalars["nonfinite"] = float(np.sum(per_step["nonfinite"]))  # skipped steps
        scalars["steps_per_sec"] = steps / elapsed
        scalars["images_per_sec"] = steps * self.config.batch_size / elapsed
        self.last_loss, self.last_loss_steps = scalars["loss"], steps
        self.writer.write_scalars(step, scalars)
        self.pending.clear()
        self.interval_start = time.perf_counter()
