"""Crashes, preemption and numerical faults: nothing is lost and a rerun continues exactly."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from ddpm_jax import checkpointing, ema_snapshots, train
from ddpm_jax.train import config_checks
from tests.helpers import (
    MICRO_FLAGS,
    ROOT,
    command_env,
    micro_config,
    read_events,
    restore_micro_run,
)

STEPS = 8
FLAGS = [*MICRO_FLAGS, f"--config.num_train_steps={STEPS}", "--config.save_every_steps=2",
         "--config.sample_every_steps=0", "--config.keep_checkpoints=2",  # no grids: not tested here
         # power EMAs, snapshot with every checkpoint: their state and snapshots must survive too
         "--config.ema.kind=power"]


def start_main(workdir, cache_dir, *extra):
    env = command_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen(
        [sys.executable, "-m", "ddpm_jax.main", "--config=configs/quickstart.py",
         f"--workdir={workdir}", *FLAGS, *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def wait_for(condition, process, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_takes_over_and_gives_bitwise_identical_params(tmp_path):
    cache = tmp_path / "xla_cache"
    straight = tmp_path / "straight"
    proc = start_main(straight, cache)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]

    workdir = tmp_path / "killed"
    ckpt = workdir / "checkpoints"
    saving = lambda: ckpt.exists() and any("tmp" in p.name for p in ckpt.iterdir())  # noqa: E731
    has_step = lambda n: lambda: (ckpt / str(n)).exists()  # noqa: E731
    snapshots = workdir / "ema_snapshots"
    snapshotting = lambda: snapshots.exists() and any(  # noqa: E731
        "tmp" in p.name for p in snapshots.iterdir())
    kill_points = [("during a checkpoint save", saving),
                   ("during an EMA snapshot save", snapshotting),
                   ("during the save of step 6", lambda: has_step(4)() and saving())]
    killed_during = []
    for name, condition in kill_points:
        proc = start_main(workdir, cache)
        if wait_for(condition, proc):
            proc.send_signal(signal.SIGKILL)
            killed_during.append(name)
        proc.wait(timeout=300)
    print("killed", killed_during)
    assert "during a checkpoint save" in killed_during and len(killed_during) >= 2, killed_during
    # The rerun that finishes the job takes over the lock the killed run left (same host,
    # its pid gone).
    assert (workdir / "run.lock").exists()
    proc = start_main(workdir, cache)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, stderr[-3000:]
    assert "taking over the workdir lock" in stderr and "is gone" in stderr
    assert not (workdir / "run.lock").exists()

    config = micro_config()
    config.ema.kind = "power"
    for a, b in zip(jax.tree.leaves(restore_micro_run(straight, STEPS, config)),
                    jax.tree.leaves(restore_micro_run(workdir, STEPS, config)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert ema_snapshots.steps(str(workdir)) == ema_snapshots.steps(str(straight)) == [2, 4, 6, 8]
    like = train.train_state_shapes(config).params
    for step in (2, 4, 6, 8):
        for k in range(len(config.ema.sigma_rels)):
            a, b = (ema_snapshots.weighted_sum(str(run), {step: list(config.ema.sigma_rels)},
                                               {(step, k): 1.0}, like)
                    for run in (straight, workdir))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_array_equal(x, y)


def exploding_config():
    config = micro_config()
    config.learning_rate = 1e30  # the first update sends the weights to ~1e30: step 2 overflows
    config.warmup_steps = 0
    config.save_every_steps = 1
    config.num_train_steps = 4
    config.sample_every_steps = 0  # no sample grids: they play no part here
    return config


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
    config = exploding_config()
    with pytest.raises(train.NonFiniteError, match="at step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    manager = checkpointing.make_manager(epath.Path(tmp_path) / "checkpoints", config)
    assert manager.all_steps() == [1]
    mesh = train.create_mesh(config)
    state = checkpointing.restore_step(manager, manager.latest_step(),
                                       train.abstract_train_state(config, mesh))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_when_configured(tmp_path):
    config = exploding_config()
    config.on_nonfinite = "skip"
    config.log_every_steps = 4
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
    assert read_events(str(tmp_path))["nonfinite"] == [4]


@pytest.mark.slow
def test_resuming_with_a_different_network_is_refused_before_any_work(tmp_path):
    config = micro_config()
    config.num_train_steps = config.save_every_steps = 2
    config.sample_every_steps = 0  # no sample grids: they play no part here
    train.train_and_evaluate(config, str(tmp_path))
    config.model.base_channels = 16
    config.num_train_steps = 4
    with pytest.raises(config_checks.ConfigError, match="model.base_channels: checkpoint 8"):
        train.train_and_evaluate(config, str(tmp_path))
    # Nor with another target: the weights would be read as predicting something else.
    config.model.base_channels = 8
    config.diffusion.prediction = "v"
    with pytest.raises(config_checks.ConfigError, match="diffusion.prediction: checkpoint 'eps'"):
        train.train_and_evaluate(config, str(tmp_path))
    # Nor with clipping turned off: another optimizer state, not a damaged checkpoint.
    config.diffusion.prediction = "eps"
    config.grad_clip_norm = 0.0
    with pytest.raises(config_checks.ConfigError, match="grad_clip_norm: checkpoint 1.0, config 0.0"):
        train.train_and_evaluate(config, str(tmp_path))
    config.grad_clip_norm = 1.0
    config.diffusion.prediction = "v"
    assert checkpointing.make_manager(epath.Path(tmp_path) / "checkpoints").all_steps() == [2]
    assert not (tmp_path / "damaged_checkpoints").exists()
    # Fine-tuning with the new target on purpose, with another batch size: the data goes on
    # at the next unseen example (2 steps of 8 seen, then 2 of 4).
    config.batch_size = 4
    state = train.train_and_evaluate(config, str(tmp_path), allow_diffusion_change=True)
    assert int(state.step) == 4
    manager = checkpointing.make_manager(epath.Path(tmp_path) / "checkpoints")
    stored = checkpointing.stored_config(manager, 4)
    assert stored["diffusion"]["prediction"] == "v"
    assert checkpointing.examples_seen(manager, 4, stored) == 2 * 8 + 2 * 4


@pytest.mark.slow
def test_keep_every_steps_keeps_permanent_checkpoints(tmp_path):
    config = micro_config()
    config.num_train_steps, config.save_every_steps = 8, 1
    config.keep_checkpoints, config.keep_every_steps = 2, 4
    config.sample_every_steps = 0
    train.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert steps == [4, 7, 8]
