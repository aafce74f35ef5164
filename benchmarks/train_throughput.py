"""Train-step throughput and model-FLOP utilisation on whatever backend runs it.

    python benchmarks/train_throughput.py --config=configs/cifar10.py --batch=8 \
        --config.model.dtype=bfloat16 --output=throughput.json

FLOPs per step come from XLA's cost analysis of the train step's HLO before optimisation
(the program as written: the same count on every backend, no extra compile; on CPU within 0.7%
of the compiled program's count); the peak is measured on the same backend with a chain of large
jitted matmuls of random data in the config's compute dtype.
Model-FLOP utilisation = the network's FLOPs per step (counted with direct convolutions)
x steps per second / measured peak. Where the step computes its 3x3 convolutions by Winograd
(`--config.conv_algorithm=winograd`) it executes fewer FLOPs than that; both are reported.
Steps are timed as training runs them, `steps_per_dispatch` per compiled call
(`--config.steps_per_dispatch=1` for one per call).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from ddpm_jax import models, train  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Training config.")
flags.DEFINE_integer("batch", 0, "Global batch size (0: the config's).")
flags.DEFINE_integer("repeats", 5, "Timed calls (median reported).")
flags.DEFINE_integer("matmul_size", 4096, "Side of the square matmul that measures the peak.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def measured_peak_flops(dtype: str, size: int) -> float:
    """FLOP/s of a jitted size x size matmul chain in `dtype` (the best this backend does).

    Random operands, scaled to keep the chain's magnitude steady: constant data can run
    faster than real data on a GPU, which would overstate the peak.
    """
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = (jax.random.normal(key_b, (size, size)) / size**0.5).astype(dtype)

    @jax.jit
    def chain(a, b):
        for _ in range(4):
            a = a @ b
        return a

    seconds = common.time_call(lambda: chain(a, b).block_until_ready(), repeats=3)
    return 4 * 2 * size**3 / seconds


def step_flops(step_fn, state, batch) -> float:
    """FLOPs of one call of `step_fn`, from XLA's cost analysis of its unoptimised HLO, or
    of the compiled program where the backend analyses only that (the GPU backend)."""
    lowered = step_fn.lower(state, batch)
    analysis = lowered.cost_analysis() or lowered.compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.batch:
        config.batch_size = FLAGS.batch
    mesh = train.create_mesh(config)
    state = train.create_train_state(config, mesh)
    size = config.data.image_size
    local_batch = np.zeros((config.batch_size, size, size, 3), np.uint8)
    batch = train.global_batch(local_batch, mesh)
    algorithm = models.conv_algorithm(config)
    # Counted on the step without chunks or micro-batches: they run in a loop, whose body
    # XLA's cost analysis counts once. Same FLOPs per step.
    flops_config = config.copy_and_resolve_references()
    flops_config.compute_chunk_size, flops_config.grad_accum_steps = -1, 1
    executed_flops = step_flops(train.make_train_step(flops_config, mesh), state, batch)
    flops = executed_flops
    if algorithm != "direct":
        flops_config.conv_algorithm = "direct"
        flops = step_flops(train.make_train_step(flops_config, mesh), state, batch)
    # Timed as training runs it: `steps_per_dispatch` steps per compiled call.
    step_fns = train.StepFunctions(config, mesh)
    steps = step_fns.per_call
    holder = {"state": state}

    def run():
        holder["state"], metrics = step_fns(holder["state"], [local_batch] * steps)
        jax.block_until_ready(metrics)

    seconds = common.time_call(run, warmup=2, repeats=FLAGS.repeats) / steps
    peak = measured_peak_flops(config.model.dtype, FLAGS.matmul_size)
    rows = [{
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "dtype": config.model.dtype, "batch": config.batch_size, "image_size": size,
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "steps_per_call": steps, "step_s": seconds,
        "images_per_s": config.batch_size / seconds,
        "conv_algorithm": algorithm,
        "gflop_per_step": flops / 1e9, "executed_gflop_per_step": executed_flops / 1e9,
        "achieved_tflop_s": flops / seconds / 1e12,
        "peak_tflop_s": peak / 1e12, "utilisation": flops / seconds / peak,
    }]
    common.report("train step throughput", rows, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
