"""What an install costs before training starts: the size of each virtual environment, the
time to import a training run's modules and open its TensorBoard writer, and the wall time of a
one-step quickstart run with a warm compilation cache.

Each case is NAME=VENV:SOURCE, a virtual environment and the source tree installed in it (for
instance a clone at another commit); the first case is the baseline of the ratios. Measurements
alternate between the cases, each in a fresh process; medians are printed as a table and
written as JSON:

    python -m benchmarks.startup --case with_tf=/tmp/v_old:/tmp/old --case now=/tmp/v_new:. \
        --json=startup.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from benchmarks import common

# Imports what `ddpm_jax.main` loads and opens the run's writer, as training does first.
OPEN_WRITER = ("import sys; from etils import epath; from configs import quickstart; "
               "from ddpm_jax import main, metric_logs; "
               "metric_logs.open_writer(quickstart.get_config(), epath.Path(sys.argv[1]))")


def venv_megabytes(venv: str) -> float:
    """Bytes of the files under `venv` (links not followed), in MB."""
    total = 0
    for folder, _, files in os.walk(venv):
        for name in files:
            total += os.lstat(os.path.join(folder, name)).st_size
    return total / 1e6


def timed(argv: list[str], cwd: str) -> float:
    """Wall seconds of one command, which must succeed."""
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return seconds


def one_step_run(python: str, workdir: str) -> list[str]:
    """The quickstart for one step, no sample grid."""
    return [python, "-m", "ddpm_jax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
            "--config.num_train_steps=1", "--config.sample_every_steps=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", required=True, help="NAME=VENV:SOURCE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = []
    for case in args.case:
        name, _, where = case.partition("=")
        venv, _, source = where.partition(":")
        cases.append((name, os.path.abspath(venv), os.path.abspath(source)))
    times: dict[str, dict[str, list[float]]] = {name: {"imports": [], "run": []} for name, *_ in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for name, venv, source in cases:  # fills the compilation cache each run reads
            timed(one_step_run(f"{venv}/bin/python", f"{tmp}/warm_{name}"), source)
        for repeat in range(args.repeats):
            for name, venv, source in cases:
                python = f"{venv}/bin/python"
                times[name]["imports"].append(
                    timed([python, "-c", OPEN_WRITER, f"{tmp}/w_{name}_{repeat}"], source))
                times[name]["run"].append(
                    timed(one_step_run(python, f"{tmp}/r_{name}_{repeat}"), source))
    rows = []
    for name, venv, _ in cases:
        imports, runs = times[name]["imports"], times[name]["run"]
        rows.append({"case": name, "venv_mb": round(venv_megabytes(venv)),
                     "imports_s": statistics.median(imports),
                     "imports_range_s": f"{min(imports):.2f}-{max(imports):.2f}",
                     "run_s": statistics.median(runs), "run_range_s": f"{min(runs):.1f}-{max(runs):.1f}"})
    for row in rows:
        row["imports_vs_first"] = row["imports_s"] / rows[0]["imports_s"]
        row["run_vs_first"] = row["run_s"] / rows[0]["run_s"]
    common.report("start-up (medians of alternating fresh processes)", rows, args.json)


if __name__ == "__main__":
    main()
