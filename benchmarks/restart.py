"""Restart to first step: how long a restarted run takes before it trains, with the persistent
compilation cache cold (empty) and warm (filled by the run before).

Each case starts `python -m ddpm_jax.main` on `--config` (default the CIFAR-10 net) in a fresh
process on the offline bundled images, and measures the time from the start of the process
to the log line of the first train step. Cases: "no cache" (`compilation_cache_dir=""`),
"cold" (an empty cache folder) and "warm" (the same folder again, a new workdir). Prints a
table and writes JSON:

    python -m benchmarks.restart --json=restart.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = "[1] "  # clu's logging writer's line of step 1's scalars (shown at --verbosity=1)


def time_to_first_step(config: str, workdir: str, cache_dir: str, extra: list[str]) -> float:
    """Seconds from starting the command to its first train step's log line."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env = {k: v for k, v in env.items() if v != ""}
    argv = [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}",
            f"--config.compilation_cache_dir={cache_dir}", "--config.log_every_steps=1",
            "--config.num_train_steps=1", "--config.data.source=bundled",
            "--config.sample_every_steps=1000000", "--config.save_every_steps=1000000",
            "--config.sample.num_images=1", "--config.sample.num_steps=1",
            "--config.check_memory=False", "--verbosity=1", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seconds = None
    for line in proc.stderr:
        if seconds is None and FIRST_STEP in line and "loss=" in line:
            seconds = time.perf_counter() - start
    if proc.wait() != 0 or seconds is None:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode})")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10.py")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    extra = [f"--config.batch_size={args.batch_size}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for case, cache_dir in (("no cache", ""), ("cold", cache), ("warm", cache)):
            seconds = time_to_first_step(args.config, os.path.join(tmp, case.replace(" ", "_")),
                                         cache_dir, extra)
            rows.append({"case": case, "seconds_to_first_step": seconds})
    baseline = rows[0]["seconds_to_first_step"]
    print(f"{'case':<10} {'s to first step':>16} {'vs no cache':>12}")
    for row in rows:
        row["ratio_to_no_cache"] = row["seconds_to_first_step"] / baseline
        print(f"{row['case']:<10} {row['seconds_to_first_step']:>16.1f} "
              f"{row['ratio_to_no_cache']:>11.2f}x")
    result = {"machine": common.machine(), "config": args.config, "batch_size": args.batch_size,
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
