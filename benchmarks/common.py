"""Shared helpers for benchmark scripts: timing, machine description, table + JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time in seconds of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, object]:
    """What ran the benchmark: backend, devices, host CPU count, library versions, date."""
    return {
        "date": datetime.date.today().isoformat(),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def report(name: str, rows: list[dict[str, object]], output: str | None) -> None:
    """Prints rows as an aligned table and writes {machine, rows} as JSON to `output`."""
    columns = list(rows[0])
    cells = [[_fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{name}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if output:
        with open(output, "w") as f:
            json.dump({"benchmark": name, "machine": machine(), "rows": rows}, f, indent=2)
        print(f"wrote {output}")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

