"""clu's MetricWriter interface and the writers a run logs with, without TensorFlow.

clu's `metric_writers` package imports TensorFlow as it loads (its SummaryWriter writes
through `tf.summary`), a large install and seconds at every start for what is a file of
protocol buffers. These writers keep clu's method names and behaviour (so a clu writer can
stand in for any of them) and write TensorBoard's own TF2 summary format with the
`tensorboard` package's protos and plugin helpers: TensorBoard, its EventAccumulator and
`tf.summary` readers read the files as they read `tf.summary`'s.
"""

from __future__ import annotations

import abc
import itertools
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from clu import asynclib
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from ddpm_jax import image_utils

# Remote files (gs://) are flushed at most this often: each flush uploads the file again.
REMOTE_FLUSH_SECONDS = 60.0
_file_numbers = itertools.count()  # two writers of one process in one second: two files


class MetricWriter(abc.ABC):
    """What a run logs to (clu's `MetricWriter`, less videos, audio and raw summaries)."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One float per name at `step`."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Per name, images [N, H, W, C] (or one [H, W, C]) of uint8, or floats in [0, 1]."""

    @abc.abstractmethod
    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """One (Markdown) string per name at `step`."""

    @abc.abstractmethod
    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        """The distribution of each array's values at `step`."""

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters: flat names to bool, int, float or str."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Makes everything written so far durable."""

    def close(self) -> None:
        """Flushes and releases the writer."""
        self.flush()


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of one HWC image (1, 3 or 4 channels)."""
    if image.dtype != np.uint8:
        image = np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return image_utils.png_bytes(image[..., 0] if image.shape[-1] == 1 else image)


def image_value(tag: str, images: Any) -> summary_pb2.Summary.Value:
    """The summary value `tf.summary.image` writes: a string tensor [width, height, *PNGs]
    under the image plugin."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {tag!r}: expected [N, H, W, C] with C in 1, 3, 4, got {images.shape}")
    height, width = images.shape[1:3]
    strings = [str(width).encode(), str(height).encode(), *(_png(image) for image in images)]
    metadata = image_metadata.create_summary_metadata(display_name=None, description=None,
                                                      converted_to_tensor=True)
    tensor = tensor_util.make_tensor_proto(np.array(strings, dtype=object))
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)


class TensorBoardWriter(MetricWriter):
    """Writes one TensorBoard event file in `logdir` (local or gs://), named and framed as
    TensorFlow names and frames its own, and flushed after every call (remote files: every
    REMOTE_FLUSH_SECONDS and at `flush`)."""

    def __init__(self, logdir: str):
        directory = epath.Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a run's files in name order: the number is padded so that files
        # opened in one second by one process sort in the order they were opened.
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_file_numbers):06d}.v2")
        self._records = RecordWriter((directory / name).open("wb"))
        self._remote = "://" in logdir
        self._flushed_at = time.monotonic()
        self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write_event(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        if not self._remote or time.monotonic() - self._flushed_at >= REMOTE_FLUSH_SECONDS:
            self.flush()

    def _write_values(self, step: int, values: Sequence[summary_pb2.Summary.Value]) -> None:
        self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                          summary=summary_pb2.Summary(value=list(values))))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._write_values(step, [scalar_summary.scalar_pb(tag, np.float32(value)).value[0]
                                  for tag, value in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._write_values(step, [image_value(tag, value) for tag, value in images.items()])

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._write_values(step, [text_summary.text_pb(tag, text).value[0]
                                  for tag, text in texts.items()])

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        buckets = num_buckets or {}
        self._write_values(step, [
            histogram_summary.histogram_pb(tag, np.asarray(value, np.float64).ravel(),
                                           buckets.get(tag)).value[0]
            for tag, value in arrays.items()])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._write_values(0, hparams_summary.hparams_pb(dict(hparams)).value)

    def flush(self) -> None:
        self._records.flush()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if not self._records.closed:
            self.flush()
            self._records.close()


class LoggingWriter(MetricWriter):
    """Echoes scalars and texts to the log at DEBUG (shown with --verbosity=1)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        logging.debug("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        logging.debug("[%d] images %s", step, ", ".join(
            f"{k} {tuple(np.shape(v))}" for k, v in images.items()))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        logging.debug("[%d] %s", step, ", ".join(f"{k}={v!r}" for k, v in texts.items()))

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        del num_buckets
        logging.debug("[%d] histograms of %s", step, ", ".join(arrays))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.debug("hparams %s", dict(hparams))

    def flush(self) -> None:
        pass  # the log has no buffer of its own


class MultiWriter(MetricWriter):
    """Writes everything to each of several writers, in order."""

    def __init__(self, writers: Sequence[Any]):
        self._writers = list(writers)

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for writer in self._writers:
            getattr(writer, method)(*args, **kwargs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._each("write_scalars", step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._each("write_images", step, images)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._each("write_texts", step, texts)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        self._each("write_histograms", step, arrays, num_buckets)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._each("write_hparams", hparams)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")


class AsyncWriter(MultiWriter):
    """Runs another writer's calls in order on one background thread (PNG encoding and file
    writes stay off the training loop). As in clu, a failed call's error is raised, wrapped
    in `asynclib.AsyncError`, at the next call or at `flush`."""

    def __init__(self, writer: Any):
        super().__init__([writer])
        self._pool = asynclib.Pool(thread_name_prefix="AsyncWriter", max_workers=1)

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._pool(getattr(self._writers[0], method))(*args, **kwargs)

    def flush(self) -> None:
        try:
            self._pool.join()
        finally:
            self._writers[0].flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._writers[0].close()


def create_default_writer(logdir: str, *, just_logging: bool = False) -> MetricWriter:
    """The log echo, plus (unless `just_logging`) TensorBoard files in `logdir`, written in
    the background: clu's `create_default_writer` without TensorFlow."""
    if just_logging:
        return LoggingWriter()
    return AsyncWriter(MultiWriter([LoggingWriter(), TensorBoardWriter(logdir)]))
