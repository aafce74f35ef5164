"""Input-pipeline throughput next to the train step's, to see whether input is the bottleneck.

    python benchmarks/input_pipeline.py --output=input_pipeline.json

Writes CelebA-like JPEGs (178x218, smooth content plus noise) to a temporary folder, reads
them through the real pipeline (folder source, crop, antialiased resize, flip, batching) at
64 pixels (140 centre crop, as configs/celeba64.py) and 192 pixels (no crop, as
configs/celeba.py) with 0 (in-process), 1 and 2 grain workers, and the bundled quickstart
set; then times the real jitted train step of configs/quickstart.py and configs/celeba64.py
on this backend.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from ddpm_jax import input_pipeline, train

flags.DEFINE_integer("num_images", 512, "Generated JPEGs.")
flags.DEFINE_integer("batches", 12, "Timed batches per pipeline case (after 2 warm-up batches).")
flags.DEFINE_string("workers", "0,1,2", "Grain worker counts to try.")
flags.DEFINE_integer("celeba64_batch", 8, "Batch for timing the CelebA-64 train step here.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def write_celeba_like(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:218, 0:178]
    for i in range(count):
        base = np.stack([np.sin(xx / (9 + i % 7)) * 60, np.cos(yy / (11 + i % 5)) * 60,
                         (xx + yy) % 90], axis=-1) + 120
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=90)


def pipeline_rate(config, batch_size: int) -> float:
    """Images per second out of the pipeline, excluding start-up and the first 2 batches."""
    config.batch_size = batch_size
    source = input_pipeline.make_source(config.data)
    iterator = iter(input_pipeline.create_dataset(config, source, process_index=0, process_count=1))
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)
    return FLAGS.batches * batch_size / (time.perf_counter() - start)


def train_rate(config, batch_size: int) -> float:
    """Images per second of the jitted train step (median of 3 steps after compile)."""
    config.batch_size = batch_size
    mesh = train.create_mesh(config)
    state = train.create_train_state(config, mesh)
    step = train.make_train_step(config, mesh)
    size = config.data.image_size
    batch = train.global_batch(np.zeros((batch_size, size, size, 3), np.uint8), mesh)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return batch_size / common.time_call(run, warmup=1, repeats=3)


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def main(argv):
    del argv
    rows = []
    train_rates = {
        "quickstart": train_rate(load("quickstart"), 32),
        "celeba64": train_rate(load("celeba64"), FLAGS.celeba64_batch),
    }
    quick = load("quickstart")
    rows.append({"setup": "quickstart (bundled, 32px)", "workers": 0,
                 "pipeline_img_s": pipeline_rate(quick, 32),
                 "train_img_s": train_rates["quickstart"]})
    with tempfile.TemporaryDirectory() as folder:
        write_celeba_like(Path(folder), FLAGS.num_images)
        for name, size, crop, crop_size, train_key in (
            ("celeba64-like (140 crop -> 64px)", 64, "center", 140, "celeba64"),
            ("celeba-like (squash -> 192px)", 192, "none", 0, None),
        ):
            for workers in (int(w) for w in FLAGS.workers.split(",")):
                config = load("celeba64")
                config.data.update(source="folder", path=folder, image_size=size, crop=crop,
                                   crop_size=crop_size, num_workers=workers)
                rows.append({"setup": name, "workers": workers,
                             "pipeline_img_s": pipeline_rate(config, 32),
                             "train_img_s": train_rates[train_key] if train_key else float("nan")})
    for row in rows:
        row["pipeline_over_train"] = row["pipeline_img_s"] / row["train_img_s"]
    common.report("input pipeline vs train step (images/s)", rows, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
