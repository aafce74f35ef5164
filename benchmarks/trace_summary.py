"""Where a `jax.profiler` trace's time goes: per device stream and per kernel name.

    python -m benchmarks.trace_summary TRACE_DIR [--steps=N]

Reads the Perfetto JSON that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes
(`dir/plugins/profile/*/perfetto_trace.json.gz`). For each process of the trace (the host,
each device) it sums the complete events per name; for devices it also gives the span
from the first event to the last, the time some event was running (the union of their
intervals) and the idle rest, per train step when `steps` is given. A GPU whose span per
step is far above its busy time waits on the host: launches, or a copy the host waits for.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def load(directory: str | Path) -> list[dict]:
    """The trace events of the newest Perfetto trace under `directory`."""
    paths = sorted(Path(directory).glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no plugins/profile/*/perfetto_trace.json.gz under {directory}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for low, high in sorted(intervals):
        if high <= end:
            continue
        total += high - max(low, end)
        end = high
    return total


def summarise(directory: str | Path, steps: int = 1, top: int = 25) -> dict:
    """Per process: events, summed time per name (the `top` largest), and for devices the
    span, busy and idle time; times in microseconds, per step where `steps` > 1."""
    events = load(directory)
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_process: dict[int, list[dict]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_process[e["pid"]].append(e)
    summary = {"steps": steps, "processes": []}
    for pid, items in sorted(by_process.items()):
        name = names.get(pid, str(pid))
        per_name = collections.defaultdict(lambda: [0, 0.0])
        per_thread = collections.defaultdict(lambda: [0, 0.0])
        for e in items:
            per_name[e["name"]][0] += 1
            per_name[e["name"]][1] += e["dur"]
            thread = threads.get((pid, e.get("tid")), str(e.get("tid")))
            per_thread[thread][0] += 1
            per_thread[thread][1] += e["dur"]
        ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])
        entry = {
            "process": name, "events_per_step": len(items) / steps,
            "threads": {t: {"events_per_step": c / steps, "us_per_step": d / steps}
                        for t, (c, d) in sorted(per_thread.items(), key=lambda kv: -kv[1][1])},
            "top": [{"name": n[:160], "count_per_step": c / steps, "us_per_step": d / steps}
                    for n, (c, d) in ranked[:top]],
        }
        if "host" not in name.lower():
            intervals = [(e["ts"], e["ts"] + e["dur"]) for e in items]
            span = max(high for _, high in intervals) - min(low for low, _ in intervals)
            busy = busy_time(intervals)
            entry |= {"span_us_per_step": span / steps, "busy_us_per_step": busy / steps,
                      "idle_us_per_step": (span - busy) / steps}
        summary["processes"].append(entry)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(json.dumps(summarise(args.directory, args.steps, args.top), indent=1))


if __name__ == "__main__":
    main()
