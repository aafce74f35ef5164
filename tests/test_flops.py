"""The step's FLOP count, the devices' peaks, and model TFLOP/s and MFU in TensorBoard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import train
from ddpm_jax.runtime import compiled_step, flops
from ddpm_jax.train import events
from ddpm_jax.train.config_checks import ConfigError
from tests.helpers import micro_config, read_scalars


def test_a_matmul_step_counts_its_multiply_adds_wherever_its_inputs_live():
    """2 m n k for [m, k] x [k, n], for inputs sharded over the devices as for ones on none:
    the count is of the whole program before it is split."""
    m, k, n = 64, 48, 40
    mesh = train.create_mesh(micro_config())
    a = jax.device_put(jnp.ones((m, k)), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh.axis_names[0])))
    b = jnp.ones((k, n))
    expected = 2 * m * n * k
    assert flops.step_flops(lambda x, y: x @ y, a, b) == pytest.approx(expected, rel=1e-9)
    abstract = (jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
    assert flops.step_flops(lambda x, y: x @ y, *abstract) == pytest.approx(expected, rel=1e-9)


def test_the_model_count_is_the_sharded_direct_steps_and_winograd_executes_fewer():
    """The count equals the cost analysis of the step as training lowers it (sharded over
    the mesh, direct convolutions, no chunks), whichever algorithm the run uses."""
    config = micro_config()
    config.batch_size, config.model.base_channels = 8, 32  # 8x8 maps, 32 channels: F(2x2)
    mesh = train.create_mesh(config)
    assert mesh.devices.size > 1
    reference = config.copy_and_resolve_references()
    reference.conv_algorithm, reference.compute_chunk_size = "direct", -1
    lowered = train.make_train_step(reference, mesh).lower(
        train.abstract_train_state(reference, mesh), compiled_step.abstract_batch(reference, mesh))
    counted = train.model_flops_per_step(config, mesh)
    assert counted == pytest.approx(float(lowered.cost_analysis()["flops"]), rel=1e-9)
    config.conv_algorithm = "winograd"
    assert train.model_flops_per_step(config, mesh) == counted
    assert train.model_flops_per_step(config, mesh, "winograd") < counted


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
    ("TPU v5p", 459.0), ("TPU v6 lite", 918.0), ("TPU v3", 61.5),
    ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peaks_by_device_kind_take_the_first_specific_match(kind, tflops):
    peak = flops.peak_flops_per_device(kind)
    assert peak == (None if tflops is None else tflops * 1e12)
    assert flops.peak_flops_per_device(kind, override_tflops=2.5) == 2.5e12


def test_an_unknown_peak_gives_tflops_and_no_mfu():
    performance = events.Performance(step_flops=6e12, device_count=4, peak_flops=None)
    assert performance.scalars(2.0) == {"model_tflops_per_device": 3.0}
    performance = events.Performance(step_flops=6e12, device_count=4, peak_flops=10e12)
    assert performance.scalars(2.0) == {"model_tflops_per_device": 3.0, "mfu": 0.3}


@pytest.mark.slow
def test_training_logs_model_tflops_per_device_and_mfu(tmp_path):
    """Each log point's TFLOP/s is the counted FLOPs x its steps/s over the devices, and MFU
    that over the configured peak; a bad peak is refused before any work."""
    config = micro_config()
    config.log_model_flops, config.peak_tflops_per_device = True, 0.001
    config.sample_every_steps = 0
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    step_flops = train.model_flops_per_step(config, train.create_mesh(config))
    steps_per_sec = dict(read_scalars(workdir, "steps_per_sec"))
    achieved = dict(read_scalars(workdir, "model_tflops_per_device"))
    mfu = dict(read_scalars(workdir, "mfu"))
    assert sorted(achieved) == sorted(mfu) == sorted(steps_per_sec) == [2, 4]
    for step, rate in steps_per_sec.items():
        expected = step_flops * rate / jax.device_count() / 1e12
        np.testing.assert_allclose(achieved[step], expected, rtol=1e-6)
        np.testing.assert_allclose(mfu[step], expected / 0.001, rtol=1e-6)

    config.peak_tflops_per_device = -1.0
    with pytest.raises(ConfigError, match="peak_tflops_per_device"):
        train.train_and_evaluate(config, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
