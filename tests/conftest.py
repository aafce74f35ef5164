"""Test setup: 4 virtual CPU devices and the tests' compile flags (set before JAX starts), one
compilation cache for the whole run, fewer garbage collections, tiny configs."""

import gc
import os

from tests.helpers import compile_flags  # noqa: E402

os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4 {compile_flags()}"
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

# Tracing and lowering create millions of short-lived objects, and at CPython's default
# thresholds (700, 10, 10) the cycle collector runs over a thousand times in a test that
# compiles a few train steps, walking the whole heap of JAX, Flax and TensorFlow objects. Collecting the young
# generation every 50,000 allocations frees the same cycles, far less often.
gc.set_threshold(50_000, 20, 100)

import pytest  # noqa: E402

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture
def config():
    return tiny_config()

