"""Faults users meet: a busy workdir, damaged checkpoints, a full disk, a stop request during
an evaluation, outputs that cannot be written. Each is run through the real command where
the case is about the command."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from etils import epath

from ddpm_jax import checkpointing, console, metric_logs, runs, train, workdir_lock
from ddpm_jax.runtime import compiled_sampler
from ddpm_jax.samplers import SamplerSettings
from tests.helpers import MICRO_FLAGS, ROOT, command_env, micro_config, restore_micro_run


def command(module, *args):
    """[python, -m, module, args] and an environment for a command run as users run it."""
    return [sys.executable, "-m", module, *args], command_env()


def run(module, *args, timeout=300, **kwargs):
    argv, env = command(module, *args)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def train_args(workdir, *extra):
    return ("--config=configs/quickstart.py", f"--workdir={workdir}", *MICRO_FLAGS, *extra)


class Watched:
    """A command started in the background whose stderr lines are collected as they come."""

    def __init__(self, *args):
        argv, env = command("ddpm_jax.main", *args)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, text, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                self._reader.join(5)
                return any(text in line for line in self.lines)
            time.sleep(0.01)
        raise TimeoutError(text)

    def wait(self, timeout=240):
        code = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return code

    @property
    def stderr(self):
        return "".join(self.lines)


# --------------------------------------------------------------------- one writer per workdir


@pytest.mark.slow
def test_a_busy_workdir_is_refused_and_sigterm_saves(tmp_path):
    # A holder that died without releasing the lock is taken over: the reruns after SIGKILL
    # in test_reliability.py check that.
    workdir = tmp_path / "run"
    first = Watched(*train_args(workdir, "--config.num_train_steps=100000",
                                "--config.save_every_steps=100000",
                                "--config.sample_every_steps=0"))
    try:
        assert first.wait_for("): loss ")  # training (its first progress line), stop handler set
        started = time.monotonic()
        second = run("ddpm_jax.main", *train_args(workdir))
        assert second.returncode == 1
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith("ddpm_jax: workdir") and f"pid {first.proc.pid}" in message
        assert "--steal_lock" in message and "Traceback" not in second.stderr
        assert time.monotonic() - started < 60  # refused before building anything
        assert first.proc.poll() is None  # the first run goes on, untouched
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait() == 0, first.stderr[-3000:]
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert not (workdir / "run.lock").exists()
    # SIGTERM: the reached step was saved, readable, and the run exited 0
    steps = checkpointing.make_manager(epath.Path(workdir) / "checkpoints").all_steps()
    assert len(steps) == 1 and steps[0] >= 1
    assert int(restore_micro_run(workdir, steps[0]).step) == steps[0]


@pytest.mark.slow
def test_sigterm_while_compiling_stops_before_the_first_step_and_releases_the_lock(tmp_path):
    workdir = tmp_path / "run"
    # no compilation cache: the compile takes seconds, and the signal comes inside it
    argv, env = command("ddpm_jax.main", *train_args(workdir, "--config.compilation_cache_dir="))
    env.pop("JAX_COMPILATION_CACHE_DIR")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "compiling the train step" in line:
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=240) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines)
    assert "received SIGTERM" in stderr and "Traceback" not in stderr
    assert "stopped before step 0, during start-up: nothing was trained or written" in stderr
    assert "compiled the train step" in stderr  # the compile finished, then the run stopped
    assert not (workdir / "run.lock").exists()
    assert checkpointing.finished_steps(workdir / "checkpoints") == []
    assert not glob.glob(str(workdir / "events.out.tfevents.*"))


def test_lock_held_by_another_host_is_refused_until_its_heartbeat_stops(tmp_path):
    other = workdir_lock.WorkdirLock(epath.Path(tmp_path))
    other.record.update(host="another-host", pid=1)
    (tmp_path / "run.lock").write_text(json.dumps(other.record | {"heartbeat": time.time()}))
    with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on host 'another-host'"):
        workdir_lock.WorkdirLock(epath.Path(tmp_path)).acquire()
    # --steal_lock takes it at once; releasing removes only the lock it holds
    with workdir_lock.WorkdirLock(epath.Path(tmp_path), steal=True) as lock:
        assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.record["token"]
    assert not (tmp_path / "run.lock").exists()
    # a heartbeat older than STALE_SECONDS: the holder's host is gone
    stale = time.time() - workdir_lock.STALE_SECONDS - 1
    (tmp_path / "run.lock").write_text(json.dumps(other.record | {"heartbeat": stale}))
    lock = workdir_lock.WorkdirLock(epath.Path(tmp_path))
    lock.acquire()
    assert lock.stale_reason(other.record | {"heartbeat": stale}).startswith("its heartbeat")
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    # while held, this process's own second attempt is refused
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
        workdir_lock.WorkdirLock(epath.Path(tmp_path)).acquire()
    lock.release()


def test_a_run_whose_lock_is_stolen_stops_before_its_next_save(tmp_path, monkeypatch):
    # Two runs must never write into one workdir: after another run takes the lock with
    # --steal_lock, the old holder stops with WorkdirLockLostError and saves nothing more.
    config = micro_config()
    config.num_train_steps, config.save_every_steps, config.log_every_steps = 6, 2, 1
    config.sample_every_steps = 0
    workdir = tmp_path / "run"
    saved, thief = [], []
    original_save = checkpointing.save

    def save_then_steal(manager, step, *args, **kwargs):
        original_save(manager, step, *args, **kwargs)
        saved.append(step)
        if step == 2:
            thief.append(workdir_lock.WorkdirLock(epath.Path(workdir), steal=True))
            thief[0].acquire()

    monkeypatch.setattr(checkpointing, "save", save_then_steal)
    with pytest.raises(workdir_lock.WorkdirLockLostError, match="stopped at step 3 without"):
        train.train_and_evaluate(config, str(workdir))
    assert saved == [2]
    steps = checkpointing.make_manager(epath.Path(workdir) / "checkpoints").all_steps()
    assert list(steps) == [2]
    # the run that lost the lock left the thief's lock in place
    assert json.loads((workdir / "run.lock").read_text())["token"] == thief[0].record["token"]
    thief[0].release()


# ----------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A micro run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    config = micro_config()
    config.num_train_steps, config.save_every_steps, config.sample_every_steps = 4, 2, 0
    train.train_and_evaluate(config, str(workdir))
    return workdir


def array_files(step_dir):
    """The files of the state's array data (which of them a restore reads varies)."""
    return glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)


def overwrite(path):
    with open(path, "r+b") as f:
        f.write(bytes(200))


DAMAGES = {
    "deleted": lambda step: [os.remove(path) for path in array_files(step)],
    "truncated": lambda step: [os.truncate(path, 100) for path in array_files(step)],
    "overwritten": lambda step: [overwrite(path) for path in array_files(step)],
    "config_json": lambda step: (step / "config" / "metadata").write_text("{not json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_is_read(
        saved_run, tmp_path, damage):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    DAMAGES[damage](workdir / "checkpoints" / "4")
    config = micro_config()
    mesh = train.create_mesh(config)
    manager = checkpointing.make_manager(epath.Path(workdir) / "checkpoints", config)

    def read(step):  # what a resuming run reads: its config, then its state
        checkpointing.stored_config(manager, step)
        return checkpointing.restore_step(manager, step, train.abstract_train_state(config, mesh))

    step, state = checkpointing.newest_readable(manager, read, repair=True)
    assert step == 2 and int(state.step) == 2 and manager.all_steps() == [2]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    aside = glob.glob(str(workdir / "damaged_checkpoints" / "step_4_*"))
    assert len(aside) == 1 and os.path.isdir(os.path.join(aside[0], "state"))  # kept whole
    manager.close()


def test_a_run_resumes_past_a_damaged_checkpoint(saved_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    DAMAGES["truncated"](workdir / "checkpoints" / "4")
    config = micro_config()
    config.num_train_steps, config.save_every_steps, config.sample_every_steps = 5, 5, 100
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 5
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "5"]
    assert len(glob.glob(str(workdir / "damaged_checkpoints" / "step_4_*"))) == 1


@pytest.mark.slow
def test_readers_skip_a_damaged_checkpoint_and_name_one_they_were_asked_for(saved_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    DAMAGES["truncated"](workdir / "checkpoints" / "4")
    result = run("ddpm_jax.sample", f"--workdir={workdir}", "--num_samples=2",
                 f"--output={tmp_path / 'newest.npz'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint of step 4" in result.stderr and "cannot be read" in result.stderr
    assert "sampling 2 images from step 2" in result.stderr
    assert "Event loop is closed" not in result.stderr  # the failed read's echo is silenced
    assert os.path.isdir(workdir / "checkpoints" / "4")  # readers move and delete nothing
    # the export takes the newest readable checkpoint too
    from ddpm_jax import convert

    exported = convert.to_diffusers(str(workdir), str(tmp_path / "export"))
    assert exported["step"] == 2 and (tmp_path / "export" / "unet" / "config.json").exists()
    result = run("ddpm_jax.sample", f"--workdir={workdir}", "--num_samples=2", "--step=4",
                 f"--output={tmp_path / 'four.npz'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "ddpm_jax.sample: the checkpoint of step 4")
    # no checkpoint readable: one message, everything left where it was
    DAMAGES["config_json"](workdir / "checkpoints" / "2")
    result = run("ddpm_jax.main", *train_args(workdir, "--config.num_train_steps=5"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "none of the checkpoints" in result.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_a_checkpoint_that_cannot_be_read_for_permission_is_not_called_damaged(
        saved_run, tmp_path, monkeypatch):
    # The cause is the file system, not the checkpoint: nothing is moved aside, the message
    # says "permission denied", and the run does not fall back to an older step.
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    original = checkpointing.restore_step

    def denied(manager, step, *args, **kwargs):
        if step == 4:
            raise PermissionError(13, "Permission denied", str(workdir / "checkpoints" / "4"))
        return original(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "restore_step", denied)
    config = micro_config()
    config.num_train_steps, config.save_every_steps, config.sample_every_steps = 6, 2, 0
    with pytest.raises(checkpointing.CheckpointReadError,
                       match="step 4 .*: permission denied .*nothing was moved"):
        train.train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert not (workdir / "damaged_checkpoints").exists()


def test_a_checkpoints_path_that_is_a_file_is_refused_before_any_work(tmp_path):
    from ddpm_jax.train import config_checks

    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(config_checks.ConfigError, match="checkpoints is a file"):
        train.train_and_evaluate(micro_config(), str(tmp_path))


def test_abandoned_tensorstore_futures_are_not_echoed_after_the_failure_message(caplog):
    """A read that failed leaves the other arrays' futures unawaited; asyncio reports each
    when it is collected (after the run's one-line message). Those are dropped, others kept."""
    import asyncio
    import gc

    console.quiet_abandoned_io()
    loop = asyncio.new_event_loop()
    for text in ("OUT_OF_RANGE: Error reading \"opt_state/.zarray\" [tensorstore_spec='{}']",
                 "an error of somebody else's"):
        future = loop.create_future()
        future.set_exception(ValueError(text))
        del future
        gc.collect()
    loop.close()
    reported = [str(record.exc_info[1]) for record in caplog.records
                if record.name == "asyncio" and "never retrieved" in record.getMessage()]
    assert reported == ["an error of somebody else's"]


def test_weights_with_nan_are_refused_by_the_readers(saved_run, tmp_path):
    config = micro_config()
    mesh = train.create_mesh(config)
    manager = checkpointing.make_manager(epath.Path(saved_run) / "checkpoints")
    state = checkpointing.restore_step(manager, 4, train.abstract_train_state(config, mesh))
    state = state.replace(ema_params=jax.tree.map(lambda x: x * np.nan, state.ema_params))
    writer = checkpointing.make_manager(epath.Path(tmp_path) / "checkpoints", config)
    checkpointing.save(writer, 4, state, config)
    writer.wait_until_finished()
    with pytest.raises(runs.NonFiniteWeightsError, match="step 4 .* NaN or infinite"):
        runs.load_run(str(tmp_path))
    runs.load_run(str(tmp_path), weights="params")  # the raw weights are fine


# ------------------------------------------------------------------------------ failed saves


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_message_and_leaves_no_partial_files(tmp_path):
    """With a 48 KiB limit on file size, and (where the kernel gives a mount namespace of
    its own) on a 400 KiB tmpfs: either way the first checkpoint cannot be written."""

    def check(result, cause, saving=True):
        assert result.returncode == 1, result.stderr[-3000:]
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("ddpm_jax: ") and cause in message, message
        if saving:
            assert message.startswith("ddpm_jax: saving ") and "Removed the unfinished save" in message
        assert "Traceback" not in result.stderr

    def leftovers(root):
        return [p for p in glob.glob(str(root / "**"), recursive=True)
                if "tmp" in os.path.basename(p) or (os.path.isfile(p) and os.path.getsize(p) == 0)]

    workdir = tmp_path / "mount" / "run"
    (tmp_path / "mount").mkdir()
    argv, env = command("ddpm_jax.main", *train_args(workdir, "--config.num_train_steps=6",
                                                     "--config.save_every_steps=2",
                                                     "--config.sample_every_steps=0"))
    # The command under a 48 kB file size limit, set in the child itself (a preexec_fn would
    # fork this multithreaded process, which JAX warns against).
    limited = [sys.executable, "-c",
               "import resource, runpy, sys; "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, 48_000)); "
               "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', "
               "alter_sys=True)", *argv[2:]]
    assert argv[1] == "-m"
    check(subprocess.run(limited, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300),
          "a file is too large")
    assert leftovers(workdir) == []
    assert not (workdir / "run.lock").exists()

    shutil.rmtree(workdir)
    # On the tmpfs the logs may be what fills it first; what is left is listed before the
    # mount goes away with its namespace.
    lister = ("import glob, os, sys; print('LEFT', [p for p in glob.glob(sys.argv[1] + '/**', "
              "recursive=True) if 'tmp' in os.path.basename(p) or 'lock' in p or "
              "(os.path.isfile(p) and os.path.getsize(p) == 0)])")
    mount = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             f'mount -t tmpfs -o size=400k tmpfs "{tmp_path / "mount"}" && "$@"; code=$?; '
             f'"{sys.executable}" -c "{lister}" "{workdir}"; exit $code', "sh"]
    if shutil.which("unshare") and subprocess.run(mount + ["true"]).returncode == 0:
        result = subprocess.run(mount + argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        check(result, "the disk is full", saving=False)
        assert "LEFT []" in result.stdout, result.stdout


# --------------------------------------------------------------------------- prompt stops


def test_the_chunked_sampler_gives_the_one_call_images_and_stops_between_chunks():
    config = micro_config()
    mesh = train.create_mesh(config, jax.devices()[:1])
    state = train.create_train_state(config, mesh)
    fn = compiled_sampler.make_sample_fn(config, mesh, SamplerSettings("ddpm", 12), num_images=2,
                                 num_snapshots=3)
    rng = jax.random.PRNGKey(3)
    whole = fn(state.params, rng)
    calls = []
    chunked = fn(state.params, rng, should_stop=lambda: False, on_steps=calls.append)
    assert sum(calls) == 12 and len(calls) > 1
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    calls.clear()
    assert fn(state.params, rng, should_stop=lambda: True, on_steps=calls.append) is None
    assert calls == [1]


@pytest.mark.slow
def test_a_stop_request_during_the_sample_grid_abandons_it_and_saves(tmp_path):
    workdir = tmp_path / "run"
    # A grid of 1,000 DDPM steps over 256 images: far longer than a stop may wait.
    watched = Watched(*train_args(workdir, "--config.num_train_steps=4",
                                  "--config.sample_every_steps=2", "--config.save_every_steps=4",
                                  "--config.sample.num_steps=1000",
                                  "--config.sample.num_images=256",
                                  "--config.sample.sampler=ddpm"))
    try:
        assert watched.wait_for("step 2: sampling 256 images")
        time.sleep(1.0)  # inside the chain
        asked = time.monotonic()
        watched.proc.send_signal(signal.SIGTERM)
        assert watched.wait() == 0, watched.stderr[-3000:]
        waited = time.monotonic() - asked
    finally:
        if watched.proc.poll() is None:
            watched.proc.kill()
    assert "sample grid abandoned" in watched.stderr
    assert waited < 30, waited
    assert os.listdir(workdir / "checkpoints") == ["2"]
    assert not os.path.exists(workdir / "samples" / "step_00000002.png")


# ------------------------------------------------------------------------------- outputs


def test_sample_to_an_unwritable_path_fails_before_sampling(saved_run):
    started = time.monotonic()
    result = run("ddpm_jax.sample", f"--workdir={saved_run}", "--output=/proc/samples.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "ddpm_jax.sample: cannot write --output='/proc/samples.png'")
    assert "sampling" not in result.stderr
    assert time.monotonic() - started < 60


def test_a_typo_in_a_config_field_is_one_line_with_the_closest_names(tmp_path):
    result = run("ddpm_jax.main", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
                 "--config.batch_sizee=8", "--config.model.base_channel=8")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith("ddpm_jax.main: --config.batch_sizee: configs/quickstart.py has "
                                "no field 'batch_sizee'; did you mean batch_size")
    assert "did you mean model.base_channels" in lines[-1] and len(lines) == 2
    result = run("ddpm_jax.main", "--config=configs/quickstat.py", f"--workdir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "ddpm_jax.main: --config=configs/quickstat.py: no such file (from " + ROOT + "); the "
        "setups are in configs/, e.g. --config=configs/quickstart.py"]
    result = run("ddpm_jax.main", "--config=configs/quickstart.py", f"--workdri={tmp_path}")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("ddpm_jax.main: Unknown command line flag 'workdri'. Did "
                                    "you mean: workdir ?")
    # --helpfull says where the config fields are documented
    result = run("ddpm_jax.main", "--helpfull")
    assert "--config.FIELD=VALUE; every field is documented in\n    configs/default.py" in (
        result.stdout + result.stderr)


@pytest.mark.parametrize("module, args, message", [
    ("ddpm_jax.sample", ("--num_samples=0",), "flag --num_samples=0: 0 is not a positive integer"),
    ("ddpm_jax.sample", ("--batch_size=-3",), "flag --batch_size=-3: -3 is not a positive integer"),
    ("ddpm_jax.evaluate", ("nll", "--num_images=-5"),
     "flag --num_images=-5: -5 is not a non-negative integer"),
])
def test_impossible_command_numbers_are_one_line_before_any_work(tmp_path, module, args, message):
    result = run(module, f"--workdir={tmp_path}", f"--output={tmp_path}/s.png", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"{module}: {message} (see --helpfull; config "
                                                  "fields are documented in configs/default.py)"]


def test_logs_that_cannot_be_flushed_never_hide_the_error_that_stopped_the_run(tmp_path):
    class FullDiskWriter:
        def flush(self):
            raise RuntimeError("Could not flush events file: No space left on device")

    with pytest.raises(metric_logs.LogWriteError, match="the disk is full"):
        metric_logs.flush(FullDiskWriter(), epath.Path(tmp_path), failed=False)
    metric_logs.flush(FullDiskWriter(), epath.Path(tmp_path), failed=True)  # a warning only


def test_a_failed_asynchronous_log_write_stops_with_one_line_and_no_library_traceback(tmp_path):
    import errno
    import logging as pylogging

    from clu import asynclib

    from ddpm_jax import console, metric_writers

    class FullDisk(metric_writers.LoggingWriter):
        def write_scalars(self, step, scalars):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer = metric_logs.CheckedWriter(metric_writers.AsyncWriter(FullDisk()), epath.Path(tmp_path))
    with pytest.raises(metric_logs.LogWriteError, match="TensorBoard logs in .*: the disk is full"):
        writer.write_scalars(1, {"loss": 1.0})
        writer.flush()  # the asynchronous write's error comes out at the next call
    # clu's own traceback of that error (logged from its producer thread) is dropped
    record = pylogging.LogRecord("absl", pylogging.ERROR, asynclib.__file__, 139,
                                 "Error in producer thread for %s", ("AsyncWriter",), None)
    assert not console._EchoOfLogWriteFilter().filter(record)
    record.pathname = __file__
    assert console._EchoOfLogWriteFilter().filter(record)
