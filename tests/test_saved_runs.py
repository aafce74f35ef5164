"""Runs saved by earlier versions of ddpm-jax resume and sample with this one.

`tests/data/run_saved_2026_11_27/` is a checkpoint (step 2 of the micro net, dropout 0.1)
written by the version before the registries and `ddpm_jax/ops/`: its config has no
`model.name`, and the test removes further fields to stand for older runs still.
"""

import json
import shutil

import numpy as np
import pytest

from ddpm_jax import checkpointing, sample, train
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
    config, params, step, _ = sample.load_run(workdir)
    assert step == 2
    assert config.eval.num_samples == 10_000 and config.eval.sampler == "ddim"
    assert config.sample.eta == 0.0 and config.sample.num_snapshots == 0
    assert config.sample.num_steps == 3  # what the run saved is kept
    images, _ = sample.generate(workdir, 3, sampler="ddim", num_steps=2)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
