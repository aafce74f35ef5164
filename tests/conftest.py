"""Test setup: 4 virtual CPU devices (set before JAX starts) and tiny configs."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Tests build the same tiny programs many times (each run of the loop re-jits its step, and
# the command-line tests start `ddpm_jax.main` again to resume): one persistent compilation
# cache for the whole run compiles each only once. It is passed on in the environment, so
# pytest-xdist's workers (started after this file is loaded) and the programs tests start
# share it; the process that made it removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="ddpm_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from configs import quickstart  # noqa: E402


def tiny_config():
    """The quickstart config shrunk to a 16x16 net that compiles and steps in seconds."""
    config = quickstart.get_config()
    config.num_train_steps = 4
    config.batch_size = 8
    config.warmup_steps = 2
    config.log_every_steps = 2
    config.sample_every_steps = 2
    config.save_every_steps = 2
    config.data.image_size = 16
    config.model.base_channels = 16
    config.model.channel_mults = (1, 2)
    config.model.attention_resolutions = (8,)
    config.model.norm_groups = 4
    config.sample.num_images = 4
    config.sample.num_steps = 5
    return config


def micro_config():
    """The smallest net with every block type (res, attention, no resampling): compiles fastest.

    For tests of the step's bookkeeping (sharding, accumulation, dtype, resume), where the
    network's depth plays no part.
    """
    config = tiny_config()
    config.data.image_size = 8
    config.model.base_channels = 8
    config.model.channel_mults = (1,)
    config.model.attention_resolutions = (8,)
    config.sample.num_images = 4
    return config


MICRO_FLAGS = [
    "--config.num_train_steps=3", "--config.batch_size=8", "--config.log_every_steps=1",
    "--config.sample_every_steps=3", "--config.save_every_steps=3", "--config.data.image_size=8",
    "--config.model.base_channels=8", "--config.model.channel_mults=(1,)",
    "--config.model.attention_resolutions=(8,)", "--config.model.norm_groups=4",
    "--config.sample.num_images=4", "--config.sample.num_steps=3",
]


def run_train_steps(config, mesh, batches, weight_noise=0.0):
    """Fresh state, then one jitted train step per uint8 batch; returns (state, losses).

    `weight_noise` > 0 adds N(0, weight_noise^2) noise (fixed seed) to the initial weights,
    so the zero-initialised output layers do not hide the rest of the network from the loss.
    """
    from benchmarks.common import with_random_weights
    from ddpm_jax import train

    state = train.create_train_state(config, mesh)
    if weight_noise:
        state = with_random_weights(state, weight_noise)
    step_fn = train.make_train_step(config, mesh)
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, train.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture
def config():
    return tiny_config()
