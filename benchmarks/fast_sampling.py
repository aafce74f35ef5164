"""Few-step samplers: how close they land to the data, and what they cost on a real net.

    python -m benchmarks.fast_sampling [--config=configs/cifar10.py] [--batch=16] [--json=F]

1. Accuracy, with no training: for data ~ N(0.3, 0.5^2) the exact denoiser is known
   (`diffusion.optimal_gaussian_eps`), so a sampler's output mean and std can be compared
   with the data's. Every sampler and spacing at 10, 20, 35, 50 and 100 network calls,
   linear schedule, T = 1000, 2^18 samples (std error of a std about 0.1%), no clipping;
   then the samplers that take continuous noise levels on the oracle of an EDM-formulation
   model (`edm.optimal_gaussian_network`, sigma from 80 to 0.002) on their spacings.
2. Cost: wall time of one sampling program (`runtime.compiled_sampler.make_sample_fn`) for `--config`'s
   net with random weights, DDIM-100 against DPM-Solver++-20, medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from benchmarks import common

CALLS = (10, 20, 35, 50, 100)
SAMPLERS = (("ddpm", "fixed_large"), ("ddpm", "fixed_small"), ("ddim", "fixed_small"),
            ("dpm_solver++", "fixed_small"), ("heun", "-"), ("euler", "-"))
CONTINUOUS_SAMPLERS = ("dpm_solver++", "heun", "euler")
DATA_MEAN, DATA_STD = 0.3, 0.5


def oracle_rows(continuous: bool = False) -> list[dict]:
    """Mean and std of each sampler's output on the oracle at each count of network calls:
    of the discrete model, or (`continuous`) of an EDM-formulation model."""
    from ddpm_jax import samplers
    from ddpm_jax.core import diffusion, edm
    from ddpm_jax.samplers import CONTINUOUS_SPACINGS, SPACINGS

    schedule = diffusion.make_schedule("linear", 1000)
    if continuous:
        preconditioning = edm.EDMPreconditioning()
        denoise = edm.optimal_gaussian_network(preconditioning, DATA_MEAN, DATA_STD)
        cases = [(name, "-") for name in CONTINUOUS_SAMPLERS]
        spacings = CONTINUOUS_SPACINGS.names()
    else:
        preconditioning = None
        denoise = diffusion.optimal_gaussian_eps(schedule, DATA_MEAN, DATA_STD)
        cases, spacings = SAMPLERS, SPACINGS.names()
    rows = []
    for sampler, variance in cases:
        for spacing in spacings:
            row = {"sampler": sampler, "variance": variance, "spacing": spacing}
            for calls in CALLS:
                run = jax.jit(lambda rng, sampler=sampler, calls=calls, spacing=spacing,
                              variance=variance: samplers.sample(
                                  denoise, schedule, (2**15, 8), rng, sampler=sampler,
                                  num_steps=calls, spacing=spacing,
                                  variance="fixed_small" if variance == "-" else variance,
                                  clip_x0=False, preconditioning=preconditioning))
                x = np.asarray(run(jax.random.PRNGKey(0)), np.float64)
                row[f"mean@{calls}"] = x.mean()
                row[f"std@{calls}"] = x.std()
            rows.append(row)
    return rows


def timing_rows(config_path: str, batch: int, repeats: int) -> list[dict]:
    from ddpm_jax.runtime import compiled_sampler, network, sharding
    from ddpm_jax.samplers import SamplerSettings

    config = _load_config(config_path)
    mesh = sharding.create_mesh(config)
    params = network.random_params(config)
    rows, baseline = [], None
    for name, calls in (("ddim", 100), ("dpm_solver++", 20)):
        fn = compiled_sampler.make_sample_fn(config, mesh, SamplerSettings(name, calls),
                                     num_images=batch)
        seconds = common.time_call(
            lambda fn=fn: fn(params, jax.random.PRNGKey(0)).block_until_ready(), repeats=repeats)
        baseline = baseline or seconds
        rows.append({"config": config_path, "batch": batch, "sampler": name,
                     "network_calls": calls, "seconds": seconds, "speedup": baseline / seconds})
    return rows


def _load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10.py")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_timing", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"oracle": oracle_rows(), "oracle_continuous": oracle_rows(continuous=True)}
    common.report(f"oracle: data mean {DATA_MEAN}, std {DATA_STD}", results["oracle"], None)
    common.report("oracle of an EDM-formulation model", results["oracle_continuous"], None)
    if not args.skip_timing:
        results["time"] = timing_rows(args.config, args.batch, args.repeats)
        common.report("wall time of one sampling program", results["time"], None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "fast_sampling", "machine": common.machine(), **results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
