"""The command-line entry point, run as a user runs it."""

import glob
import os
import subprocess
import sys
import time

import pytest

from benchmarks import memory_estimate
from tests.helpers import MICRO_FLAGS, ROOT, command_env, library_info_lines, warning_lines


def run_main(*args, timeout=300, env_cache=True):
    env = command_env()
    if not env_cache:  # the config's compilation_cache_dir, not the tests' shared cache
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_quickstart_entry_point_trains_profiles_caches_resumes_and_ends_with_a_summary(tmp_path):
    workdir = os.path.relpath(tmp_path / "run", ROOT)  # relative, as users type it
    assert not os.path.isabs(workdir)
    cache = tmp_path / "xla_cache"
    env = command_env()
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the config's compilation_cache_dir
    # The memory check's estimate of the process's peak covers the measured peak.
    estimate, peak, stderr = memory_estimate.estimate_and_peak(
        ["--config=configs/quickstart.py", f"--workdir={workdir}", *MICRO_FLAGS,
         "--config.profile_steps=1", f"--config.compilation_cache_dir={cache}"], env=env)
    assert peak <= estimate, (peak, estimate)
    result = subprocess.CompletedProcess([], 0, "", stderr)
    assert os.listdir(os.path.join(ROOT, workdir, "checkpoints")) == ["3"]
    traces = glob.glob(os.path.join(ROOT, workdir, "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert len(os.listdir(cache)) > 0  # the compiled programs, for the next start
    # Quiet: no library INFO (Orbax, JAX, clu, TensorFlow's C++ start-up), and the end says
    # what was done and where everything is.
    assert library_info_lines(result.stderr) == []
    absolute = os.path.normpath(os.path.join(ROOT, workdir))
    for expected in ("compiled the train step in", "step 3: sampling 4 images (dpm_solver++, 3 steps",
                     "finished: steps 0 to 3 in", "final loss",
                     f"checkpoints: {absolute}/checkpoints (steps 3)",
                     f"samples: {absolute}/samples (step_00000003.png)",
                     f"TensorBoard: tensorboard --logdir {workdir}",
                     f"sample from it: python -m ddpm_jax.sample --workdir={workdir} "):
        assert expected in result.stderr, expected
    # A damaged cache entry (the train step's key holding the sampler's program) fails the
    # start deep inside JAX; the run is tried again without the cache, which is then emptied.
    entries = {name.split("-")[0]: cache / name for name in os.listdir(cache)}
    step_program, sampler_program = entries["jit_train_step"], entries["jit_advance"]
    swapped = step_program.read_bytes(), sampler_program.read_bytes()
    step_program.write_bytes(swapped[1])
    sampler_program.write_bytes(swapped[0])
    result = run_main("--config=configs/quickstart.py", f"--workdir={workdir}", *MICRO_FLAGS,
                      "--config.num_train_steps=4", f"--config.compilation_cache_dir={cache}",
                      env_cache=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting at step 3 of 4" in result.stderr and "finished: steps 3 to 4" in result.stderr
    assert f"with the compilation cache {cache} on; trying once more without it" in result.stderr
    assert f"so {cache} held a damaged entry: removed its" in result.stderr
    assert "Traceback" not in result.stderr and os.listdir(cache) == []
    # A finished run, run again: says so at once, compiles nothing, writes no new log file;
    # --verbosity=1 brings the libraries' INFO lines back.
    events = glob.glob(os.path.join(ROOT, workdir, "events.out.tfevents.*"))
    result = run_main("--config=configs/quickstart.py", f"--workdir={workdir}", *MICRO_FLAGS,
                      "--config.num_train_steps=4", "--config.profile_steps=8", "--verbosity=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"{workdir} has already finished: its newest checkpoint is step 4 of "
            "num_train_steps=4") in result.stderr
    assert "profile_steps=8: nothing traced, as no step is left to train" in result.stderr
    assert "compiling" not in result.stderr and f"checkpoints: {absolute}/checkpoints" in result.stderr
    assert glob.glob(os.path.join(ROOT, workdir, "events.out.tfevents.*")) == events
    assert library_info_lines(result.stderr) != []


def test_celeba_without_data_stops_at_once_with_instructions(tmp_path):
    start = time.monotonic()
    result = run_main("--config=configs/celeba.py", f"--workdir={tmp_path / 'run'}",
                      f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.download=False")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "--config.data.manual_dir" in result.stderr
    assert "img_align_celeba.zip" in result.stderr
    # the message alone: no TFDS warnings before it, no empty workdir left behind
    assert warning_lines(result.stderr) == [] and library_info_lines(result.stderr) == []
    assert not os.path.exists(tmp_path / "run")
    assert time.monotonic() - start < 120  # no compile, no model built


def test_dry_run_prints_overview_and_total_without_training(tmp_path):
    result = run_main("--config=configs/celeba.py", f"--workdir={tmp_path / 'run'}", "--dry_run",
                      "--config.check_memory=False")  # compiling the celeba step takes minutes
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "total parameters: 332477603"
    assert any("down/0/res/0/conv1/kernel" in line for line in lines)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_dry_run_prints_the_step_memory_and_refuses_a_step_that_cannot_fit(tmp_path):
    result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
                      "--dry_run", *MICRO_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if "train step memory" in line)
    assert "MiB" in line and "available host memory" in line
    # 256x256 images: the middle block's attention over 65,536 positions needs hundreds of
    # GiB, refused before any training
    result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
                      *[flag for flag in MICRO_FLAGS if "image_size" not in flag
                        and "attention_resolutions" not in flag],
                      "--config.data.image_size=256", "--config.model.attention_resolutions=()")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ddpm_jax: the train step needs") and "GiB" in message
    for lever in ("batch_size", "data.image_size", "model.remat"):
        assert lever in message
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "3")
