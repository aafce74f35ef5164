"""Weights & Biases mirrors the TensorBoard scalars and images, and a restart resumes its run."""

import sys
import types

import pytest
from etils import epath

from ddpm_jax import train, wandb_writer
from ddpm_jax.train import config_checks
from tests.helpers import micro_config, read_events


class FakeRun:
    def __init__(self, record, **init):
        self.record, self.init = record, init
        self.config = types.SimpleNamespace(update=lambda values, **_: record["config"].update(values))

    def log(self, values, step):
        for key in values:
            self.record["logged"].setdefault(key, []).append(step)

    def finish(self):
        self.record["finished"] += 1


def fake_wandb(record):
    """A stand-in for the wandb module that records what the writer sends."""
    module = types.ModuleType("wandb")

    def init(**kwargs):
        record["inits"].append(kwargs)
        return FakeRun(record, **kwargs)

    module.init = init
    module.Image = lambda array: ("image", array.shape)
    module.Histogram = lambda array: ("histogram", array.shape)
    return module


@pytest.mark.slow
def test_every_tensorboard_scalar_and_image_reaches_wandb_and_a_restart_resumes_its_run(
        tmp_path, monkeypatch):
    record = {"inits": [], "logged": {}, "config": {}, "finished": 0}
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(record))
    config = micro_config()
    config.wandb.project, config.wandb.tags, config.wandb.mode = "ddpm", ("test",), "offline"
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    tensorboard = read_events(workdir)
    for tag in ("loss", "learning_rate", "grad_norm", "steps_per_sec", "samples"):
        assert record["logged"][tag] == tensorboard[tag], tag
    assert record["config"]["model.base_channels"] == 8  # the hparams TensorBoard gets
    assert record["inits"][0]["project"] == "ddpm" and record["inits"][0]["tags"] == ["test"]
    run_id = (epath.Path(workdir) / wandb_writer.RUN_ID_FILE).read_text()
    config.num_train_steps = 6
    train.train_and_evaluate(config, workdir)  # resumed: the same W&B run goes on
    assert [init["id"] for init in record["inits"]] == [run_id, run_id]
    assert record["inits"][1]["resume"] == "allow" and record["finished"] == 2
    assert record["logged"]["loss"][-1] == 6


def test_wandb_asked_for_without_wandb_installed_is_refused_before_training(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    config = micro_config()
    config.wandb.project = "ddpm"
    with pytest.raises(config_checks.ConfigError, match=r'pip install -e "\.\[wandb\]"'):
        config_checks.validate(config)


@pytest.mark.slow
def test_a_real_offline_wandb_run_holds_the_scalars(tmp_path):
    pytest.importorskip("wandb")  # the `wandb` extra
    config = micro_config()
    config.wandb.project, config.wandb.mode = "ddpm", "offline"
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    run_id = (workdir / wandb_writer.RUN_ID_FILE).read_text()
    records = list((workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()  # protobuf records: the keys are stored as plain strings
    for tag in ("loss", "learning_rate", "grad_norm", "images_per_sec", "samples"):
        assert tag.encode() in data, tag
