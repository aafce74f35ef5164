"""Input pipeline: preprocessing and a deterministic grain iterator over an image source
(`data_sources.py`: TFDS, a folder, the bundled faces).

Each process reads a disjoint slice of the records. Shuffling (per epoch) and
random flips depend only on `config.seed` and the position in the stream of examples,
so a run resumed at the next unseen example (`start_example`, saved with each
checkpoint) sees exactly the batches an uninterrupted run would, for any batch size.
Batches leave the pipeline as uint8 NHWC; scaling to [-1, 1] happens on device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from ddpm_jax.data_sources import DataError, crop_image, image_of

# ----------------------------------------------------------------------- preprocessing


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HWC uint8 with 3 channels, from grayscale (HW or HW1), RGB or RGBA input."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize to size x size (bicubic; PIL widens its kernel when downscaling)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    return np.asarray(resized)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """RGB conversion, crop, resize and a random horizontal flip decided per image."""

    image_size: int
    crop: str = "none"
    crop_size: int = 0
    crop_box: tuple[int, ...] = (0, 0, 0, 0)
    random_flip: bool = False

    def __call__(self, record: np.ndarray | dict, rng: np.random.Generator
                 ) -> np.ndarray | dict:
        """The preprocessed image; of a labelled record, `{"image", "label"}` again."""
        if isinstance(record, dict):
            return {"image": self(record["image"], rng), "label": np.int32(record["label"])}
        image = to_rgb(record)
        image = crop_image(image, self.crop, self.crop_size, self.crop_box)
        image = resize_image(image, self.image_size)
        flip = rng.random() < 0.5  # always drawn, so flips do not depend on the setting of others
        if self.random_flip and flip:
            image = image[:, ::-1]
        return np.ascontiguousarray(image, dtype=np.uint8)


def preprocess_from_config(data_config: ml_collections.ConfigDict) -> Preprocess:
    return Preprocess(
        image_size=data_config.image_size,
        crop=data_config.crop,
        crop_size=data_config.crop_size,
        crop_box=tuple(data_config.crop_box),
        random_flip=data_config.random_flip,
    )


def evaluation_images(
    data_config: ml_collections.ConfigDict, source: Any, num_images: int = 0, seed: int = 0
) -> tuple[int, Any]:
    """(count, read) for FID reference statistics: `read(indices)` -> uint8 [len, S, S, 3].

    The images are the dataset as training sees it (RGB, `data.crop`, bicubic resize to
    `data.image_size`) without random flips; all records in order, or a random subset of
    `num_images` drawn with `seed` (more than the data holds is a DataError). Reads decode on
    16 threads.
    """
    if num_images > len(source):
        raise DataError(f"num_images={num_images} is more than the {len(source)} images of the "
                        f"data: pass --num_images={len(source)}, or 0 for all of them")
    preprocess = dataclasses.replace(preprocess_from_config(data_config), random_flip=False)
    order = np.arange(len(source))
    if 0 < num_images < len(source):
        order = np.sort(np.random.default_rng(seed).permutation(len(source))[:num_images])
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)

    def read_one(index: int) -> np.ndarray:
        return preprocess(image_of(source[int(order[index])]), np.random.default_rng(0))

    def read(indices: Sequence[int]) -> np.ndarray:
        return np.stack(list(pool.map(read_one, indices)))

    return len(order), read


# ----------------------------------------------------------------------------- dataset


# Batches read ahead of the train step (the loop asks for one call's worth at a time), and
# the threads that read them; grain's defaults (500 batches, 16 threads) hold 500 batches.
DEFAULT_PREFETCH_BATCHES = 2
MAX_READ_THREADS = 16


def batch_bytes(config: ml_collections.ConfigDict, process_count: int) -> int:
    """Bytes of one of this process's batches (uint8 images, and int32 labels)."""
    labels = 4 if config.data.get("label") else 0
    return config.batch_size // process_count * (config.data.image_size ** 2 * 3 + labels)


def prefetch_bytes(config: ml_collections.ConfigDict, process_count: int, prefetch_batches: int) -> int:
    """Host bytes the pipeline holds at most: the batches read ahead, plus one being read by
    each worker process (`data.num_workers`)."""
    return batch_bytes(config, process_count) * (prefetch_batches + config.data.num_workers)


def create_dataset(
    config: ml_collections.ConfigDict,
    source: Any,
    *,
    process_index: int,
    process_count: int,
    start_example: int = 0,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
) -> grain.IterDataset:
    """Infinite iterator dataset of this process's uint8 batches [B / processes, S, S, 3]
    (of a labelled source: `{"image": that, "label": int32 [B / processes]}`).

    The data is one stream of examples (shuffled per epoch); global batch k holds examples
    `start_example + k*B` to `start_example + (k+1)*B - 1`. `start_example` skips into the
    stream at no cost, so a resumed run continues at the next unseen example for any batch
    size and any number of processes. At most `prefetch_batches` batches are read ahead
    (each by one of as many threads): grain's default of 500 would hold 500 batches in memory.
    """
    if config.batch_size % process_count:
        raise DataError(
            f"batch_size={config.batch_size} must be divisible by the {process_count} processes"
        )
    local_batch_size = config.batch_size // process_count
    # One global order for every process count: the whole set is shuffled per epoch, cut
    # into global batches, and process p reads part p of each. So N processes together see
    # exactly the batches one process would, and each epoch's parts are disjoint. Flips are
    # drawn per position in the stream, before the skip, so they do not depend on it.
    dataset = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat(None)
    dataset = dataset.random_map(preprocess_from_config(config.data), seed=config.seed + 1)
    dataset = dataset[start_example:]
    dataset = dataset.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=min(prefetch_batches, MAX_READ_THREADS), prefetch_buffer_size=prefetch_batches))
    if config.data.num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.num_workers)
        )
    return iter_dataset
