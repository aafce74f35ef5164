"""Scaling features give the same training as the plain data-parallel step."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import ops, train
from tests.helpers import (
    MICRO_FLAGS,
    ROOT,
    command_env,
    micro_config,
    quickstart_config,
    restore_micro_run,
    run_train_steps,
)


def batches(config, count=2):
    rng = np.random.default_rng(0)
    size = config.data.image_size
    return [rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
            for _ in range(count)]


def train_steps(config, data, devices=None):
    state, losses = run_train_steps(config, train.create_mesh(config, devices), data)
    return jax.tree.map(np.asarray, state), losses


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fsdp", [4])  # 2 against one device: tests/test_invariance.py
@pytest.mark.slow
def test_fsdp_matches_data_parallel(fsdp):
    config = micro_config()
    config.model.dropout = 0.1
    data = batches(config)
    reference, ref_losses = train_steps(config, data)
    config.mesh.fsdp, config.mesh.fsdp_min_size = fsdp, 64
    mesh = train.create_mesh(config)
    kernel_spec = train.train_state_shardings(config, mesh).params["conv_in"]["kernel"].spec
    assert "fsdp" in kernel_spec  # the state really is split
    sharded, losses = train_steps(config, data)
    # Same math; only the order of floating-point reductions differs.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert_states_close(reference, sharded)


@pytest.mark.slow
def test_cpu_speed_settings_keep_the_loss():
    """The CPU compile options change speed, not results (fixed seed; chunks, steps per call
    and micro-batches: tests/test_invariance.py)."""
    config = micro_config()
    config.batch_size = 16  # 4 per device
    data = batches(config)
    config.cpu_conv_library, config.compute_chunk_size = "default", -1
    reference, ref_losses = train_steps(config, data)
    config.cpu_conv_library, config.compute_chunk_size = "eigen", 2
    state, losses = train_steps(config, data)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_states_close(reference, state)
    assert ops.compute_chunks(config, 4) == 2 and ops.compute_chunks(config, 2) == 1
    config.compute_chunk_size = 0  # automatic: chunks of at most CPU_CHUNK_SIZE on this CPU
    size = ops.dispatch.CPU_CHUNK_SIZE
    assert ops.compute_chunks(config, size) == 1
    assert ops.compute_chunks(config, 2 * size) == 2
    assert ops.compute_chunks(config, 3 * size) == 3


@pytest.mark.tied_to_jaxlib  # reads XLA:CPU's compiled HLO text, whose format jaxlib may change
@pytest.mark.slow
def test_cpu_conv_library_setting_reaches_the_compiler():
    config = micro_config()
    config.model.base_channels, config.model.norm_groups = 32, 8  # big enough for YNNPACK
    mesh = train.create_mesh(config)
    state = jax.eval_shape(lambda: train.create_train_state(config, mesh))
    batch = jax.ShapeDtypeStruct((8, 8, 8, 3), np.uint8)

    compiled_text = {}  # library -> the compiled step's HLO: one compile each

    def library_fusions_with(library, op, without=None):
        """How many YNNPACK fusions contain `op` (and not `without`)."""
        if library not in compiled_text:
            config.cpu_conv_library = library
            compiled_text[library] = train.make_train_step(config, mesh).lower(
                state, batch).compile().as_text()
        hlo = compiled_text[library]
        called = set(re.findall(r"calls=%?([\w.\-]+), [^\n]*__ynn_fusion", hlo))
        bodies = [body for name, body in re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}",
                                                    hlo, re.S) if name in called]
        return sum(f" {op}(" in body and not (without and f" {without}(" in body)
                   for body in bodies)

    if ops.compiler_options(config) is None:
        pytest.fail("this jaxlib rejects the CPU compile options; update ddpm_jax/ops/xla.py")
    assert library_fusions_with("default", "convolution") > 0
    assert library_fusions_with("default", "dot", without="reduce") > 0
    assert library_fusions_with("eigen", "convolution") == 0
    # Products go to XLA's kernels; a reduction fusion may still take in the product that
    # feeds it (attention's scores and softmax, on newer jaxlibs).
    assert library_fusions_with("eigen", "dot", without="reduce") == 0
    assert library_fusions_with("eigen", "reduce") > 0  # reductions stay in the library


@pytest.mark.slow
def test_remat_changes_nothing():
    config = micro_config()
    config.model.dropout = 0.1
    data = batches(config)
    reference, _ = train_steps(config, data, jax.devices()[:1])
    config.model.remat = True
    rematerialised, _ = train_steps(config, data, jax.devices()[:1])
    assert_states_close(reference, rematerialised, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_training_reaches_the_float32_loss():
    config = micro_config()
    config.learning_rate = 2e-3
    data = batches(config, 1) * 40  # one batch, learned by heart: a stable loss to compare
    _, fp32 = train_steps(config, data, jax.devices()[:1])
    config.model.dtype = "bfloat16"
    _, bf16 = train_steps(config, data, jax.devices()[:1])
    assert np.mean(bf16[-10:]) == pytest.approx(np.mean(fp32[-10:]), rel=0.05)
    assert np.mean(bf16[-10:]) < 0.7 * bf16[0]  # and it did learn


def run_processes(workdir, num_processes, devices_per_process, *flags):
    # The processes compile through the test run's cache (conftest.py), which they inherit.
    # launch/local.sh adds its virtual devices to XLA_FLAGS; this interpreter, venv or not
    env = command_env(PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", "launch/local.sh", str(num_processes), str(devices_per_process), "--",
         "--config=configs/quickstart.py", f"--workdir={workdir}", *MICRO_FLAGS, *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path, caplog):
    # All three steps in one call: each process stacks its slices of three batches.
    in_one_call = ("--config.log_every_steps=3", "--config.steps_per_dispatch=3",
                   "--config.sample_every_steps=0")  # no sample grids: not tested here
    result = run_processes(tmp_path / "two", 2, 2, *in_one_call)
    assert "3 train steps per call" in result.stderr
    # One process with this test's 4 devices: the same run in-process.
    with caplog.at_level("INFO"):
        train.train_and_evaluate(quickstart_config([*MICRO_FLAGS, *in_one_call]),
                                 str(tmp_path / "one"))
    assert "3 train steps per call" in caplog.text
    # Same global batches (each process reads its slice; the union is the 1-process batch)
    # and the same rng stream; gloo's all-reduce may add in another order than XLA's.
    assert_states_close(restore_micro_run(tmp_path / "one", 3),
                        restore_micro_run(tmp_path / "two", 3))
    # The 2-process checkpoint restores in a 1-process run on another mesh (this process's
    # 4 devices), and goes on.
    config = micro_config()
    config.num_train_steps, config.sample_every_steps, config.save_every_steps = 4, 0, 4
    caplog.clear()
    with caplog.at_level("INFO"):
        state = train.train_and_evaluate(config, str(tmp_path / "two"))
    assert "starting at step 3 of 4" in caplog.text
    assert int(state.step) == 4 and restore_micro_run(tmp_path / "two", 4).step == 4
