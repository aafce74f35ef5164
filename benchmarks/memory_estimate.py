"""The memory check's estimate against the measured peak of real runs.

Each case starts `python -m ddpm_jax.main` in a fresh process (the quickstart net on the
bundled images, one compiled call of training, then a sample grid and a checkpoint), reads
the estimate the memory check logs ("the process will peak at about ...") and measures the
process's peak resident memory (ru_maxrss of that child, from `os.wait4`). The estimate must
never be below the peak. Prints a table and writes JSON:

    python -m benchmarks.memory_estimate --batch_sizes=32,1024,4096 --output=memory.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESTIMATE = re.compile(r"the process will peak at about ([\d.]+) (GiB|MiB) of host memory")


def estimate_and_peak(args: list[str], env: dict[str, str] | None = None,
                      timeout: float = 1800) -> tuple[int, int, str]:
    """(estimated peak bytes, measured peak resident bytes, stderr) of `ddpm_jax.main args`;
    RuntimeError when the command fails or logs no estimate."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "ddpm_jax.main", *args], cwd=ROOT,
                                   env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            _, status, usage = os.wait4(process.pid, 0)  # the child's own peak, not the session's
        except BaseException:
            process.kill()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        stderr = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"the command failed ({process.returncode}):\n{stderr[-3000:]}")
    match = ESTIMATE.search(stderr)
    if match is None:
        raise RuntimeError("the command logged no memory estimate:\n" + stderr[-3000:])
    estimate = float(match[1]) * (2**30 if match[2] == "GiB" else 2**20)
    return int(estimate), usage.ru_maxrss * 1024, stderr  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--batch_sizes", default="32,1024,4096")
    parser.add_argument("--output", default=None, help="JSON file to write")
    options, extra = parser.parse_known_args()

    from benchmarks import common

    rows = []
    for batch_size in [int(b) for b in options.batch_sizes.split(",")]:
        with tempfile.TemporaryDirectory() as workdir:
            # one call of steps, then the end: sample grid and checkpoint at the last step
            args = [f"--config={options.config}", f"--workdir={workdir}",
                    f"--config.batch_size={batch_size}", "--config.steps_per_dispatch=1",
                    "--config.num_train_steps=1", "--config.log_every_steps=1",
                    "--config.sample_every_steps=1", "--config.save_every_steps=1", *extra]
            estimate, peak, _ = estimate_and_peak(args)
        rows.append({"batch_size": batch_size, "estimate_mib": estimate / 2**20,
                     "peak_rss_mib": peak / 2**20, "estimate_over_peak": estimate / peak,
                     "estimate_covers_peak": estimate >= peak})
        print(rows[-1], flush=True)
    common.report("memory check estimate vs measured peak (ddpm_jax.main)", rows, options.output)
    if not all(row["estimate_covers_peak"] for row in rows):
        sys.exit("the estimate fell below a measured peak")


if __name__ == "__main__":
    main()
