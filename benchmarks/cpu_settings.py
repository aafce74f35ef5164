"""What each CPU speed setting buys, against XLA's defaults, in one run.

The DDPM CIFAR-10 net (`configs/cifar10.py`, float32) on the CPU backend:

* `cpu_conv_library`: "default" (XLA hands convolutions and dots to YNNPACK) vs "eigen" (XLA's
  own convolution and dot kernels; YNNPACK keeps reductions), see `ddpm_jax/ops/xla.py`;
* `compute_chunk_size`: -1 (one pass over each device's batch) vs 8 (chunks of 8; the
  default, 0, now means 16 on CPU, measured in docs/performance-notes.md);
* `conv_algorithm`: "direct" (XLA's convolutions) vs "winograd" (F(4x4, 3x3) for the 16x16
  and 32x32 layers, F(2x2, 3x3) for the 4x4 and 8x8 ones, `ddpm_jax/ops/winograd.py`).

Each variant is compiled once; timed calls alternate between variants (median of
`--repeats`). The loss of the third step from the same initial state and batch is reported
with dropout off, where every variant computes the same function; the initial weights get
random noise added, as the zero-initialised output layers would otherwise hide every
convolution from the loss.

    python -m benchmarks.cpu_settings --output=cpu_settings.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import cifar10
from ddpm_jax import ops, train
from ddpm_jax.runtime import network

VARIANTS = {  # name: (cpu_conv_library, compute_chunk_size, conv_algorithm)
    "xla defaults": ("default", -1, "direct"),
    "eigen convolutions": ("eigen", -1, "direct"),
    "eigen + chunks of 8": ("eigen", 8, "direct"),
    "eigen + chunks + winograd": ("eigen", 0, "winograd"),
}
LOSS_STEP = 3


def make_config(library: str, chunk: int, algorithm: str, batch: int, dropout: float = 0.1):
    config = cifar10.get_config()
    config.batch_size, config.cpu_conv_library, config.compute_chunk_size = batch, library, chunk
    config.conv_algorithm = algorithm
    config.model.dropout = dropout
    return config


def train_runner(library: str, chunk: int, algorithm: str, batch: int, images: np.ndarray):
    config = make_config(library, chunk, algorithm, batch)
    mesh = train.create_mesh(config)
    step = train.make_train_step(config, mesh)
    holder = {"state": train.create_train_state(config, mesh)}
    global_batch = train.global_batch(images, mesh)

    def run():
        holder["state"], metrics = step(holder["state"], global_batch)
        jax.block_until_ready(metrics)

    return run


def step_loss(library: str, chunk: int, algorithm: str, batch: int, images: np.ndarray) -> float:
    """The loss of step `LOSS_STEP` on the same batch, from the same random initial weights."""
    config = make_config(library, chunk, algorithm, batch, dropout=0.0)
    mesh = train.create_mesh(config)
    step = train.make_train_step(config, mesh)
    state = train.create_train_state(config, mesh)
    state = state.replace(params=network.perturbed(state.params))
    for _ in range(LOSS_STEP):
        state, metrics = step(state, train.global_batch(images, mesh))
    return float(metrics["loss"])


def forward_runner(library: str, algorithm: str, batch: int):
    config = make_config(library, -1, algorithm, batch)
    mesh = train.create_mesh(config)
    graphdef = network.graphdef(config)
    params = train.create_train_state(config, mesh).params
    forward = jax.jit(lambda p, x, t: network.apply(graphdef, p, x, t),
                      compiler_options=ops.compiler_options(config))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
    t = jnp.asarray(rng.integers(0, 1000, batch))
    return lambda: forward(params, x, t).block_until_ready()


def time_alternating(runners: dict, repeats: int) -> dict[str, float]:
    for run in runners.values():  # compile and warm up
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="cpu_settings.json")
    args = parser.parse_args()
    rows = []
    rng = np.random.default_rng(0)
    names = list(VARIANTS)
    batch8 = [names[0], names[1], names[3]]  # a batch of 8 is one chunk
    for batch, variants in ((8, batch8), (32, names)):
        images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        runners = {name: train_runner(*VARIANTS[name], batch, images) for name in variants}
        seconds = time_alternating(runners, args.repeats)
        del runners  # free the variants' states before the loss runs
        losses = {name: step_loss(*VARIANTS[name], batch, images) for name in variants}
        for name in variants:
            rows.append({"case": f"train step, batch {batch}", "variant": name,
                         "seconds": seconds[name],
                         "speedup_vs_defaults": seconds[variants[0]] / seconds[name],
                         f"step_{LOSS_STEP}_loss_no_dropout": losses[name]})
    runners = {name: forward_runner(VARIANTS[name][0], VARIANTS[name][2], 64) for name in batch8}
    seconds = time_alternating(runners, args.repeats)
    for name in runners:
        rows.append({"case": "forward, batch 64", "variant": name, "seconds": seconds[name],
                     "speedup_vs_defaults": seconds["xla defaults"] / seconds[name],
                     f"step_{LOSS_STEP}_loss_no_dropout": float("nan")})
    common.report("CPU speed settings against XLA's defaults, DDPM CIFAR-10 net, float32", rows,
           args.output)


if __name__ == "__main__":
    main()
