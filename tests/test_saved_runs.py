"""Runs saved by earlier versions of ddpm-jax resume and sample with this one.

`tests/data/run_saved_2026_11_27/` is a checkpoint (step 2 of the micro net, dropout 0.1)
written by the version before the registries and `ddpm_jax/ops/`: its config has no
`model.name`, and the test removes further fields to stand for older runs still.
"""

import json
import shutil

import numpy as np
import pytest

from ddpm_jax import checkpointing, runs, sample, train
from tests.helpers import ROOT, micro_config

SAVED = f"{ROOT}/tests/data/run_saved_2026_11_27"


def saved_run(tmp_path, drop=()):
    """A copy of the saved run, with the config fields `drop` ("section.key") removed."""
    workdir = tmp_path / "run"
    shutil.copytree(SAVED, workdir)
    path = workdir / "checkpoints" / "2" / "config" / "metadata"
    saved = json.loads(path.read_text())
    assert "name" not in saved["model"]  # written before networks were registered by name
    for field in drop:
        section, _, key = field.rpartition(".")
        del (saved[section] if section else saved)[key]
    path.write_text(json.dumps(saved))
    return str(workdir)


@pytest.mark.slow
def test_a_run_saved_before_the_registries_resumes(tmp_path):
    workdir = saved_run(tmp_path)
    config = micro_config()
    config.model.dropout = 0.1
    config.num_train_steps = 4
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 4
    saved = checkpointing.config_at(checkpointing.make_manager(
        train.absolute_path(workdir) / "checkpoints"), 2)
    assert saved["model"]["name"] == "unet"  # the field it lacked, from configs/default.py
    # Saved before model.downsample_padding existed: resumed with the padding it had.
    assert config.model.downsample_padding == "symmetric"
    assert saved["model"]["downsample_padding"] == "symmetric"
    resumed = checkpointing.config_at(checkpointing.make_manager(
        train.absolute_path(workdir) / "checkpoints"), 4)
    assert resumed["model"]["downsample_padding"] == "symmetric"  # and saves it from now on
    assert resumed["sample"]["spacing"] == resumed["eval"]["spacing"] == "linspace"


def test_fields_a_run_lacks_come_from_the_default_config(tmp_path):
    workdir = saved_run(tmp_path, drop=("eval", "sample.eta", "sample.num_snapshots"))
    config, params, step, _ = runs.load_run(workdir)
    assert step == 2
    assert config.eval.num_samples == 10_000 and config.eval.sampler == "ddim"
    assert config.sample.eta == 0.0 and config.sample.num_snapshots == 0
    assert config.sample.num_steps == 3  # what the run saved is kept
    images, _ = sample.generate(workdir, 3, sampler="ddim", num_steps=2)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8


# Written by the code of 2026-12-04, before the nets were nested by level: two steps of a
# two-level Ho et al. net and of the mirror net, and the outputs of each network
# (`outputs.npz`); for the run above, `run_saved_2026_11_27_outputs.npz`.
FLAT_RUNS = {
    "run_saved_2026_11_27": (SAVED, f"{SAVED}_outputs.npz"),
    "ddpm_two_levels": (f"{ROOT}/tests/data/flat_runs_2026_12_04/ddpm_two_levels",
                        f"{ROOT}/tests/data/flat_runs_2026_12_04/ddpm_two_levels/outputs.npz"),
    "mirror": (f"{ROOT}/tests/data/flat_runs_2026_12_04/mirror",
               f"{ROOT}/tests/data/flat_runs_2026_12_04/mirror/outputs.npz"),
}


@pytest.mark.parametrize("name", list(FLAT_RUNS))
def test_a_run_saved_with_the_flat_parameter_tree_gives_the_outputs_it_gave(name):
    """Read into today's nested nets, the flat trees of earlier runs (`encoder[i]`,
    `middle[i]`, `decoder[i]`) give the outputs the code that wrote them computed, with
    dropout off and on: every block's weights are where its place in the net is, and every
    residual block draws the dropout masks it drew."""
    import jax

    from ddpm_jax.runtime import network

    workdir, outputs = FLAT_RUNS[name]
    config, params, _, _ = runs.load_run(workdir, weights="params")
    assert {"down", "mid", "up"} <= set(params) and "encoder" not in params
    reference = np.load(outputs)
    definition = network.graphdef(config)
    plain = network.apply(definition, params, reference["x"], reference["t"])
    np.testing.assert_allclose(plain, reference["output"], rtol=1e-5, atol=1e-6)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    dropped = network.apply(definition, params, reference["x"], reference["t"], keys)
    np.testing.assert_allclose(dropped, reference["output_with_dropout"], rtol=1e-5, atol=1e-6)
    if name != "run_saved_2026_11_27":  # its output conv is still near its zero start
        assert np.abs(reference["output"]).mean() > 0.05
        assert np.abs(reference["output_with_dropout"] - reference["output"]).mean() > 1e-3
