"""A step's result does not depend on how its work is cut: devices, chunks, steps per call,
micro-batches. Every example draws its own timestep, noise, dropout masks and (class-
conditional nets) label dropout."""

import jax
import numpy as np
import pytest

from ddpm_jax import train
from ddpm_jax.runtime import network
from tests.helpers import micro_config

STEPS = 4


def run(config, devices, steps_per_call=1):
    """STEPS train steps from the same perturbed initial weights; the final state."""
    mesh = train.create_mesh(config, devices=devices)
    state = train.create_train_state(config, mesh)
    state = state.replace(params=network.perturbed(state.params, 0.05))
    rng = np.random.default_rng(0)
    data = [{"image": rng.integers(0, 256, (config.batch_size, 8, 8, 3), dtype=np.uint8),
             "label": rng.integers(0, config.model.num_classes, config.batch_size, dtype=np.int32)}
            for _ in range(STEPS)]
    step_fn = train.make_train_step(config, mesh, steps_per_call)
    for start in range(0, STEPS, steps_per_call):
        batches = data[start:start + steps_per_call]
        if steps_per_call == 1:
            state, _ = step_fn(state, train.global_batch(batches[0], mesh))
        else:
            state, _ = step_fn(state, train.global_batches(batches, mesh))
    return jax.device_get(state)


def assert_params_close(got, want):
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_same_parameters_whatever_the_chunks_steps_per_call_and_micro_batches():
    config = micro_config()
    config.model.dropout = 0.3  # dropout on: its masks must not depend on the cut either
    config.model.num_classes, config.data.label = 3, "subfolder"  # labels, half of them dropped
    config.label_dropout = 0.5
    config.learning_rate, config.warmup_steps = 1e-4, 0
    one_device = jax.devices()[:1]  # all 8 examples on one device, so every chunk size splits
    config.compute_chunk_size, config.grad_accum_steps = -1, 1
    reference = run(config, one_device)
    # Chunks of 2 inside 2 micro-batches of 4, 4 steps per call: all three cuts at once.
    config.compute_chunk_size, config.grad_accum_steps = 2, 2
    assert_params_close(run(config, one_device, 4), reference)
    # Four devices (two examples each) with FSDP: the same parameters as one device.
    config.compute_chunk_size, config.grad_accum_steps = -1, 1
    config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 64
    assert_params_close(run(config, jax.devices()), reference)
    # The comparison sees label dropout: without it the parameters differ. (That dropout's
    # masks are per example: test_unet.py.)
    config.mesh.fsdp, config.label_dropout = 1, 0.0
    without_dropout = run(config, one_device)
    assert not all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(
        jax.tree.leaves(without_dropout.params), jax.tree.leaves(reference.params), strict=True))


def test_example_randomness_is_per_example():
    """Example i's timestep, noise and dropout key depend on i and the step key only."""
    rng = jax.random.PRNGKey(3)
    t8, noise8, keys8 = train.example_randomness(rng, (8, 4, 4, 3), 1000)
    t2, noise2, keys2 = train.example_randomness(rng, (2, 4, 4, 3), 1000)
    np.testing.assert_array_equal(t8[:2], t2)
    np.testing.assert_array_equal(noise8[:2], noise2)
    np.testing.assert_array_equal(keys8[:2], keys2)
    assert len(set(np.asarray(t8).tolist())) > 1 and not np.allclose(noise8[0], noise8[1])
    assert 0.7 < float(np.std(train.example_randomness(rng, (64, 8, 8, 3), 10)[1])) < 1.3
