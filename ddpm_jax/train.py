"""Training: the train state, the jitted sharded train step, in-graph sampling and the loop.

The network is a Flax NNX module, split once into a static `graphdef` and a pure
dict of parameters; the train step is a plain `jax.jit` function over the
`TrainState` pytree that merges them back inside the trace. The batch is sharded
over every device of a (data, fsdp) mesh; the state is replicated or FSDP-split
(`sharding.py`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import TYPE_CHECKING, Any

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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import (
    checkpointing,
    config_checks,
    diffusion,
    fid,
    image_utils,
    input_pipeline,
    preemption,
    sharding,
    xla,
)
from ddpm_jax.models import create_model

if TYPE_CHECKING:
    from clu import metric_writers

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


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then constant or cosine decay to 0 at the last step."""
    warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
    if config.lr_schedule == "constant":
        after = optax.constant_schedule(config.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            config.learning_rate, max(config.num_train_steps - config.warmup_steps, 1)
        )
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only on kernels (ndim > 1)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask,
    )
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def make_schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:
    d = config.diffusion
    return diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def model_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
    """The static structure of the network, built without allocating parameters."""
    abstract = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return graphdef


def abstract_params(config: ml_collections.ConfigDict) -> Any:
    """Parameter shapes and dtypes (a pure dict of ShapeDtypeStruct), allocating nothing."""
    abstract = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def init_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """Fresh parameters, EMA copy, optimizer state and base rng (call under jit)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    model = create_model(config, nnx.Rngs(params=init_rng))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=make_optimizer(config).init(params),
        rng=train_rng,
    )


def train_state_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Where each leaf of the state lives (replicated, or FSDP-split by `config.mesh`)."""
    shapes = jax.eval_shape(functools.partial(init_train_state, config))
    return sharding.state_shardings(shapes, mesh, config)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Initialises the state directly on the devices, in its final sharding."""
    return jax.jit(functools.partial(init_train_state, config),
                   out_shardings=train_state_shardings(config, mesh))()


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint into."""
    shapes = jax.eval_shape(functools.partial(init_train_state, config))
    shardings = sharding.state_shardings(shapes, mesh, config)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def apply_model(
    graphdef: nnx.GraphDef, params: Any, x_t: jax.Array, t: jax.Array,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Runs the network on a pure-dict of parameters; dropout is on only with `dropout_rng`."""
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_rng) if dropout_rng is not None else None
    return model(x_t, t, rngs=rngs)


def images_to_model_space(batch: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return batch.astype(jnp.float32) / 127.5 - 1.0


def ema_decay_at(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    decay = jnp.asarray(config.ema_decay, jnp.float32)
    if config.ema_warmup:
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


# ------------------------------------------------------------------------------- train step


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
    gradients (the same value as one pass over the batch, in less memory or, on CPU, less
    time); each micro-batch draws its own dropout masks.
    """
    x0 = images_to_model_space(batch)
    step_rng = jax.random.fold_in(state.rng, state.step)
    t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
    t = diffusion.sample_timesteps(t_rng, x0.shape[0], schedule.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    target = diffusion.prediction_target(schedule, config.diffusion.prediction, x0, t, noise)
    use_dropout = config.model.dropout > 0

    def loss_fn(params, x_t, t, target, dropout_rng):
        output = apply_model(graphdef, params, x_t, t, dropout_rng if use_dropout else None)
        return jnp.mean(diffusion.regression_loss(output, target, config.diffusion.loss))

    grad_fn = jax.value_and_grad(loss_fn)
    accum = micro_batches
    if accum == 1:
        loss, grads = grad_fn(state.params, x_t, t, target, dropout_rng)
    else:
        # Micro-batch i takes rows i, i + accum, ...: with the batch split over devices in
        # contiguous blocks, every device holds an equal share of every micro-batch.
        def micro(array, i):
            array = array.reshape((array.shape[0] // accum, accum) + array.shape[1:])
            return jax.lax.dynamic_index_in_dim(array, i, axis=1, keepdims=False)

        # A loop, so that the micro-batches run one after another (the memory saving of
        # accumulation) and compile once: on XLA:CPU (with `models/conv.py`'s gradients) as
        # fast as unrolling them and faster to compile (CIFAR-10 net at batch 32, 2 chunks:
        # 2.96 against 3.12 s per step, 29 against 40 s to compile).
        def accumulate(carry, i):
            loss, grads = carry
            micro_loss, micro_grads = grad_fn(
                state.params, micro(x_t, i), micro(t, i), micro(target, i),
                jax.random.fold_in(dropout_rng, i),
            )
            grads = jax.tree.map(lambda g, m: g + m / accum, grads, micro_grads)
            return (loss + micro_loss / accum, grads), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, jnp.arange(accum))
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply_gradients(state: TrainState) -> TrainState:
        updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(config, state.step)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                  state.ema_params, params)
        return state.replace(params=params, ema_params=ema_params, opt_state=opt_state)

    # A non-finite loss or gradient never reaches the weights: the step keeps the old
    # params, EMA and optimizer state (the loop then stops or goes on, by config.on_nonfinite).
    # A conditional, not a select per leaf: the select is one more pass over the state and
    # makes XLA copy every leaf it overwrites in place (the CIFAR-10 net's update alone: 116
    # against 70 ms on CPU).
    new_state = jax.lax.cond(finite, apply_gradients, lambda state: state, state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate_schedule(config)(state.step),
        "nonfinite": (~finite).astype(jnp.int32),
    }
    new_state = new_state.replace(step=state.step + 1)
    return new_state, metrics


CPU_CHUNK_SIZE = 16  # compute_chunk_size=0 on the CPU backend


def compute_chunks(config: ml_collections.ConfigDict, per_device_batch: int) -> int:
    """Sequential chunks each device's (micro-)batch is split into (1: none).

    `config.compute_chunk_size` caps the examples one forward/backward pass runs on; 0 means
    `CPU_CHUNK_SIZE` on the CPU backend, where XLA:CPU loses speed on larger batches (a batch
    of 32 trains 6% faster as 2 chunks of 16, and compiles in half the time of 4 chunks of 8;
    docs/benchmarks.md), and no cap elsewhere.
    """
    limit = config.get("compute_chunk_size", 0)
    if limit == 0:
        limit = CPU_CHUNK_SIZE if jax.default_backend() == "cpu" else -1
    if limit < 0 or per_device_batch <= limit:
        return 1
    return next(k for k in range(2, per_device_batch + 1)
                if per_device_batch % k == 0 and per_device_batch // k <= limit)


CPU_STEPS_PER_DISPATCH = 4  # steps_per_dispatch=0 on the CPU backend, where it divides the intervals


def steps_per_dispatch(config: ml_collections.ConfigDict) -> int:
    """Train steps each compiled call runs, `config.steps_per_dispatch` with 0 resolved.

    0 means, on the CPU backend, the largest of `CPU_STEPS_PER_DISPATCH`, 2 and 1 that divides
    every logging, sampling, saving and evaluation interval (so that one program serves the
    whole run): XLA:CPU maps a call's temporary buffers afresh on every call, and 4 steps per
    call train the CIFAR-10 net 1.2x faster at batch 8 (docs/benchmarks.md). 1 elsewhere: on
    an H200 four per call were 1.1-1.25x faster only in runs that waited after every call,
    which the loop does not (it keeps one call in flight), so not yet a default there.
    """
    chosen = config.get("steps_per_dispatch", 1)
    if chosen:
        return chosen
    if jax.default_backend() != "cpu":
        return 1
    intervals = event_intervals(config, with_fid=True)
    return next(k for k in (CPU_STEPS_PER_DISPATCH, 2, 1)
                if all(interval % k == 0 for interval in intervals))


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
        train_step, config=config, graphdef=model_graphdef(config),
        schedule=make_schedule(config),
        micro_batches=accum * compute_chunks(config, per_device),
    )
    data_sharding = batch_sharding(mesh)
    if num_steps > 1:
        step_fn = functools.partial(jax.lax.scan, step_fn)
        data_sharding = stacked_batch_sharding(mesh)
    state_sharding = train_state_shardings(config, mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=xla.compiler_options(config),
    )


# ------------------------------------------------------------------------------- sampling


def make_sample_fn(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    num_images: int,
    sampler: str,
    num_steps: int,
    eta: float,
    num_snapshots: int = 0,
):
    """Jitted `fn(params, rng) -> images [N, S, S, 3]` in [-1, 1] (and snapshots), one program.

    The batch is sharded over the mesh; N is `num_images` rounded up to a multiple of
    the device count.
    """
    graphdef = model_graphdef(config)
    schedule = make_schedule(config)
    size = config.data.image_size
    shape = (sharding.padded_to_devices(num_images, mesh), size, size, 3)
    out_sharding = batch_sharding(mesh)

    def run(params, rng):
        return diffusion.sample(
            lambda x, t: apply_model(graphdef, params, x, t),
            schedule, shape, rng,
            sampler=sampler, num_steps=num_steps or None, eta=eta,
            prediction=config.diffusion.prediction, variance=config.diffusion.variance,
            clip_x0=config.diffusion.clip_x0, num_snapshots=num_snapshots,
            initial_noise_sharding=out_sharding,
        )

    snapshot_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    outs = (out_sharding, snapshot_sharding) if num_snapshots else out_sharding
    params_sharding = train_state_shardings(config, mesh).params
    return jax.jit(run, in_shardings=(params_sharding, replicated(mesh)), out_shardings=outs,
                   compiler_options=xla.compiler_options(config))


def log_sample_grid(
    sample_fn, params: Any, rng: jax.Array, step: int, num_images: int,
    writer: metric_writers.MetricWriter, workdir: str,
) -> None:
    """Samples, gathers to every host, and writes a grid to TensorBoard and workdir/samples."""
    outputs = sample_fn(params, rng)
    images = outputs[0] if isinstance(outputs, tuple) else outputs
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))[:num_images]
    grid = image_utils.make_grid(image_utils.to_uint8(images))
    writer.write_images(step, {"samples": grid[None]})
    if isinstance(outputs, tuple):
        snapshots = np.asarray(multihost_utils.process_allgather(outputs[1], tiled=True))
        strip = snapshots[:, :num_images].transpose(1, 0, 2, 3, 4)  # [N, K, H, W, C]
        strip = strip.reshape((-1,) + strip.shape[2:])
        writer.write_images(
            step, {"denoising": image_utils.make_grid(image_utils.to_uint8(strip),
                                                       num_columns=snapshots.shape[0])[None]}
        )
    if jax.process_index() == 0:
        image_utils.save_png(grid, str(epath.Path(workdir) / "samples" / f"step_{step:08d}.png"))


def make_sample_fid_fn(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, weights: str, reference: str,
    num_samples: int, batch_size: int, sampler: str, num_steps: int, eta: float,
    progress: bool = False,
):
    """`fn(params, rng) -> (FID, images scored)` of `num_samples` samples against `reference`.

    Loads the Inception weights and reference statistics at once (a wrong path fails before
    any sampling); samples go from the sampler to the Inception network on device.
    """
    reference_mu, reference_sigma, _ = fid.load_statistics(reference)
    features = fid.InceptionFeatures(weights, mesh)
    sample_fn = make_sample_fn(config, mesh, num_images=min(batch_size, num_samples),
                               sampler=sampler, num_steps=num_steps, eta=eta)

    def evaluate(params: Any, rng: jax.Array) -> tuple[float, int]:
        stats = features.sample_statistics(sample_fn, params, rng, num_samples, progress)
        return fid.distance_to(stats, reference_mu, reference_sigma), stats.count

    return evaluate


def make_fid_evaluator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """`fn(params) -> FID` of `config.eval.num_samples` samples, or None when FID is off.

    Built before training, so a wrong path stops the run first. Every evaluation draws from
    the same noise (`seed + 3`), so changes in the curve come from the weights, not the draw.
    """
    e = config.eval
    if config.eval_every_steps <= 0:
        return None
    if not (e.inception_weights and e.reference_stats):
        logging.warning("eval_every_steps=%d, but eval.inception_weights and eval.reference_stats "
                        "are not both set: no FID during training (see README, FID)",
                        config.eval_every_steps)
        return None
    sample_fid = make_sample_fid_fn(
        config, mesh, weights=e.inception_weights, reference=e.reference_stats,
        num_samples=e.num_samples, batch_size=e.batch_size, sampler=e.sampler,
        num_steps=e.num_steps, eta=e.eta)
    rng = jax.random.PRNGKey(config.seed + 3)
    return lambda params: sample_fid(params, rng)[0]


# ------------------------------------------------------------------------------------ loop


def stacked_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[steps, batch, ...]: the batch axis split over every device, as in `batch_sharding`."""
    return NamedSharding(mesh, P(None, sharding.BATCH_AXES))


def global_batch(local_batch: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """Assembles the global sharded batch from each process's slice."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def global_batches(local_batches: list[np.ndarray], mesh: jax.sharding.Mesh) -> jax.Array:
    """Several steps' batches, stacked [steps, batch, ...], from each process's slices."""
    return jax.make_array_from_process_local_data(stacked_batch_sharding(mesh),
                                                  np.stack(local_batches))


def absolute_path(path: str) -> epath.Path:
    """Local paths made absolute (Orbax requires it); URLs such as gs://... kept as they are."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains for `config.num_train_steps`, resuming from the newest checkpoint in `workdir`."""
    workdir_path = absolute_path(workdir)
    config_checks.validate(config, str(workdir_path), device_count=jax.device_count(),
                           process_count=jax.process_count())
    source = input_pipeline.make_source(config.data)  # fails fast on missing data
    mesh = create_mesh(config)
    logging.info("mesh: %s over %d processes", dict(mesh.shape), jax.process_count())
    evaluate_fid = make_fid_evaluator(config, mesh)  # fails fast on missing files

    make_data_iter = functools.partial(
        input_pipeline.create_dataset, config, source, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    data_iter = iter(make_data_iter())
    manager = checkpointing.make_manager(workdir_path / "checkpoints", config)
    saved_config = checkpointing.latest_config(manager)
    if saved_config is not None:
        config_checks.check_compatible(saved_config, config)
    state, data_restored = checkpointing.restore_latest(
        manager, abstract_train_state(config, mesh), data_iter)
    if state is None:
        state = create_train_state(config, mesh)
    elif not data_restored:  # the data order depends only on the step: start there
        data_iter = iter(make_data_iter(start_step=int(state.step)))
    initial_step = int(state.step)
    logging.info("starting at step %d of %d", initial_step, config.num_train_steps)

    # Imported here: clu's writers and progress reports load TensorFlow (about 2 s), which the
    # train step, the sampler and the benchmarks do not need (and GPU hosts may lack).
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(
        str(workdir_path), just_logging=jax.process_index() > 0
    )
    if initial_step == 0:
        writer.write_hparams(_flat_hparams(config))
        parameter_overview.log_parameter_overview(state.params, msg="model parameters",
                                                  jax_logging_process=0)

    step_fns = StepFunctions(config, mesh)
    sample_cfg = config.sample
    sample_fn = make_sample_fn(
        config, mesh, num_images=sample_cfg.num_images, sampler=sample_cfg.sampler,
        num_steps=sample_cfg.num_steps, eta=sample_cfg.eta, num_snapshots=sample_cfg.num_snapshots,
    )

    loop = _Loop(config, workdir_path, writer, manager, data_iter, sample_fn, evaluate_fid,
                 periodic_actions.ReportProgress(num_train_steps=config.num_train_steps))
    with metric_writers.ensure_flushes(writer), preemption.PreemptionWatcher() as watcher:
        try:
            state = loop.run(state, step_fns, watcher)
        finally:
            manager.wait_until_finished()  # never leave a half-written checkpoint behind
            manager.close()
    return state


class StepFunctions:
    """The train step as one step per call, and as `steps_per_dispatch` steps per call:
    `fns(state, local_batches)` runs one step per local batch, in one call.

    Each is compiled on its first use: a run whose events (logging, samples, checkpoints,
    FID, its end) all fall on multiples of `steps_per_dispatch` from its start only ever
    compiles the second. The training loop and the benchmarks call it.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.per_call = steps_per_dispatch(config)
        self.single = make_train_step(config, mesh)
        self.multi = make_train_step(config, mesh, self.per_call) if self.per_call > 1 else None
        logging.info("%d train steps per call", self.per_call)

    def steps_in_next_call(self, step: int, next_event: int) -> int:
        """`steps_per_dispatch` steps where no event falls inside them, else one."""
        return self.per_call if step + self.per_call <= next_event else 1

    def __call__(self, state: TrainState, local_batches: list[np.ndarray]):
        if len(local_batches) == 1:
            return self.single(state, global_batch(local_batches[0], self.mesh))
        return self.multi(state, global_batches(local_batches, self.mesh))


class NonFiniteError(FloatingPointError):
    """The loss or gradient became NaN or infinite and `config.on_nonfinite` is "stop"."""


class _Loop:
    """The host side of training: logging, samples, checkpoints, non-finite and stop checks."""

    def __init__(self, config, workdir_path, writer, manager, data_iter, sample_fn,
                 evaluate_fid, report):
        self.config = config
        self.evaluate_fid = evaluate_fid
        self.workdir = str(workdir_path)
        self.writer = writer
        self.manager = manager
        self.data_iter = data_iter
        self.sample_fn = sample_fn
        self.sample_rng = jax.random.PRNGKey(config.seed + 2)
        self.report = report
        self.pending: list[dict[str, jax.Array]] = []
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
            if previous is not None:
                self.check_finite(*previous)
            previous = (step, metrics)
            self.pending.append(metrics)
            self.report(step)
            last = step == config.num_train_steps
            stop = watcher.should_stop(step)
            if step % config.log_every_steps == 0 or last or stop:
                self.log_scalars(step)
            if step % config.sample_every_steps == 0 or last:
                params = state.ema_params if config.ema_decay > 0 else state.params
                log_sample_grid(self.sample_fn, params, jax.random.fold_in(self.sample_rng, step),
                                step, config.sample.num_images, self.writer, self.workdir)
            if self.evaluate_fid and (step % config.eval_every_steps == 0 or last):
                self.log_fid(step, state)
            if step % config.save_every_steps == 0 or last or stop:
                self.check_finite(*previous)  # never checkpoint past an unchecked step
                checkpointing.save(self.manager, step, state, self.data_iter, config)
            if stop:
                logging.warning("stopped at step %d; rerun the same command to resume", step)
                break
        if previous is not None:
            self.check_finite(*previous)
        return state

    def next_event(self, step: int) -> int:
        """The first step after `step` that logs, samples, evaluates, saves or ends the run."""
        intervals = event_intervals(self.config, with_fid=self.evaluate_fid is not None)
        return min([self.config.num_train_steps]
                   + [(step // interval + 1) * interval for interval in intervals])

    def log_fid(self, step: int, state: TrainState) -> None:
        start = time.perf_counter()
        value = self.evaluate_fid(state.ema_params if self.config.ema_decay > 0 else state.params)
        logging.info("step %d: FID %.3f over %d samples (%.0f s)", step, value,
                     self.config.eval.num_samples, time.perf_counter() - start)
        self.writer.write_scalars(step, {"fid": value})
        self.interval_start = time.perf_counter()  # keep evaluation out of steps_per_sec

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
        self.writer.write_scalars(step, scalars)
        self.pending.clear()
        self.interval_start = time.perf_counter()


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
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
