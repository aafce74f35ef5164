"""Sampling from parameters: the jitted sampler, logged sample grids and FID of samples.

The training loop, the sample command and `evaluate fid` all sample through here. What
to sample with is one `samplers.SamplerSettings`, read from a config section (`sample` or
`eval`) and command-line overrides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import diffusion, fid, image_utils, network, ops, sharding
from ddpm_jax.registry import check_choice
from ddpm_jax.samplers import SamplerSettings

if TYPE_CHECKING:
    from clu import metric_writers


WEIGHTS = ("ema", "params")


def sampling_params(config: ml_collections.ConfigDict, state: Any, weights: str = "ema") -> Any:
    """The weights samples come from: with `weights="ema"` the EMA when the run keeps one
    (else the raw weights), with "params" the raw weights."""
    check_choice("weights", weights, WEIGHTS)
    return state.ema_params if weights == "ema" and config.ema_decay > 0 else state.params


class SampleFn:
    """`fn(params, rng, should_stop=None)` -> images [N, S, S, 3] in [-1, 1] (and snapshots
    [K, N, S, S, 3] with `num_snapshots`), or None when `should_stop()` said to stop.

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
        schedule = diffusion.schedule_from_config(config)
        size = config.data.image_size
        shape = (sharding.padded_to_devices(num_images, mesh), size, size, 3)
        d = config.diffusion
        plan = diffusion.reverse_plan(schedule, shape, prediction=d.prediction,
                                      variance=d.variance, clip_x0=d.clip_x0,
                                      num_snapshots=num_snapshots, **settings.sample_kwargs())
        self.num_steps = plan.num_steps
        self.num_images = shape[0]
        self._plan = plan
        batch = sharding.batch_sharding(mesh)
        stacked = sharding.stacked_batch_sharding(mesh)

        def init(rng):
            x, state, snapshots, rngs = diffusion.reverse_init(plan, rng, batch)
            return x, state, jax.lax.with_sharding_constraint(snapshots, stacked), rngs

        def advance(params, carry, start, stop):
            return diffusion.reverse_steps(
                plan, lambda x, t: network.apply(definition, params, x, t), schedule, carry,
                start, stop)

        options = ops.compiler_options(config)
        self._init = jax.jit(init, in_shardings=sharding.replicated(mesh),
                             compiler_options=options)
        self._advance = jax.jit(advance, donate_argnums=(1,), compiler_options=options,
                                in_shardings=(network.params_shardings(config, mesh), None,
                                              None, None))

    def __call__(self, params: Any, rng: jax.Array, should_stop: Callable[[], bool] | None = None,
                 on_steps: Callable[[int], None] | None = None):
        carry = self._init(rng)
        if should_stop is None and on_steps is None:
            carry = self._advance(params, carry, 0, self.num_steps)
            return diffusion.reverse_result(self._plan, carry)
        done, chunk = 0, 1
        while done < self.num_steps:
            stop = min(done + chunk, self.num_steps)
            started = time.perf_counter()
            carry = jax.block_until_ready(self._advance(params, carry, done, stop))
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
        return diffusion.reverse_result(self._plan, carry)


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


def log_sample_grid(
    sample_fn: SampleFn, params: Any, rng: jax.Array, step: int, num_images: int,
    writer: metric_writers.MetricWriter, workdir: str,
    should_stop: Callable[[], bool] | None = None,
) -> bool:
    """Samples, gathers to every host, and writes a grid to TensorBoard and workdir/samples;
    False (nothing written) when `should_stop()` asked to stop during sampling."""
    outputs = sample_fn(params, rng, should_stop)
    if outputs is None:
        return False
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
    return True


def make_sample_fid_fn(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, settings: SamplerSettings, *,
    weights: str, reference: str, num_samples: int, batch_size: int, progress: bool = False,
):
    """`fn(params, rng, should_stop=None) -> scores` of `num_samples` samples against
    `reference` (`fid.compare`'s FID, IS and KID, and `num_images`), or None when
    `should_stop()` asked to stop.

    Loads the Inception weights and reference statistics at once (a wrong path fails before
    any sampling); samples go from the sampler to the Inception network on device.
    """
    reference_stats = fid.load_reference(reference)
    features = fid.InceptionFeatures(weights, mesh)
    sample_fn = make_sample_fn(config, mesh, settings, num_images=min(batch_size, num_samples))

    def evaluate(params: Any, rng: jax.Array, should_stop: Callable[[], bool] | None = None
                 ) -> dict[str, Any] | None:
        scores = features.sample_statistics(sample_fn, params, rng, num_samples, progress,
                                            should_stop)
        if scores is None:
            return None
        return {**fid.compare(scores, reference_stats), "num_images": scores.count}

    return evaluate


def make_fid_evaluator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """`fn(params, should_stop=None) -> scores` (FID, IS, KID: `make_sample_fid_fn`) of
    `config.eval.num_samples` samples (None when `should_stop()` asked to stop), or None when
    FID is off.

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
        config, mesh, SamplerSettings.from_config(e), weights=e.inception_weights,
        reference=e.reference_stats, num_samples=e.num_samples, batch_size=e.batch_size)
    rng = jax.random.PRNGKey(config.seed + 3)

    def evaluate(params: Any, should_stop: Callable[[], bool] | None = None
                 ) -> dict[str, Any] | None:
        return sample_fid(params, rng, should_stop)

    return evaluate
