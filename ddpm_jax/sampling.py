"""Sampling from parameters: the jitted sampler, logged sample grids and FID of samples.

The training loop, the sample command and `evaluate fid` all sample through here. What
to sample with is one `samplers.SamplerSettings`, read from a config section (`sample` or
`eval`) and command-line overrides.
"""

from __future__ import annotations

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


def make_sample_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   settings: SamplerSettings, *, num_images: int, num_snapshots: int = 0):
    """Jitted `fn(params, rng) -> images [N, S, S, 3]` in [-1, 1] (and snapshots), one program.

    The batch is sharded over the mesh; N is `num_images` rounded up to a multiple of
    the device count.
    """
    definition = network.graphdef(config)
    schedule = diffusion.schedule_from_config(config)
    size = config.data.image_size
    shape = (sharding.padded_to_devices(num_images, mesh), size, size, 3)
    out_sharding = sharding.batch_sharding(mesh)
    d = config.diffusion

    def run(params, rng):
        return diffusion.sample(
            lambda x, t: network.apply(definition, params, x, t),
            schedule, shape, rng, prediction=d.prediction, variance=d.variance,
            clip_x0=d.clip_x0, num_snapshots=num_snapshots, initial_noise_sharding=out_sharding,
            **settings.sample_kwargs(),
        )

    outs = ((out_sharding, sharding.stacked_batch_sharding(mesh)) if num_snapshots
            else out_sharding)
    return jax.jit(run, in_shardings=(network.params_shardings(config, mesh),
                                      sharding.replicated(mesh)),
                   out_shardings=outs, compiler_options=ops.compiler_options(config))


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
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, settings: SamplerSettings, *,
    weights: str, reference: str, num_samples: int, batch_size: int, progress: bool = False,
):
    """`fn(params, rng) -> (FID, images scored)` of `num_samples` samples against `reference`.

    Loads the Inception weights and reference statistics at once (a wrong path fails before
    any sampling); samples go from the sampler to the Inception network on device.
    """
    reference_mu, reference_sigma, _ = fid.load_statistics(reference)
    features = fid.InceptionFeatures(weights, mesh)
    sample_fn = make_sample_fn(config, mesh, settings, num_images=min(batch_size, num_samples))

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
        config, mesh, SamplerSettings.from_config(e), weights=e.inception_weights,
        reference=e.reference_stats, num_samples=e.num_samples, batch_size=e.batch_size)
    rng = jax.random.PRNGKey(config.seed + 3)
    return lambda params: sample_fid(params, rng)[0]
