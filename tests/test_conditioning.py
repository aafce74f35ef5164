"""Class-conditional training and guidance end to end: labels from every data source, the
class embedding, label dropout, the classes saved with a run, and a net that learns which
class is which colour."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import data_sources, evaluate, fid, fid_math, inception, input_pipeline, sample, tfds_data, train
from ddpm_jax.runtime import compiled_sampler, network
from ddpm_jax.samplers import SamplerSettings
from ddpm_jax.train import config_checks
from ddpm_jax.train.step import dropped_labels
from tests.helpers import ROOT, command_env, micro_config
from tests.test_fid import synthetic_state_dict

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 40)}  # sorted names


def write_class_folders(root, per_class=8, size=8, seed=0):
    """One subfolder per colour (in `COLOURS`), each with noisy images of that colour, some
    one level deeper."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        for i in range(per_class):
            folder = root / name / ("deeper" if i % 3 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def labelled_config(root):
    config = micro_config()
    config.data.source, config.data.path, config.data.label = "folder", str(root), "subfolder"
    config.data.random_flip = False
    config.model.num_classes = len(COLOURS)
    return config


def test_folder_subfolders_are_classes_in_sorted_order_and_batches_carry_them(tmp_path):
    write_class_folders(tmp_path)
    config = labelled_config(tmp_path)
    source = data_sources.make_source(config.data)
    assert source.class_names == ("blue", "green", "red")
    for index in range(len(source)):  # each image's label is its top folder's rank
        record = source[index]
        name = sorted(COLOURS)[record["label"]]
        assert np.abs(record["image"].mean((0, 1)) - COLOURS[name]).max() < 20
    batch = next(iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                    process_count=1)))
    assert batch["image"].shape == (8, 8, 8, 3) and batch["label"].dtype == np.int32
    colours = np.array([COLOURS[n] for n in sorted(COLOURS)])
    nearest = np.argmin(np.abs(batch["image"].mean((1, 2))[:, None] - colours[None]).sum(-1), 1)
    np.testing.assert_array_equal(nearest, batch["label"])


def test_labelled_streams_resume_at_any_example_and_the_digits_carry_their_digit(tmp_path):
    """Labels travel with their images through shuffling and the skip to `start_example`."""
    write_class_folders(tmp_path)
    config = labelled_config(tmp_path)
    config.batch_size = 4
    source = data_sources.make_source(config.data)

    def batches(start, count):
        stream = iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                    process_count=1, start_example=start))
        return [next(stream) for _ in range(count)]

    whole, resumed = batches(0, 9), batches(20, 4)  # 24 images: resumed crosses an epoch
    for got, want in zip(resumed, whole[5:], strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    config.data.source, config.data.label = "digits", "digit"
    digits = data_sources.make_source(config.data)
    assert len(digits) == 1797 and digits.class_names == tuple("0123456789")
    from sklearn import datasets
    reference = datasets.load_digits()
    for index in (0, 500, 1796):
        assert digits[index]["label"] == reference.target[index]
        np.testing.assert_array_equal(digits[index]["image"][..., 0],
                                      np.round(reference.images[index] * 255 / 16))


def test_loose_images_in_a_labelled_root_are_refused_in_one_line(tmp_path):
    write_class_folders(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(data_sources.DataError, match="directly in data.path") as error:
        data_sources.make_source(labelled_config(tmp_path).data)
    assert "\n" not in str(error.value) and "loose.png" in str(error.value)
    unlabelled = labelled_config(tmp_path).data
    unlabelled.label = ""
    assert len(data_sources.make_source(unlabelled)) == 3 * 8 + 1


def test_tfds_class_feature_and_celeba_attribute_combinations():
    assert tfds_data.attribute_classes(["Male", "Smiling"]) == [
        "not Male, not Smiling", "not Male, Smiling", "Male, not Smiling", "Male, Smiling"]
    assert tfds_data.attribute_label([True, False]) == 2
    config = micro_config()
    config.data.source, config.data.name, config.data.label = "tfds", "celeb_a", "Male,Smiling"
    with tfds.testing.mock_data(num_examples=6):
        source = data_sources.make_source(config.data)
        assert source.class_names[3] == "Male, Smiling"
        raw = tfds.data_source("celeb_a", split="train")
        for index in range(6):
            attributes = raw[index]["attributes"]
            assert source[index]["label"] == 2 * int(attributes["Male"]) + int(attributes["Smiling"])
        config.data.name, config.data.label = "cifar10", "label"
        source = data_sources.make_source(config.data)
        assert len(source.class_names) == 10
        assert [source[i]["label"] for i in range(6)] == [raw_label["label"] for raw_label in
                                                          [tfds.data_source("cifar10", split="train")[i]
                                                           for i in range(6)]]
        config.data.label = "colour"
        with pytest.raises(data_sources.DataError, match="label"):
            data_sources.make_source(config.data)


def test_label_settings_that_cannot_work_are_refused_before_any_work(tmp_path):
    config = labelled_config(tmp_path)
    config.model.num_classes = 0
    with pytest.raises(config_checks.ConfigError, match="model.num_classes"):
        config_checks.validate(config)
    config = micro_config()
    config.sample.guidance_scale = 2.0
    with pytest.raises(config_checks.ConfigError, match="sample.guidance_scale"):
        config_checks.validate(config)
    config = micro_config()
    config.data.label = "subfolder"  # the bundled faces have no classes
    config.model.num_classes = 2
    with pytest.raises(config_checks.ConfigError, match="no classes"):
        config_checks.validate(config)


def test_label_dropout_rate_and_per_example_draws():
    labels = jax.numpy.zeros(4000, jax.numpy.int32)
    dropped = np.asarray(dropped_labels(jax.random.PRNGKey(1), labels, 0.1, 7))
    assert set(np.unique(dropped)) == {0, 7}
    assert abs((dropped == 7).mean() - 0.1) < 0.015
    # Example i's draw does not depend on the rest of the batch.
    np.testing.assert_array_equal(
        np.asarray(dropped_labels(jax.random.PRNGKey(1), labels[:100], 0.1, 7)), dropped[:100])


def test_the_class_embedding_conditions_the_net_and_unconditional_trees_are_unchanged():
    config = micro_config()
    unconditional = network.abstract_params(config)
    config.model.num_classes, config.data.label = 3, "subfolder"
    conditional = network.abstract_params(config)
    assert conditional.pop("class_embedding")["embedding"]["embedding"].shape == (4, 32)
    assert jax.tree.structure(conditional) == jax.tree.structure(unconditional)
    params = network.random_params(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    t = jax.numpy.array([10, 10, 10, 10])
    definition = network.graphdef(config)
    out = [network.apply(definition, params, x, t, class_labels=jax.numpy.full(4, k))
           for k in range(4)]
    # each class (and the null label) its own output, far beyond float rounding (~1e-8 here)
    assert all(np.abs(out[i] - out[j]).max() > 1e-5 for i in range(4) for j in range(i))
    np.testing.assert_array_equal(network.apply(definition, params, x, t), out[3])  # null label


@pytest.mark.slow
def test_a_conditional_net_learns_which_class_is_which_colour_and_guidance_picks_it(tmp_path):
    """Three hundred CPU steps on images whose class decides their colour: guided samples of
    each class have its colour in >= 90% of cases; at scale 0 (the unconditional model) the
    requested class does not decide the colour."""
    write_class_folders(tmp_path / "data", per_class=16)
    config = labelled_config(tmp_path / "data")
    config.num_train_steps, config.batch_size, config.learning_rate = 300, 16, 2e-3
    config.warmup_steps, config.ema_decay, config.log_every_steps = 20, 0.99, 100
    config.sample_every_steps, config.save_every_steps = 300, 300
    config.model.dropout = 0.0
    config.sample.sampler, config.sample.num_steps = "ddim", 20
    config.sample.guidance_scale, config.sample.num_images = 3.0, 6
    workdir = tmp_path / "run"
    state = train.train_and_evaluate(config, str(workdir))
    saved = json.loads((workdir / "classes.json").read_text())
    assert saved == {"classes": ["blue", "green", "red"], "counts": [16, 16, 16]}
    assert os.path.exists(workdir / "samples" / "step_00000300.png")

    mesh = train.create_mesh(config)
    labels = np.repeat(np.arange(3), 20)
    colours = np.array([COLOURS[n] for n in sorted(COLOURS)]) / 127.5 - 1

    def colour_matches(scale):
        settings = SamplerSettings.from_config(config.sample, guidance_scale=scale)
        images = compiled_sampler.make_sample_fn(config, mesh, settings, num_images=60)(
            state.ema_params, jax.random.PRNGKey(5), labels=labels)
        means = np.asarray(images).mean((1, 2))
        nearest = np.argmin(np.abs(means[:, None] - colours[None]).sum(-1), 1)
        return (nearest == labels).mean()

    guided, unconditional = colour_matches(3.0), colour_matches(0.0)
    print(f"colour matches the class: {guided:.0%} guided, {unconditional:.0%} at scale 0")
    assert guided >= 0.9
    assert unconditional < 0.6

    # `evaluate fid --guidance_scales`: a row per scale and a chart in the workdir.
    weights = str(tmp_path / "inception.npz")
    inception.save_npz(synthetic_state_dict(), weights, source="synthetic")
    stats = fid_math.FeatureStatistics()
    stats.update(np.random.default_rng(6).uniform(size=(8, inception.FEATURE_DIM)))
    fid.save_statistics(str(tmp_path / "stats.npz"), stats)
    result = evaluate.guidance_sweep(str(workdir), [1.0, 3.0], reference=str(tmp_path / "stats.npz"),
                                     weights=weights, num_images=6, batch_size=6,
                                     class_distribution="data", num_steps=2)
    assert [row["guidance_scale"] for row in result["sweep"]] == [1.0, 3.0]
    assert all(np.isfinite(row["fid"]) and row["fid"] > 0 for row in result["sweep"])
    assert result["sweep"][0]["fid"] != result["sweep"][1]["fid"]  # guidance changed samples
    assert str(result["plot"]).startswith(str(workdir))
    chart = np.asarray(Image.open(result["plot"]))
    assert chart.shape[0] == 400 and (chart < 128).any()

    # The sample command: a grid of one row of 2 per class, guided; classes by name.
    grid_png = tmp_path / "grid.png"
    command = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.sample", f"--workdir={workdir}", "--num_steps=2",
         "--class_grid", "--num_samples=2", "--guidance_scale=2", f"--output={grid_png}"],
        cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr[-3000:]
    assert np.asarray(Image.open(grid_png)).shape == (3 * 10 + 2, 2 * 10 + 2, 3)  # 3 classes
    images, _ = sample.generate(str(workdir), 5, class_labels=["red", "0"], num_steps=2,
                                guidance_scale=2.0, batch_size=4)
    assert images.shape == (5, 8, 8, 3)
    with pytest.raises(ValueError, match="unknown class 'purple'.*blue, green, red"):
        sample.generate(str(workdir), 2, class_labels=["purple"])

    # A resume with other classes is refused before any work.
    (tmp_path / "data" / "red").rename(tmp_path / "data" / "yellow")
    config.num_train_steps = 301
    with pytest.raises(config_checks.ConfigError, match="other classes"):
        train.train_and_evaluate(config, str(workdir))
