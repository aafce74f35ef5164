"""The memory check's estimate against the measured peak of real runs.

Each case starts `python -m ddpm_jax.main` in a fresh process (the quickstart net on the
bundled images, one compiled call of training, then a sample grid and a checkpoint), reads
the estimate the memory check logs ("the process will peak at about ...") and the peak
resident memory the run logs at its end (its VmHWM). The estimate must never be below the
peak. Prints a table and writes JSON:

    python -m benchmarks.memory_estimate --batch_sizes=32,1024,4096 --output=memory.json
    python -m benchmarks.memory_estimate --batch_sizes=65536 --steps_per_dispatch=4 \
        --train_seconds=600 --output=memory_huge.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESTIMATE = re.compile(r"the process will peak at about ([\d.]+) (GiB|MiB) of host memory")


TRAINING = "starting at step"  # the log line after which the first train call runs
PEAK = re.compile(r"peak resident memory ([\d.]+) (GiB|MiB)")


def _bytes(match: re.Match) -> int:
    return int(float(match[1]) * (2**30 if match[2] == "GiB" else 2**20))


def _high_water_mark(pid: int) -> int | None:
    """VmHWM of a running process: its peak resident memory since it started its program (a
    parent's ru_maxrss of a child also counts the parent's memory, copied at the fork)."""
    from ddpm_jax.runtime import memory

    return memory.proc_bytes(f"/proc/{pid}/status", "VmHWM")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def estimate_and_peak(args: list[str], env: dict[str, str] | None = None,
                      train_seconds: float | None = None) -> tuple[int, int, str]:
    """(estimated peak bytes, measured peak resident bytes, stderr) of `ddpm_jax.main args`;
    RuntimeError when the command fails or logs no estimate.

    The peak is the one the run logs at its end (its own VmHWM). `train_seconds`: stop the
    run that long after training started (for batches whose steps take far longer than their
    first call takes to allocate); the peak is then its VmHWM just before the stop."""
    with tempfile.NamedTemporaryFile("w") as log:  # read through its name: our own offset
        process = subprocess.Popen([sys.executable, "-m", "ddpm_jax.main", *args], cwd=ROOT,
                                   env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        training_since, polled = None, None
        try:
            while process.poll() is None:
                time.sleep(0.5)
                if training_since is None and TRAINING in _read(log.name):
                    training_since = time.monotonic()
                if (train_seconds is not None and training_since is not None
                        and time.monotonic() - training_since > train_seconds):
                    polled = _high_water_mark(process.pid)
                    process.kill()
                    process.wait()
        except BaseException:
            process.kill()
            raise
        stderr = _read(log.name)
    if polled is None and process.returncode != 0:
        raise RuntimeError(f"the command failed ({process.returncode}):\n{stderr[-3000:]}")
    estimate, peak = ESTIMATE.search(stderr), PEAK.search(stderr)
    if estimate is None or (peak is None and polled is None):
        raise RuntimeError("the command logged no memory estimate or peak:\n" + stderr[-3000:])
    return _bytes(estimate), polled if polled is not None else _bytes(peak), stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--batch_sizes", default="32,1024,4096")
    parser.add_argument("--output", default=None, help="JSON file to write")
    parser.add_argument("--train_seconds", type=float, default=None,
                        help="stop each run this long after training started (huge batches)")
    parser.add_argument("--steps_per_dispatch", type=int, default=1)
    options, extra = parser.parse_known_args()

    from benchmarks import common

    rows = []
    for batch_size in [int(b) for b in options.batch_sizes.split(",")]:
        with tempfile.TemporaryDirectory() as workdir:
            # one call of steps, then the end: sample grid and checkpoint at the last step
            args = [f"--config={options.config}", f"--workdir={workdir}",
                    f"--config.batch_size={batch_size}",
                    f"--config.steps_per_dispatch={options.steps_per_dispatch}",
                    f"--config.num_train_steps={options.steps_per_dispatch}",
                    f"--config.log_every_steps={options.steps_per_dispatch}",
                    f"--config.sample_every_steps={options.steps_per_dispatch}",
                    f"--config.save_every_steps={options.steps_per_dispatch}", *extra]
            estimate, peak, _ = estimate_and_peak(args, train_seconds=options.train_seconds)
        rows.append({"batch_size": batch_size, "steps_per_call": options.steps_per_dispatch,
                     "stopped_after_s": options.train_seconds, "estimate_mib": estimate / 2**20,
                     "peak_rss_mib": peak / 2**20, "estimate_over_peak": estimate / peak,
                     "estimate_covers_peak": estimate >= peak})
        print(rows[-1], flush=True)
    common.report("memory check estimate vs measured peak (ddpm_jax.main)", rows, options.output)
    if not all(row["estimate_covers_peak"] for row in rows):
        sys.exit("the estimate fell below a measured peak")


if __name__ == "__main__":
    main()
