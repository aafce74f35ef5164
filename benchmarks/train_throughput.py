"""Train-step throughput and model-FLOP utilisation on whatever backend runs it.

    python benchmarks/train_throughput.py --config=configs/cifar10.py --batch=8 \
        --config.model.dtype=bfloat16 --output=throughput.json

FLOPs per step come from XLA's cost analysis of the train step's program before
optimisation, lowered for the host's CPU (`ddpm_jax.runtime.flops`, which the training loop's
TensorBoard TFLOP/s use too): the program as written, the whole of it before it is split over
devices, the same on every backend (a GPU's compiled program leaves out its cuDNN
convolutions), and no extra compile. The peak is measured on the same backend with a chain of
large jitted matmuls of random data in the config's compute dtype, times the device count.
Model-FLOP utilisation = the network's FLOPs per step (counted with direct convolutions)
x steps per second / peak. Where the step computes its 3x3 convolutions by Winograd
(float32 on CPU) it executes fewer FLOPs than that; both are reported.
Steps are timed as training runs them, `steps_per_dispatch` per compiled call
(`--config.steps_per_dispatch=1` for one per call); `--pipelined_calls=N` dispatches N calls
before waiting, as the training loop does not wait after each (on a GPU that wait is
measurable; on the CPU it is not).
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
from ddpm_jax import ops, train

config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Training config.")
flags.DEFINE_integer("batch", 0, "Global batch size (0: the config's).")
flags.DEFINE_integer("repeats", 5, "Timed calls (median reported).")
flags.DEFINE_integer("matmul_size", 4096, "Side of the square matmul that measures the peak.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
flags.DEFINE_integer("pipelined_calls", 1,
                     "Calls dispatched back to back per timed unit, waited on once: the "
                     "training loop keeps one call in flight, so on a GPU or TPU >1 leaves "
                     "out the wait after each call that it does not pay.")
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


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.batch:
        config.batch_size = FLAGS.batch
    mesh = train.create_mesh(config)
    state = train.create_train_state(config, mesh)
    size = config.data.image_size
    # Random pixels: constant data can run faster than real data on some chips.
    local_batch = np.random.default_rng(0).integers(
        0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
    algorithm = ops.conv_algorithm(config)
    flops = train.model_flops_per_step(config, mesh)
    executed_flops = train.model_flops_per_step(config, mesh, algorithm)
    # Timed as training runs it: `steps_per_dispatch` steps per compiled call, and
    # `pipelined_calls` calls dispatched before waiting for the last.
    step_fns = train.step_functions(config, mesh)
    steps, calls = step_fns.per_call, FLAGS.pipelined_calls
    holder = {"state": state}

    def run():
        for _ in range(calls):
            holder["state"], metrics = step_fns(holder["state"], [local_batch] * steps)
        jax.block_until_ready(metrics)

    seconds = common.time_call(run, warmup=2, repeats=FLAGS.repeats) / (steps * calls)
    peak = measured_peak_flops(config.model.dtype, FLAGS.matmul_size) * jax.device_count()
    rows = [{
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "dtype": config.model.dtype, "batch": config.batch_size, "image_size": size,
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "steps_per_call": steps, "pipelined_calls": calls, "step_s": seconds,
        "images_per_s": config.batch_size / seconds,
        "conv_algorithm": algorithm,
        "gflop_per_step": flops / 1e9, "executed_gflop_per_step": executed_flops / 1e9,
        "achieved_tflop_s": flops / seconds / 1e12,
        "peak_tflop_s": peak / 1e12, "utilisation": flops / seconds / peak,
    }]
    common.report("train step throughput", rows, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
