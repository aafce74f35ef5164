"""The sampler compiled for a mesh: `SampleFn` runs a sampling engine plan
(`samplers.reverse_plan`) on the network's parameters, the batch sharded over every device.

The training loop, the sample command and `evaluate fid` all sample through here. What
to sample with is one `samplers.SamplerSettings`, read from a config section (`sample` or
`eval`) and command-line overrides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import ops, recipe, samplers
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice
from ddpm_jax.runtime import network, sharding
from ddpm_jax.samplers import SamplerSettings

WEIGHTS = ("ema", "params")


def sampling_params(config: ml_collections.ConfigDict, state: Any, weights: str = "ema") -> Any:
    """The weights samples come from: with `weights="ema"` the EMA when the run keeps one
    (else the raw weights), with "params" the raw weights."""
    check_choice("weights", weights, WEIGHTS)
    return state.ema_params if weights == "ema" and keeps_ema(config) else state.params


def keeps_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether a run of `config` keeps an EMA of its weights (a power EMA always does)."""
    return config.get("ema", {}).get("kind", "exponential") == "power" or config.ema_decay > 0


class SampleFn:
    """`fn(params, rng, should_stop=None, labels=None)` -> images [N, S, S, 3] in [-1, 1] (and
    snapshots [K, N, S, S, 3] with `num_snapshots`), or None when `should_stop()` said to stop.

    A class-conditional model samples image i of class `labels[i]` (fewer than N labels: the
    rest get the null label; None: all do), guided as `settings.guidance` says.

    The reverse chain is one compiled program (a loop over steps) that runs the whole chain
    in one call, or, given `should_stop`, a chunk of steps per call, checked in between: a
    stop request then waits for one chunk (sized to take about `CHUNK_SECONDS`), not the
    whole chain. Both run the same program, so they give the same images. The batch is
    sharded over the mesh; N is `num_images` rounded up to a multiple of the device count.
    """

    CHUNK_SECONDS = 2.0

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 settings: SamplerSettings, *, num_images: int, num_snapshots: int = 0):
        definition = network.graphdef(config)
        schedule = recipe.schedule(config)
        size = config.data.image_size
        shape = (sharding.padded_to_devices(num_images, mesh), size, size, 3)
        plan = samplers.reverse_plan(schedule, shape, settings, num_snapshots=num_snapshots,
                                     preconditioning=recipe.preconditioning(config),
                                     **recipe.reverse_process(config))
        if plan.sampling_variance not in (None, plan.variance):
            logging.info("%s over %d of %d timesteps with the %s variance, not the run's %s "
                         "(sample.variance='auto'; name one to choose it)", settings.name,
                         plan.num_steps, schedule.num_timesteps, plan.sampling_variance,
                         plan.variance)
        self.num_steps = plan.num_steps
        self.num_images = shape[0]
        self._plan = plan
        self.num_classes = config.model.get("num_classes", 0)
        check_guidance(settings, self.num_classes)
        batch = sharding.batch_sharding(mesh)
        stacked = sharding.stacked_batch_sharding(mesh)

        def init(rng):
            x, state, snapshots, rngs = samplers.reverse_init(plan, rng, batch)
            return x, state, jax.lax.with_sharding_constraint(snapshots, stacked), rngs

        def advance(params, carry, start, stop, labels):
            if labels is None:
                denoise = lambda x, t: network.apply(definition, params, x, t)  # noqa: E731
            else:
                denoise = samplers.guided(
                    lambda x, t, labels: network.apply(definition, params, x, t,
                                                       class_labels=labels),
                    labels, self.num_classes, settings.guidance)
            return samplers.reverse_steps(plan, denoise, schedule, carry, start, stop)

        options = ops.compiler_options(config)
        self._init = jax.jit(init, in_shardings=sharding.replicated(mesh),
                             compiler_options=options)
        self._advance = jax.jit(advance, donate_argnums=(1,), compiler_options=options,
                                in_shardings=(network.params_shardings(config, mesh), None,
                                              None, None, batch))
        self._batch_sharding = batch

    def padded_labels(self, labels: Any) -> jax.Array | None:
        """`labels` as the sampler takes them: N int32, the null label after the given ones
        (None for an unconditional model)."""
        if not self.num_classes:
            if labels is not None:
                raise UserError("class labels were given, but the model is unconditional "
                                "(model.num_classes=0)")
            return None
        given = np.asarray([] if labels is None else labels, np.int32).reshape(-1)
        if len(given) > self.num_images:
            raise UserError(f"{len(given)} class labels for {self.num_images} images")
        if given.size and (given.min() < 0 or given.max() >= self.num_classes):
            raise UserError(f"class labels must be in [0, {self.num_classes - 1}] (the model "
                            f"has model.num_classes={self.num_classes}); got {sorted(set(given))}")
        padded = np.full(self.num_images, self.num_classes, np.int32)
        padded[:len(given)] = given
        # every process holds all labels and places its own devices' share
        return jax.make_array_from_callback(padded.shape, self._batch_sharding,
                                            lambda index: padded[index])

    def __call__(self, params: Any, rng: jax.Array, should_stop: Callable[[], bool] | None = None,
                 on_steps: Callable[[int], None] | None = None, labels: Any = None):
        labels = self.padded_labels(labels)
        carry = self._init(rng)
        if should_stop is None and on_steps is None:
            carry = self._advance(params, carry, 0, self.num_steps, labels)
            return samplers.reverse_result(self._plan, carry)
        done, chunk = 0, 1
        while done < self.num_steps:
            stop = min(done + chunk, self.num_steps)
            started = time.perf_counter()
            carry = jax.block_until_ready(self._advance(params, carry, done, stop, labels))
            elapsed = time.perf_counter() - started
            if on_steps is not None:
                on_steps(stop - done)
            done = stop
            if should_stop is not None and should_stop():
                return None
            # Double the chunk while a call takes under half the target; the first call
            # compiles, so it never grows the chunk. Every process takes process 0's choice.
            if chunk > 1 or done > 1:
                chunk = _agreed(chunk * 2 if elapsed < self.CHUNK_SECONDS / 2 else chunk)
        return samplers.reverse_result(self._plan, carry)


def class_grid(num_classes: int, num_images: int, max_rows: int) -> tuple[np.ndarray, int]:
    """(labels, columns) of a grid with one row per class: the first `max_rows` classes,
    each in a row of about `num_images / rows` images (at least one)."""
    rows = min(num_classes, max_rows)
    columns = max(1, num_images // rows)
    return np.repeat(np.arange(rows, dtype=np.int32), columns), columns


def class_labels(num_classes: int, count: int, distribution: str,
                 counts: list[int] | None = None, seed: int = 0) -> np.ndarray:
    """Classes of `count` samples of a class-conditional model: "uniform" (balanced: each
    class count / num_classes times, to one), or "data" (drawn with the training set's class
    frequencies, `counts`); in an order shuffled with `seed`, so every batch mixes classes."""
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        return rng.permutation(np.arange(count) % num_classes).astype(np.int32)
    if not counts:
        raise UserError("eval.class_distribution='data' needs the class counts of the training "
                        "data, which this run did not record (only image folders and in-memory "
                        "sources are counted); use 'uniform'")
    frequencies = np.asarray(counts, np.float64) / np.sum(counts)
    return rng.choice(num_classes, size=count, p=frequencies).astype(np.int32)


def check_guidance(settings: SamplerSettings, num_classes: int) -> None:
    """Refuses guidance for an unconditional model, before anything is compiled."""
    if settings.guidance.active and not num_classes:
        raise UserError(f"guidance_scale={settings.guidance.scale} needs a class-conditional "
                        "model (model.num_classes > 0); this one is unconditional: use 1")


def _agreed(value: int) -> int:
    """`value` as process 0 has it (the same sequence of calls on every process)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def make_sample_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   settings: SamplerSettings, *, num_images: int, num_snapshots: int = 0
                   ) -> SampleFn:
    """The sampler of `config`'s network with `settings` (see `SampleFn`)."""
    return SampleFn(config, mesh, settings, num_images=num_images, num_snapshots=num_snapshots)
