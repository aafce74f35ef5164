"""ddpm-jax against PyTorch (diffusers `UNet2DModel`, eager and `torch.compile`) on one GPU.

    python -m benchmarks.gpu_vs_pytorch --output=DIR [--cases=...] [--variants=...]

The same nets on both sides (`benchmarks.vs_pytorch`: the config's net as diffusers'
`UNet2DModel`, parameter counts printed), random weights, random uint8 batches, the
train step of each side as its users run it: ddpm-jax's compiled step (`train.step_functions`)
with calls dispatched back to back as the training loop does; PyTorch with AMP bf16 (or TF32
float32, XLA's default precision on a GPU), fused AdamW, gradient clipping and an EMA, eager
and with the net under `torch.compile`. Each timed unit is `--steps` train steps and one wait
for the device at its end, on every side.

Every side lives in its own process (`vs_pytorch.Side`): the JAX one, the eager one, and
one per `torch.compile`d case, so no side shares an allocator with another. The compilers
run one kind at a time (XLA's, whose autotuner times kernels on the GPU; then
`torch.compile`'s; then the eager side's cuDNN autotuning): run side by side they slowed each
other several times over (docs/performance-notes.md, "On a GPU"). Sides not warm by
`--warm_deadline_s` are stopped and left out. After that each case is timed alternating its
sides, `--repeats` times; the table reports medians per step, images/s,
model-FLOP utilisation (FLOPs per step counted before optimisation, as
`train_throughput.py`, over the measured bf16 matmul peak of the same run) and the ratios
ddpm-jax / eager and ddpm-jax / compiled.

`--variants` times ddpm-jax's speed options (config overrides, `VARIANTS`) against the
default step of the same case, alternating, and
`--profile` traces the named cases (`jax.profiler`) and summarises where the GPU's time
goes (`benchmarks.trace_summary`). Results: DIR/gpu_vs_pytorch.json and DIR/extra.json
(first calls, variants, peak), the traces' summaries in DIR/profile_*.json and the Perfetto
traces in DIR/trace_*.json.gz. `--smoke` runs the same on a CPU with tiny nets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import trace_summary  # noqa: E402
from benchmarks.common import report  # noqa: E402
from benchmarks.vs_pytorch import JaxSide, Side, TorchSide  # noqa: E402

# name: (config module, compute dtype, batch)
CASES = {
    "cifar10_bf16_b128": ("cifar10", "bfloat16", 128),
    "cifar10_bf16_b256": ("cifar10", "bfloat16", 256),
    "celeba64_bf16_b128": ("celeba64", "bfloat16", 128),
    "cifar10_f32_b128": ("cifar10", "float32", 128),
}
# name: (case, config overrides): ddpm-jax's speed options, each against its case's default
VARIANTS = {
    "k4": ("cifar10_bf16_b128", {"steps_per_dispatch": 4}),
}
JAX_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # the GPU is shared by the sides


def case_config(case: str, overrides: dict | None = None, smoke: bool = False):
    """The ml_collections config of a case (its module's, dtype and batch set); `smoke`:
    the same net shrunk to 16 channels and batch 4, to try this script on a CPU."""
    import importlib

    module, dtype, batch = CASES[case]
    config = importlib.import_module(f"configs.{module}").get_config()
    config.model.dtype, config.batch_size = dtype, batch
    if smoke:
        config.model.base_channels, config.model.norm_groups = 16, 4
        config.batch_size = batch // 32
    for key, value in (overrides or {}).items():
        config[key] = value
    return config


class GpuRunner:
    """One side's train steps for several cases (JAX: also variants), warmed up together."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.label = spec["side"] + (f" compiled ({spec['compile']})" if spec["compile"] else "")
        self.sides, self.images = {}, {}
        for name, (case, overrides) in spec["cases"].items():
            config = case_config(case, overrides, spec["smoke"])
            if spec["side"] == "jax":
                per_call = config.get("steps_per_dispatch", 0) or 1
                side = JaxSide(config, spec["seed"], per_call, spec["steps"] // per_call)
            else:
                side = TorchSide(config, spec["seed"], spec["steps"],
                                 "cpu" if spec["smoke"] else "cuda", spec["compile"])
            self.sides[name] = side
            self.images[name] = side.inputs("train", config.batch_size)[0]

    def parameter_count(self) -> int:
        return next(iter(self.sides.values())).parameter_count()

    def warm_up(self) -> dict[str, float]:
        """Compiles and runs each case once (its first call, timed), then twice more.

        One case after another: compiling several at once on one GPU host (threads, or
        other processes' compilers beside it) slowed every compile several times over.
        """
        first: dict[str, float] = {}
        for name, side in self.sides.items():
            start = time.perf_counter()
            side.train_step(self.images[name])
            first[name] = time.perf_counter() - start
            print(f"[{self.label}] {name}: first call {first[name]:.1f} s", flush=True)
            for _ in range(2):
                side.train_step(self.images[name])
        return first

    def time(self, name: str) -> float:
        """Seconds per train step of one unit of `steps` steps of `name`."""
        start = time.perf_counter()
        self.sides[name].train_step(self.images[name])
        return (time.perf_counter() - start) / self.spec["steps"]

    def profile(self, name: str, directory: str) -> dict:
        """A `jax.profiler` trace of three units of `name`, summarised."""
        import jax

        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # Python's own calls would slow the host it measures
        with jax.profiler.trace(directory, create_perfetto_trace=True, profiler_options=options):
            for _ in range(3):
                self.sides[name].train_step(self.images[name])
        return trace_summary.summarise(directory, steps=3 * self.spec["steps"])

    def peak_tflops(self) -> float:
        """bf16 TFLOP/s of a jitted chain of square matmuls of random data."""
        from benchmarks.train_throughput import measured_peak_flops

        return measured_peak_flops("bfloat16", 512 if self.spec["smoke"] else 8192) / 1e12


def gpu_worker(spec: dict, connection) -> None:
    """Builds one side's runner and warms it up, saying ("count", parameters), then
    ("warm", first-call seconds per case) or ("failed", why); then serves requests until
    told to stop: ("time", name) -> s/step, ("profile", name, dir) -> summary,
    ("peak",) -> TFLOP/s."""
    try:
        runner = GpuRunner(spec)
        connection.send(("count", runner.parameter_count()))
        connection.send(("warm", runner.warm_up()))
    except Exception as error:  # reported to the parent, which goes on without this side
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    while (request := connection.recv()) is not None:
        kind, *args = request
        try:
            result = {"time": runner.time, "profile": runner.profile,
                      "peak": runner.peak_tflops}[kind](*args)
        except Exception as error:
            result = ("failed", f"{type(error).__name__}: {error}")
        connection.send(result)


def start(spec: dict, environ: dict | None = None) -> Side:
    """A worker process for one side (its parameter count and warm-up come later)."""
    return Side(spec, environ=environ, target=gpu_worker, handshake=False)


def wait_warm(sides: dict[str, Side], deadline: float) -> dict[str, dict]:
    """Each side's first-call seconds per case, or its failure, as each becomes warm; sides
    not warm by `deadline` (time.monotonic) are stopped and left out."""
    from multiprocessing.connection import wait

    pending = {side.connection: key for key, side in sides.items()}
    warm: dict[str, dict] = {}
    while pending and (remaining := deadline - time.monotonic()) > 0:
        for connection in wait(list(pending), timeout=remaining):
            key = pending[connection]
            side = sides[key]
            try:
                kind, value = connection.recv()
            except EOFError:
                kind, value = "failed", "the worker exited"
            if kind == "count":
                side.parameter_count = value
                continue
            warm[key] = {"first_call_s": value} if kind == "warm" else {"failed": value}
            print(key, warm[key], flush=True)
            del pending[connection]
    for key in pending.values():  # stopped, so that their compiling does not run beside
        warm[key] = {"failed": "not warm within --warm_deadline_s"}  # the timed calls
        sides[key].process.terminate()
        print(key, warm[key], flush=True)
    return warm


def timed(sides: list[tuple[str, Side, str]], repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each (label, side, case name), the sides alternating."""
    times: dict[str, list[float]] = {label: [] for label, _, _ in sides}
    for _ in range(repeats):
        for label, side, name in sides:
            result = side.request(("time", name), settle_s=0.2)
            if not isinstance(result, tuple):
                times[label].append(result)
    return times


def flops_per_step(case: str, counts: dict, batch: int) -> float | None:
    """GFLOP per train step of `case` at `batch` from `counts` {config module: per image}."""
    per_image = counts.get(CASES[case][0])
    return per_image * batch if per_image else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu_vs_pytorch")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--compiled_cases", default="cifar10_bf16_b128,cifar10_bf16_b256,"
                        "celeba64_bf16_b128", help="cases timed under torch.compile too")
    parser.add_argument("--compile_mode", default="default",
                        help="torch.compile mode (default, max-autotune, reduce-overhead)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", default="cifar10_bf16_b128")
    parser.add_argument("--steps", type=int, default=8, help="train steps per timed unit")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warm_deadline_s", type=float, default=300.0,
                        help="seconds from the start for every compiler to finish (the "
                             "eager side gets 60 more)")
    parser.add_argument("--inductor_threads", type=int, default=4,
                        help="torch.compile's compile threads per compiled case")
    parser.add_argument("--flops", default="{}", help="JSON {config module: GFLOP per image}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny nets and batches, PyTorch on the CPU: tries the script")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    cases, compiled = split(args.cases), split(args.compiled_cases)
    variants = {name: VARIANTS[name] for name in split(args.variants)}
    for name in cases + compiled:
        if name not in CASES:
            parser.error(f"unknown case {name}; choose from {','.join(CASES)}")
    base = dict(seed=args.seed, steps=args.steps, compile=None, smoke=args.smoke)
    jax_cases = {name: (name, {}) for name in cases} | variants
    began = time.monotonic()
    deadline = began + args.warm_deadline_s
    # One compiler at a time: XLA's (whose autotuner times kernels on the GPU), then
    # torch.compile's, one process per case with `--inductor_threads` threads each, then
    # the eager side (cuDNN's autotuner).
    sides = {"jax": start(base | {"side": "jax", "cases": jax_cases}, JAX_ENV)}
    warm = wait_warm(sides, deadline)
    inductor = {"TORCHINDUCTOR_COMPILE_THREADS": str(args.inductor_threads)}
    compiled_sides = {f"compiled:{name}": start(
        base | {"side": "torch", "compile": args.compile_mode, "cases": {name: (name, {})}},
        inductor) for name in compiled}
    sides |= compiled_sides
    warm |= wait_warm(compiled_sides, deadline)
    sides["eager"] = start(base | {"side": "torch", "cases": {n: (n, {}) for n in cases}})
    warm |= wait_warm({"eager": sides["eager"]}, deadline + 60)
    counts = {k: side.parameter_count for k, side in sides.items()}
    print("parameters:", counts, "warm after", round(time.monotonic() - began), "s", flush=True)
    ready = {k for k, w in warm.items() if "failed" not in w}

    gflop = {module: value for module, value in json.loads(args.flops).items()}
    peak = sides["jax"].request(("peak",)) if "jax" in ready else None
    rows = []
    for name in cases:
        entrants = [(k, sides[k], name) for k in ("jax", "eager", f"compiled:{name}")
                    if k in ready]
        times = timed(entrants, args.repeats)
        medians = {k.split(":")[0]: statistics.median(t) for k, t in times.items() if t}
        module, dtype, _ = CASES[name]
        batch = case_config(name, smoke=args.smoke).batch_size
        flops = flops_per_step(name, gflop, batch)
        row = {"case": name, "config": module, "dtype": dtype, "batch": batch}
        for side in ("jax", "eager", "compiled"):
            seconds = medians.get(side)
            row[f"{side}_ms"] = seconds * 1e3 if seconds else None
            row[f"{side}_img_s"] = batch / seconds if seconds else None
        for side in ("eager", "compiled"):
            if medians.get(side) and medians.get("jax"):
                row[f"jax_vs_{side}"] = medians[side] / medians["jax"]
        if flops and peak and medians.get("jax") and not isinstance(peak, tuple):
            row["jax_mfu"] = flops * 1e9 / medians["jax"] / (peak * 1e12)
        row["spread"] = {k: (max(t) - min(t)) / statistics.median(t) for k, t in times.items()
                         if t}
        rows.append(row)
        print(row, flush=True)
    variant_rows = []
    for name, (case, overrides) in variants.items():
        if "jax" not in ready or name not in warm["jax"].get("first_call_s", {}):
            continue
        times = timed([("default", sides["jax"], case), (name, sides["jax"], name)],
                      args.repeats)
        default, variant = (statistics.median(times[k]) for k in ("default", name))
        variant_rows.append({"variant": name, "case": case, "overrides": overrides,
                             "default_ms": default * 1e3, "variant_ms": variant * 1e3,
                             "speedup": default / variant})
        print(variant_rows[-1], flush=True)
    profiles = {}
    for name in split(args.profile):
        if "jax" in ready:
            directory = Path(tempfile.gettempdir()) / "ddpm_jax_traces" / name
            shutil.rmtree(directory, ignore_errors=True)
            profiles[name] = sides["jax"].request(("profile", name, str(directory)))
            (out / f"profile_{name}.json").write_text(json.dumps(profiles[name], indent=1))
            for trace in directory.glob("plugins/profile/*/perfetto_trace.json.gz"):
                shutil.copy(trace, out / f"trace_{name}.json.gz")
            print("profile", name, json.dumps(profiles[name])[:3000], flush=True)
    for side in sides.values():
        side.close()
    result = {"warm": warm, "parameters": counts, "peak_bf16_tflop_s": peak,
              "variants": variant_rows, "profiles": profiles,
              "environment": {k: os.environ.get(k) for k in ("XLA_FLAGS",)}}
    (out / "extra.json").write_text(json.dumps(result, indent=1, default=str))
    if variant_rows:
        report("ddpm-jax speed options (same process, alternating)", variant_rows, None)
    if rows:
        report("ddpm-jax vs PyTorch (diffusers UNet2DModel) train step on one GPU",
               [{k: v for k, v in row.items() if k != "spread"} for row in rows],
               str(out / "gpu_vs_pytorch.json"))


if __name__ == "__main__":
    main()
