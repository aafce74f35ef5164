"""What the training loop does between steps: each periodic event is an `Event`.

An event says how often it runs (`every_steps`; every event also runs at the last step) and
does its work in `__call__(step, state)`, returning False when a stop request cut it short.
The built-in ones: the scalar log and progress line (`ScalarLog`), a sample grid
(`SampleGrid`), FID / Inception Score / KID (`FIDEvaluator`), the checkpoint
(`Checkpoint`) and a profiler trace (`Profile`). Evaluators (events that judge the
weights, timed apart from training) are registered by name in `EVALUATORS`: a new one is one
file that registers a factory `fn(run) -> Event | None` (None: off for this config), and
the loop runs it (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import checkpointing, ema_snapshots, fid, image_utils, preemption, workdir_lock
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import Registry
from ddpm_jax.progress import TrainingProgress, format_seconds
from ddpm_jax.runtime import compiled_sampler, flops
from ddpm_jax.samplers import SamplerSettings

# What an in-loop evaluation logs to TensorBoard (kid only with reference features).
FID_SCALARS = ("fid", "inception_score", "kid")


@dataclasses.dataclass
class Run:
    """What events share: the config, where the run writes, its mesh, metric writer,
    progress, stop watcher and workdir lock (the writer and the progress are set when the
    first step is about to run; evaluators are built before, so a bad path fails first)."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    writer: Any
    progress: TrainingProgress
    watcher: preemption.PreemptionWatcher
    holding: workdir_lock.Holding
    manager: Any = None  # the checkpoint manager


class Event:
    """A periodic event: `every_steps` (0: only where `due` says), `__call__(step, state)`."""

    name = ""
    every_steps = 0
    at_stop = False  # also runs when the run stops early (the log and the checkpoint do)

    def due(self, step: int, last: bool, stop: bool) -> bool:
        periodic = self.every_steps > 0 and step % self.every_steps == 0
        return (periodic or last or (stop and self.at_stop)) and (self.at_stop or not stop)

    def __call__(self, step: int, state: Any) -> bool:
        raise NotImplementedError


class Evaluator(Event):
    """An event that judges the weights; its time is kept out of the training speed."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self, step: int, state: Any) -> bool:
        started = time.perf_counter()
        done = self.evaluate(step, compiled_sampler.sampling_params(self.run.config, state))
        elapsed = time.perf_counter() - started
        self.run.progress.evaluation(self.name, elapsed, counted=done)
        if not done:
            logging.warning("step %d: stop requested: %s abandoned after %.0f s", step, self.name,
                            elapsed)
        return done

    def evaluate(self, step: int, params: Any) -> bool:
        """Evaluates `params`, writing what it finds; False when a stop request cut it short."""
        raise NotImplementedError


EVALUATORS: Registry[Callable[[Run], Evaluator | None]] = Registry("evaluator")


class SampleGrid(Evaluator):
    """A grid of samples to TensorBoard and workdir/samples (and the denoising strip); of a
    class-conditional model, one row per class (up to `sample.max_class_rows`)."""

    name = "sample grid"

    def __init__(self, run: Run):
        super().__init__(run)
        c = run.config
        self.every_steps = c.sample_every_steps
        self.settings = SamplerSettings.from_config(c.sample)
        self.count, self.labels, self.columns = c.sample.num_images, None, None
        if c.model.num_classes:
            self.labels, self.columns = compiled_sampler.class_grid(
                c.model.num_classes, c.sample.num_images, c.sample.max_class_rows)
            self.count = len(self.labels)
        self.sample_fn = compiled_sampler.make_sample_fn(c, run.mesh, self.settings,
                                                         num_images=self.count,
                                                         num_snapshots=c.sample.num_snapshots)
        self.rng = jax.random.PRNGKey(c.seed + 2)

    def evaluate(self, step: int, params: Any) -> bool:
        count = self.count
        logging.info("step %d: sampling %d images (%s)...", step, count, self.settings.summary())
        started = time.perf_counter()
        outputs = self.sample_fn(params, jax.random.fold_in(self.rng, step),
                                 self.run.watcher.should_stop, labels=self.labels)
        if outputs is None:
            return False
        images, snapshots = outputs if isinstance(outputs, tuple) else (outputs, None)
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))[:count]
        grid = image_utils.make_grid(image_utils.to_uint8(images), num_columns=self.columns)
        self.run.writer.write_images(step, {"samples": grid[None]})
        if snapshots is not None:
            snapshots = np.asarray(multihost_utils.process_allgather(snapshots, tiled=True))
            strip = snapshots[:, :count].transpose(1, 0, 2, 3, 4)  # [N, K, H, W, C]
            strip = image_utils.make_grid(image_utils.to_uint8(strip.reshape((-1,) + strip.shape[2:])),
                                          num_columns=snapshots.shape[0])
            self.run.writer.write_images(step, {"denoising": strip[None]})
        if jax.process_index() == 0:
            path = epath.Path(self.run.workdir) / "samples" / f"step_{step:08d}.png"
            image_utils.save_png(grid, str(path))
        logging.info("step %d: sampled %d images in %s", step, count,
                     format_seconds(time.perf_counter() - started))
        return True


class FIDEvaluator(Evaluator):
    """FID, Inception Score and (with reference features) KID of `eval.num_samples` samples.

    Built before training, so a wrong path stops the run first. Every evaluation draws from
    the same noise (`seed + 3`), so changes in the curve come from the weights, not the draw.
    """

    name = "FID"

    def __init__(self, run: Run):
        super().__init__(run)
        c, e = run.config, run.config.eval
        self.every_steps = c.eval_every_steps
        self.settings = SamplerSettings.from_config(e)
        self.sample_fid = fid.make_sample_fid_fn(
            c, run.mesh, self.settings, weights=e.inception_weights, reference=e.reference_stats,
            num_samples=e.num_samples, batch_size=e.batch_size,
            class_counts=checkpointing.saved_class_counts(run.workdir))
        self.rng = jax.random.PRNGKey(c.seed + 3)

    def evaluate(self, step: int, params: Any) -> bool:
        logging.info("step %d: FID over %d samples (%s)...", step,
                     self.run.config.eval.num_samples, self.settings.summary())
        started = time.perf_counter()
        scores = self.sample_fid(params, self.rng, self.run.watcher.should_stop)
        if scores is None:
            return False
        logging.info("step %d: %s over %d samples (%.0f s)", step, fid.describe(scores),
                     scores["num_images"], time.perf_counter() - started)
        self.run.writer.write_scalars(step, {key: scores[key] for key in FID_SCALARS
                                             if scores.get(key) is not None})
        return True


@EVALUATORS.register("sample_grid")
def sample_grid(run: Run) -> SampleGrid | None:
    """Sample grids every `sample_every_steps` (0: off)."""
    return SampleGrid(run) if run.config.sample_every_steps > 0 else None


@EVALUATORS.register("fid")
def fid_evaluator(run: Run) -> FIDEvaluator | None:
    """FID every `eval_every_steps` (0: off), once the Inception weights and the reference
    statistics are both set."""
    c = run.config
    if c.eval_every_steps <= 0:
        return None
    if not (c.eval.inception_weights and c.eval.reference_stats):
        logging.warning("eval_every_steps=%d, but eval.inception_weights and eval.reference_stats "
                        "are not both set: no FID during training (see docs/evaluation.md)",
                        c.eval_every_steps)
        return None
    return FIDEvaluator(run)


def build_evaluators(run: Run) -> list[Evaluator]:
    """Every registered evaluator this run's config turns on, in the order registered."""
    made = (EVALUATORS.get(name)(run) for name in EVALUATORS.names())
    return [evaluator for evaluator in made if evaluator is not None]


class NonFiniteError(UserError, FloatingPointError):
    """The loss or gradient became NaN or infinite and `config.on_nonfinite` is "stop"."""


class FiniteCheck:
    """Checks the metrics of a call for non-finite steps one call later (no wait on the
    device), and at once before a checkpoint (never saving past an unchecked step)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.enabled = config.on_nonfinite == "stop"
        self.unchecked: list[tuple[int, dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Records the metrics of the call that ended at `step`, checking the call before."""
        self.unchecked.append((step, metrics))
        while len(self.unchecked) > 1:
            self._check(*self.unchecked.pop(0))

    def check_all(self) -> None:
        while self.unchecked:
            self._check(*self.unchecked.pop(0))

    def _check(self, step: int, metrics: dict[str, jax.Array]) -> None:
        if not self.enabled:
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


class Checkpoint(Event):
    """Saves the state every `save_every_steps`, at the end and when the run stops; the
    run's metrics are checked first and the workdir lock must still be this run's."""

    name = "checkpoint"
    at_stop = True

    def __init__(self, run: Run, finite: FiniteCheck, examples_seen: Callable[[], int]):
        self.run, self.finite, self.examples_seen = run, finite, examples_seen
        self.every_steps = run.config.save_every_steps
        self.last_saved: int | None = None

    def __call__(self, step: int, state: Any) -> bool:
        self.finite.check_all()
        self.run.holding.check(step)
        checkpointing.save(self.run.manager, step, state, self.run.config, self.examples_seen())
        self.last_saved = step
        return True


class EMASnapshot(Event):
    """Snapshots a power-EMA run's EMAs (`ema_snapshots`) every `ema.snapshot_every_steps`
    and at the last step, in the background; `close` waits for the last one."""

    name = "EMA snapshot"

    def __init__(self, run: Run):
        self.run = run
        self.every_steps = ema_snapshots.every_steps(run.config)
        self.manager = ema_snapshots.make_manager(ema_snapshots.directory(run.workdir),
                                                  write=True)
        self.last: int | None = None

    def __call__(self, step: int, state: Any) -> bool:
        self.run.holding.check(step)
        checkpointing.check_saves(self.manager, self.last)  # the previous one, in the background
        try:
            ema_snapshots.save(self.manager, step, state.emas(), self.run.config)
        except Exception as error:  # a full disk: the run stops, its snapshots intact
            raise checkpointing.save_failed(self.manager, step, error) from error
        self.last = step
        return True

    def close(self) -> None:
        """Waits for the last snapshot (raising if it failed) and closes the manager."""
        try:
            checkpointing.check_saves(self.manager, self.last, wait=True)
        finally:
            self.manager.close()


@dataclasses.dataclass(frozen=True)
class Performance:
    """A step's model FLOPs (the whole global batch), the devices sharing them, and each
    device's peak FLOP/s (None: unknown)."""

    step_flops: float
    device_count: int
    peak_flops: float | None

    def scalars(self, steps_per_second: float) -> dict[str, float]:
        """Model TFLOP/s per device and, where the peak is known, MFU."""
        achieved = flops.tflops_per_device(self.step_flops, steps_per_second, self.device_count)
        if self.peak_flops is None:
            return {"model_tflops_per_device": achieved}
        return {"model_tflops_per_device": achieved, "mfu": achieved * 1e12 / self.peak_flops}


class ScalarLog(Event):
    """Writes the mean of every metric since the last write (and steps/s, images/s and, with
    a `performance`, model TFLOP/s per device and MFU) every `log_every_steps`, at the end
    and when the run stops, and logs a progress line."""

    name = "scalars"
    at_stop = True

    def __init__(self, run: Run, events_left: Callable[[int], dict[str, int]],
                 performance: Performance | None = None):
        self.run, self.events_left, self.performance = run, events_left, performance
        self.every_steps = run.config.log_every_steps
        self.pending: list[dict[str, jax.Array]] = []
        self.last_loss: float | None = None  # mean loss of the last logging interval
        self.last_loss_steps = 0
        self._since = (time.perf_counter(), run.progress.excluded_seconds)

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)

    def __call__(self, step: int, state: Any) -> bool:
        self.run.holding.check(step)  # a run whose lock was taken writes nothing more
        fetched = jax.device_get(self.pending)  # per call: scalars, or [steps] arrays
        started, excluded = self._since
        # evaluations are kept out of the speed
        elapsed = time.perf_counter() - started - (self.run.progress.excluded_seconds - excluded)
        per_step = {key: np.concatenate([np.atleast_1d(m[key]) for m in fetched])
                    for key in fetched[0]}
        steps = len(per_step["loss"])
        scalars = {key: float(np.mean(values)) for key, values in per_step.items()}
        scalars["learning_rate"] = float(per_step["learning_rate"][-1])
        scalars["nonfinite"] = float(np.sum(per_step["nonfinite"]))  # skipped steps
        scalars["steps_per_sec"] = steps / elapsed
        scalars["images_per_sec"] = steps * self.run.config.batch_size / elapsed
        if self.performance is not None:
            scalars.update(self.performance.scalars(scalars["steps_per_sec"]))
        self.last_loss, self.last_loss_steps = scalars["loss"], steps
        self.run.writer.write_scalars(step, scalars)
        self.pending.clear()
        self._since = (time.perf_counter(), self.run.progress.excluded_seconds)
        if step < self.run.config.num_train_steps:  # the end has its summary instead
            line = self.run.progress.line(step, self.last_loss, self.events_left(step))
            if line is not None:
                logging.info("%s", line)
        return True


class Profile(Event):
    """Traces `config.profile_steps` train steps with `jax.profiler`, once, on process 0: it
    starts after the first call of the step (compiled, warm) and stops at the end of the call
    that reaches the count, writing under WORKDIR/plugins/profile. Runs after every call."""

    name = "profile"
    at_stop = True

    def __init__(self, run: Run):
        self.workdir = run.workdir
        self.steps = run.config.profile_steps if jax.process_index() == 0 else 0
        self.start_step: int | None = None

    def due(self, step: int, last: bool, stop: bool) -> bool:
        return self.steps > 0

    def __call__(self, step: int, state: Any) -> bool:
        if self.start_step is None:  # the first call: compiled and warm from here on
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.workdir)
            self.start_step = step
        elif step - self.start_step >= self.steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            logging.info("traced steps %d to %d into %s/plugins/profile (TensorBoard's profile "
                         "tab)", self.start_step + 1, step, self.workdir)
            self.steps = 0
        return True

    def close(self) -> None:
        """Ends a trace the run stopped inside of."""
        if self.start_step is not None and self.steps > 0:
            jax.profiler.stop_trace()
            self.steps = 0
