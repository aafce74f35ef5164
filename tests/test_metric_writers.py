"""The TensorBoard writer without TensorFlow: what it writes, TensorBoard reads back as written."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from ddpm_jax import metric_writers
from tests.helpers import ROOT, event_accumulator


def tensors(reader, tag):
    return [(event.step, tensor_util.make_ndarray(event.tensor_proto)) for event in reader.Tensors(tag)]


def test_scalars_images_texts_histograms_and_hparams_read_back_by_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (1, 6, 10, 3), dtype=np.uint8)
    gray = rng.uniform(size=(2, 4, 4, 1)).astype(np.float32)
    values = rng.normal(size=1000)
    writer = metric_writers.create_default_writer(str(tmp_path))
    writer.write_hparams({"model.base_channels": 8, "sampler": "ddim", "lr": 2e-4, "ema": True})
    writer.write_scalars(2, {"loss": 0.125, "learning_rate": np.float32(3e-5)})
    writer.write_scalars(4, {"loss": 0.0625})
    writer.write_images(4, {"samples": grid, "gray": gray})
    writer.write_texts(4, {"note": "a *Markdown* note"})
    writer.write_histograms(4, {"weights": values}, num_buckets={"weights": 7})
    writer.close()

    reader = event_accumulator(tmp_path)
    assert tensors(reader, "loss") == [(2, 0.125), (4, 0.0625)]
    assert tensors(reader, "learning_rate")[0][1] == np.float32(3e-5)
    assert reader.summary_metadata["loss"].plugin_data.plugin_name == "scalars"

    for tag, expected in (("samples", grid), ("gray", np.round(gray * 255).astype(np.uint8))):
        assert reader.summary_metadata[tag].plugin_data.plugin_name == "images"
        (step, strings), = tensors(reader, tag)
        width, height, *pngs = strings
        assert step == 4 and (int(width), int(height)) == expected.shape[2:0:-1]
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in pngs])
        np.testing.assert_array_equal(decoded.reshape(expected.shape), expected)  # PNG: lossless

    assert tensors(reader, "note")[0][1] == b"a *Markdown* note"
    (step, histogram), = tensors(reader, "weights")
    assert histogram.shape == (7, 3) and histogram[:, 2].sum() == len(values)
    assert histogram[0, 0] == values.min() and histogram[-1, 1] == values.max()

    content = reader.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert data["model.base_channels"].number_value == 8 and data["sampler"].string_value == "ddim"
    assert data["lr"].number_value == 2e-4 and data["ema"].bool_value


def test_images_of_a_shape_tensorboard_cannot_show_are_refused_naming_the_tag(tmp_path):
    writer = metric_writers.TensorBoardWriter(str(tmp_path))
    with pytest.raises(ValueError, match="image 'samples'.*C in 1, 3, 4.*\\(1, 4, 4, 2\\)"):
        writer.write_images(1, {"samples": np.zeros((1, 4, 4, 2), np.uint8)})
    writer.close()


def test_two_writers_of_one_process_write_two_files_that_read_as_one_run(tmp_path):
    for step in (1, 2):  # a resumed run in the same process and second
        writer = metric_writers.TensorBoardWriter(str(tmp_path))
        writer.write_scalars(step, {"loss": float(step)})
        writer.close()
    assert len(os.listdir(tmp_path)) == 2
    assert tensors(event_accumulator(tmp_path), "loss") == [(1, 1.0), (2, 2.0)]


def test_writing_and_reading_need_no_tensorflow(tmp_path):
    """With every `import tensorflow` failing, the writer and TensorBoard's reader work and
    leave TensorFlow unloaded."""
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no TensorFlow here')\n")
    script = (
        "import sys\n"
        "from ddpm_jax import metric_writers\n"
        "from tests.helpers import read_scalars\n"
        f"writer = metric_writers.create_default_writer({str(tmp_path / 'logs')!r})\n"
        "writer.write_scalars(3, {'loss': 0.5})\n"
        "writer.write_images(3, {'samples': __import__('numpy').zeros((1, 2, 2, 3), 'uint8')})\n"
        "writer.close()\n"
        f"assert read_scalars({str(tmp_path / 'logs')!r}, 'loss') == [(3, 0.5)]\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "blocker"), ROOT]))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
