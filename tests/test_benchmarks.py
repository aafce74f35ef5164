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
def test_train_throughput_counts_flops_in_a_cpu_child_as_in_process(tmp_path):
    """Where a backend analyses only the compiled step (the GPU's leaves out cuDNN's
    convolutions), `train_throughput.py` counts FLOPs in a CPU-only child process with as
    many devices: its figures must be this process's count of the same step, the network's
    (direct convolutions) and Winograd's (fewer), and utilisation must follow from them."""
    output = tmp_path / "throughput.json"
    subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", *TINY_FLAGS, "--count_flops_on=cpu",
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
