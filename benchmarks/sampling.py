"""Sampling speed: the whole reverse chain as one compiled program vs a Python loop of steps.

    python benchmarks/sampling.py --config=configs/quickstart.py --batch=16 --output=sampling.json

Both sides run the same network and the same `diffusion.ddpm_step`/`ddim_step`; the baseline
dispatches one jitted step per timestep from Python, as a straightforward port would.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from ddpm_jax import recipe, samplers, train  # noqa: E402
from ddpm_jax.core import diffusion  # noqa: E402
from ddpm_jax.runtime import (
    compiled_sampler,  # noqa: E402
    network,  # noqa: E402
)
from ddpm_jax.samplers import SamplerSettings  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Model/diffusion config.")
flags.DEFINE_integer("batch", 16, "Images per sampling run.")
flags.DEFINE_integer("repeats", 3, "Timed runs per case (median reported).")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
flags.DEFINE_bool("tiny_net", False,
                  "Shrink the net to base 8 at 8x8, where per-step dispatch cost dominates.")
FLAGS = flags.FLAGS


def python_loop_sampler(config, params, graphdef, schedule, shape, sampler, num_steps):
    """Baseline: one jitted denoise+update per timestep, looped in Python."""
    steps = samplers.sampling_timesteps(schedule, sampler, num_steps)
    prev = list(steps[1:]) + [-1]

    @functools.partial(jax.jit, static_argnums=())
    def one_step(x, t, t_prev, rng):
        t_batch = jnp.full((shape[0],), t, jnp.int32)
        out = network.apply(graphdef, params, x, t_batch)
        noise = jax.random.normal(rng, shape)
        if sampler == "ddpm":
            return diffusion.ddpm_step(schedule, out, x, t_batch, noise,
                                       variance=config.diffusion.variance)
        return diffusion.ddim_step(schedule, out, x, t_batch, jnp.full_like(t_batch, t_prev),
                                   noise, 0.0)

    def run(rng):
        x = jax.random.normal(rng, shape)
        for i, (t, tp) in enumerate(zip(steps, prev, strict=True)):
            x = one_step(x, t, tp, jax.random.fold_in(rng, i))
        return x.block_until_ready()

    return run


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.tiny_net:
        config.data.image_size = 8
        config.model.base_channels = 8
        config.model.channel_mults = (1, 2)
        config.model.attention_resolutions = (4,)
        config.model.norm_groups = 4
    mesh = train.create_mesh(config)
    state = train.create_train_state(config, mesh)
    graphdef = network.graphdef(config)
    schedule = recipe.schedule(config)
    size = config.data.image_size
    shape = (FLAGS.batch, size, size, 3)
    rng = jax.random.PRNGKey(0)
    rows = []
    for sampler, num_steps in (("ddim", 100), ("ddpm", None)):
        scan_fn = compiled_sampler.make_sample_fn(config, mesh, SamplerSettings(sampler, num_steps or 0),
                                          num_images=FLAGS.batch)
        scan_time = common.time_call(lambda fn=scan_fn: fn(state.params, rng).block_until_ready(),
                                     repeats=FLAGS.repeats)
        loop = python_loop_sampler(config, state.params, graphdef, schedule, shape, sampler,
                                   num_steps)
        loop_time = common.time_call(lambda fn=loop: fn(rng), repeats=FLAGS.repeats)
        steps = num_steps or schedule.num_timesteps
        rows.append({
            "net_params": sum(x.size for x in jax.tree.leaves(state.params)),
            "sampler": sampler, "steps": steps, "batch": FLAGS.batch, "image_size": size,
            "one_program_s": scan_time, "python_loop_s": loop_time,
            "speedup": loop_time / scan_time,
            "one_program_ms_per_step": 1000 * scan_time / steps,
        })
    common.report("sampling: one compiled program vs Python loop", rows, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
