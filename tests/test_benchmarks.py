"""The benchmarks' own arithmetic, where a wrong answer would pass unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddpm_jax import train
from tests.helpers import micro_config

ROOT = Path(__file__).resolve().parents[1]
# 8x8 maps with 32 channels: Winograd's F(2x2, 3x3) applies, so it executes fewer FLOPs.
TINY_FLAGS = [
    "--config=configs/quickstart.py", "--batch=8", "--config.data.image_size=8",
    "--config.model.base_channels=32", "--config.model.channel_mults=(1,)",
    "--config.model.attention_resolutions=(8,)", "--config.model.norm_groups=4",
    "--config.conv_algorithm=winograd", "--config.steps_per_dispatch=2",
    "--config.diffusion.prediction=eps",  # as micro_config, which the counts are compared with
]


def lowered_flops(config, algorithm: str) -> float:
    """FLOPs of one unchunked train step before optimisation, counted in this process."""
    config = config.copy_and_resolve_references()
    config.conv_algorithm, config.compute_chunk_size = algorithm, -1
    mesh = train.create_mesh(config)
    state = train.create_train_state(config, mesh)
    size = config.data.image_size
    batch = train.global_batch(np.zeros((config.batch_size, size, size, 3), np.uint8), mesh)
    return float(train.make_train_step(config, mesh).lower(state, batch).cost_analysis()["flops"])


@pytest.mark.slow
def test_train_throughput_counts_the_sharded_steps_flops_and_utilisation_follows(tmp_path):
    """`train_throughput.py`'s figures must be this process's count of the same step as
    training lowers it, sharded over 4 devices: the network's (direct convolutions) and
    Winograd's (fewer), and utilisation must follow from them."""
    output = tmp_path / "throughput.json"
    subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", *TINY_FLAGS,
         "--repeats=1", "--matmul_size=64", "--pipelined_calls=2", f"--output={output}"],
        cwd=ROOT, check=True, capture_output=True, timeout=300)
    (row,) = json.loads(output.read_text())["rows"]

    config = micro_config()
    config.batch_size, config.data.image_size = 8, 8
    config.model.base_channels, config.model.norm_groups = 32, 4
    network, executed = lowered_flops(config, "direct"), lowered_flops(config, "winograd")
    assert executed < network
    assert row["devices"] == 4 and row["steps_per_call"] == 2 and row["pipelined_calls"] == 2
    np.testing.assert_allclose(row["gflop_per_step"], network / 1e9, rtol=1e-9)
    np.testing.assert_allclose(row["executed_gflop_per_step"], executed / 1e9, rtol=1e-9)
    np.testing.assert_allclose(
        row["utilisation"], network / row["step_s"] / (row["peak_tflop_s"] * 1e12), rtol=1e-9)


def test_trace_summary_counts_busy_and_idle_device_time(tmp_path):
    """A hand-made Perfetto trace: two steps on one GPU stream, with overlapping kernels on
    a second stream; busy time is the union of the intervals, idle the rest of the span."""
    import gzip

    from benchmarks import trace_summary

    assert trace_summary.busy_time([(0, 4), (2, 6), (10, 11), (10.5, 10.7)]) == 7
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name",
               "args": {"name": "Stream #7(Compute)"}}]
    kernels = [(0, 10, "conv", 7), (5, 10, "fusion", 8), (30, 2, "fusion", 7),
               (50, 10, "conv", 7), (80, 20, "fusion", 7)]  # span 100, busy 15 + 2 + 10 + 20
    events += [{"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}
               for ts, dur, name, tid in kernels]
    events.append({"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 90, "name": "Execute"})
    trace = tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = trace_summary.summarise(tmp_path, steps=2)
    gpu, host = summary["processes"]
    assert gpu["process"] == "/device:GPU:0" and host["process"] == "/host:CPU"
    assert gpu["span_us_per_step"] == 50 and gpu["busy_us_per_step"] == 23.5
    assert gpu["idle_us_per_step"] == 26.5 and gpu["events_per_step"] == 2.5
    assert gpu["top"][0] == {"name": "fusion", "count_per_step": 1.5, "us_per_step": 16}
    assert gpu["threads"]["Stream #7(Compute)"]["events_per_step"] == 2
    assert "span_us_per_step" not in host and host["top"][0]["us_per_step"] == 45
