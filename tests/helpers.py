"""Shared test helpers: tiny configs, a few train steps, TensorBoard events, the repo root."""

from __future__ import annotations

import glob
import os
import re

from configs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite compiles a few hundred tiny programs and runs each for a few steps, so compile
# time is most of its cost: LLVM's optimisations of the generated code cost more than they
# save, and so do XLA:CPU's per-fusion MLIR emitters (the older elemental emitter generates
# the same operations) and splitting each program for parallel codegen (the tests already
# keep every core busy). XLA's own (HLO) passes still run: the same programs, the same
# behaviour. Commands the tests start get the same flags (`command_env`); benchmarks and users
# compile with the defaults.
BASE_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
# Flags that only some jaxlib releases know; XLA aborts the process on an unknown one.
OPTIONAL_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                          "--xla_cpu_parallel_codegen_split_count=1")
_COMPILE_FLAGS_VARIABLE = "DDPM_JAX_TEST_COMPILE_FLAGS"  # probed once, shared with xdist workers


def _xla_accepts(flags: str) -> bool:
    """Whether a CPU backend starts with `flags` in XLA_FLAGS (probed in a child process)."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                           capture_output=True, timeout=120)
    return probe.returncode == 0


def compile_flags() -> str:
    """The tests' XLA compile flags: the base ones plus each optional one this jaxlib knows."""
    if _COMPILE_FLAGS_VARIABLE not in os.environ:
        flags = [BASE_COMPILE_FLAGS]
        if _xla_accepts(" ".join(OPTIONAL_COMPILE_FLAGS)):
            flags += OPTIONAL_COMPILE_FLAGS
        else:
            flags += [flag for flag in OPTIONAL_COMPILE_FLAGS if _xla_accepts(flag)]
        os.environ[_COMPILE_FLAGS_VARIABLE] = " ".join(flags)
    return os.environ[_COMPILE_FLAGS_VARIABLE]


# absl's line prefix: level, date, time, thread, file:line
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ")
OWN_FILES = {os.path.basename(path)
             for path in glob.glob(os.path.join(ROOT, "ddpm_jax", "**", "*.py"), recursive=True)}


def library_info_lines(stderr):
    """A command's INFO lines from code outside ddpm_jax, and C++ start-up lines (I0000 ...):
    what a quiet command must not print."""
    found = []
    for line in stderr.splitlines():
        match = ABSL_LINE.match(line)
        if line.startswith("I0000") or (match and match[1] == "I" and match[2] not in OWN_FILES):
            found.append(line)
    return found


def warning_lines(stderr):
    """absl WARNING and ERROR lines of a command's stderr."""
    return [line for line in stderr.splitlines()
            if ABSL_LINE.match(line) and ABSL_LINE.match(line)[1] != "I"]


def command_env(**variables: str) -> dict[str, str]:
    """The environment of a command a test starts as a user would: the CPU, one device (no
    virtual devices), the tests' compile flags and compilation cache, plus `variables`."""
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS=compile_flags(), **variables)


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
    config.diffusion.prediction = "eps"  # the tests' closed forms are written for eps
    config.log_model_flops = False  # seconds per run; tests/test_flops.py turns it on
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
    "--config.diffusion.prediction=eps",  # as micro_config
]


def quickstart_config(flags):
    """configs/quickstart.py with `--config.FIELD=VALUE` flags applied, as the command line
    would: the in-process twin of a command run with those flags."""
    import ast

    config = quickstart.get_config()
    for flag in flags:
        name, value = flag[len("--config."):].split("=", 1)
        *parents, leaf = name.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        try:
            section[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a bare string
            section[leaf] = value
    return config


def restore_micro_run(workdir, step, config=None):
    """The state (NumPy) that a run of `config` (default `micro_config()`) saved at `step` in
    `workdir`, which must be its newest checkpoint; restored on one device."""
    import jax
    import numpy as np
    from etils import epath

    from ddpm_jax import checkpointing, train

    config = config or micro_config()
    manager = checkpointing.make_manager(epath.Path(workdir) / "checkpoints", config)
    assert manager.latest_step() == step
    mesh = train.create_mesh(config, jax.devices()[:1])
    state = checkpointing.restore_step(manager, step, train.abstract_train_state(config, mesh))
    manager.close()
    return jax.tree.map(np.asarray, state)


def check_resume_is_exact(config, root):
    """Trains `config` for 4 steps straight (ROOT/straight) and as 2 + 2 with a resume
    (ROOT/split), and checks that both end in bitwise the same state."""
    import jax
    import numpy as np

    from ddpm_jax import train

    config.num_train_steps = 4
    straight = train.train_and_evaluate(config, str(root / "straight"))
    config.num_train_steps = 2
    train.train_and_evaluate(config, str(root / "split"))
    config.num_train_steps = 4
    resumed = train.train_and_evaluate(config, str(root / "split"))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run_train_steps(config, mesh, batches, weight_noise=0.0, metric="loss"):
    """Fresh state, then one jitted train step per uint8 batch; returns (state, the `metric`
    of each step).

    `weight_noise` > 0 adds N(0, weight_noise^2) noise (fixed seed) to the initial weights,
    so the zero-initialised output layers do not hide the rest of the network from the loss.
    """
    from ddpm_jax import train
    from ddpm_jax.runtime import network

    state = train.create_train_state(config, mesh)
    if weight_noise:
        state = state.replace(params=network.perturbed(state.params, weight_noise))
    step_fn = train.make_train_step(config, mesh)
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, train.global_batch(batch, mesh))
        losses.append(float(metrics[metric]))
    return state, losses


def event_accumulator(logdir):
    """TensorBoard's own reader of the event files in `logdir`, loaded with everything in
    them. It reads through TensorBoard's TensorFlow-free file layer, as on a machine without
    TensorFlow (where TensorFlow is installed TensorBoard would import it, seconds)."""
    import sys
    import types

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator as accumulator

    reader = accumulator.EventAccumulator(str(logdir), size_guidance={accumulator.TENSORS: 0})
    reader.Reload()
    return reader


def read_events(workdir):
    """Tag -> sorted steps, from the TensorBoard event files in workdir."""
    reader = event_accumulator(workdir)
    return {tag: sorted(event.step for event in reader.Tensors(tag))
            for tag in reader.Tags()["tensors"]}


def read_scalars(workdir, tag):
    """(step, value) of one scalar tag in the TensorBoard event files in workdir."""
    from tensorboard.util import tensor_util

    reader = event_accumulator(workdir)
    if tag not in reader.Tags()["tensors"]:
        return []
    return sorted((event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
                  for event in reader.Tensors(tag))


class _WithoutTensorFlow:
    """An import finder that finds what another finds, except TensorFlow."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return self.finder.find_spec(name, path, target)


def without_tensorflow(monkeypatch):
    """For the test, the process is as if TensorFlow were not installed: `import tensorflow`
    fails and `importlib.util.find_spec("tensorflow")` is None."""
    import sys

    from etils.epath import gpath

    for name in [name for name in sys.modules if name.partition(".")[0] == "tensorflow"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_WithoutTensorFlow(finder) for finder in sys.meta_path])
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # cached by etils
