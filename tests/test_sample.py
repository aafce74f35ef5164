"""The sample command: grids, .npz files, snapshots, reproducibility, clamping."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import ddpm_jax
from ddpm_jax import image_utils, runs, sample, train
from tests.helpers import ROOT, command_env, library_info_lines, micro_config, warning_lines


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = micro_config()
    config.num_train_steps = 2
    config.diffusion.prediction = "v"
    train.train_and_evaluate(config, str(workdir))
    return str(workdir)


def test_same_seed_same_images_other_seed_other_images(run_dir):
    a, _ = sample.generate(run_dir, 6, seed=3, batch_size=4, num_steps=4)
    b, _ = sample.generate(run_dir, 6, seed=3, batch_size=4, num_steps=4)
    c, _ = sample.generate(run_dir, 6, seed=4, batch_size=4, num_steps=4)
    assert a.shape == (6, 8, 8, 3) and a.dtype == np.uint8  # 2 batches, the last cut to 6
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_snapshots_end_with_the_samples(run_dir):
    images, strips = sample.generate(run_dir, 4, snapshots=3, num_steps=6, sampler="ddim")
    assert strips.shape == (4, 3, 8, 8, 3)
    np.testing.assert_array_equal(strips[:, -1], images)


def test_the_run_config_is_used(run_dir):
    config, _, step, _ = runs.load_run(run_dir)
    assert config.diffusion.prediction == "v" and step == 2


def test_cli_writes_png_grid_npz_and_strip(run_dir, tmp_path):
    env = command_env()
    common = [sys.executable, "-m", "ddpm_jax.sample", f"--workdir={run_dir}", "--num_steps=3"]
    npz = tmp_path / "s.npz"
    png = tmp_path / "grid.png"
    fast = ["--sampler=dpm_solver++", "--spacing=trailing"]
    # The progress bar counts images over two batches (4 + 1), the sampler's steps in one.
    for out, extra, done in ((npz, ["--batch_size=4"], ("5/5 [", "image")),
                             (png, ["--snapshots=2", *fast], ("3/3 [", "step"))):
        result = subprocess.run([*common, "--num_samples=5", f"--output={out}", *extra], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        # quiet: neither library INFO nor Orbax's notices about its read-only manager
        assert library_info_lines(result.stderr) == [] and warning_lines(result.stderr) == []
        final = result.stderr.replace("\r", "\n").split("sampling: 100%")[-1].splitlines()[0]
        assert done[0] in final and done[1] in final, final
    assert np.load(npz)["arr_0"].shape == (5, 8, 8, 3)  # the ADM evaluator's key
    assert np.load(npz)["arr_0"].dtype == np.uint8
    # The Python API draws the command's images for the same seed and settings.
    pipeline = ddpm_jax.load_pipeline(run_dir)
    np.testing.assert_array_equal(pipeline.sample(5, num_steps=3, batch_size=4),
                                  np.load(npz)["arr_0"])
    assert pipeline.model.prediction == "v" and pipeline.step == 2
    grid = np.asarray(Image.open(png))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 5 images: 2 rows of 3, 2-pixel padding
    strip = np.asarray(Image.open(tmp_path / "grid_denoising.png"))
    assert strip.shape == (5 * 10 + 2, 2 * 10 + 2, 3)  # one row per sample, one column per snapshot


def test_uint8_conversion_clamps_instead_of_wrapping():
    values = np.array([-3.0, -1.0, 0.0, 1.0, 1.5, 40.0])
    np.testing.assert_array_equal(image_utils.to_uint8(values), [0, 0, 128, 255, 255, 255])
