"""TFDS image datasets as a random-access source (`data.source="tfds"`, registered in
`data_sources.py`): opened through `tfds.data_source` (ArrayRecord), prepared from a
download or `data.manual_dir` when needed, with their classes (`data.label`): a class
feature, or each combination of binary attributes (CelebA's)."""

from __future__ import annotations

import contextlib
import logging as pylogging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import console
from ddpm_jax.core.errors import DataError


class TfdsImageSource:
    """Wraps a `tfds.data_source` and returns the image feature of each record, or with a
    `label_of(record) -> int` the image and its class."""

    def __init__(self, source: Any, image_key: str,
                 label_of: Callable[[dict], int] | None = None, class_names: Sequence[str] = ()):
        self._source = source
        self._image_key = image_key
        self._label_of = label_of
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray | dict:
        record = self._source[index]
        image = np.asarray(record[self._image_key])
        if self._label_of is None:
            return image
        return {"image": image, "label": np.int32(self._label_of(record))}



def attribute_classes(attributes: Sequence[str]) -> list[str]:
    """The classes of binary attributes, one per combination: class k has attribute i when
    bit (n - 1 - i) of k is set (the first attribute is the most significant), named like
    `Male, not Smiling`."""
    count = len(attributes)
    return [", ".join(name if (k >> (count - 1 - i)) & 1 else f"not {name}"
                      for i, name in enumerate(attributes)) for k in range(2**count)]


def attribute_label(values: Sequence[bool]) -> int:
    """The class (`attribute_classes`) of one record's attribute values."""
    label = 0
    for value in values:
        label = 2 * label + int(bool(value))
    return label


def _tfds_labels(features: Any, data_config: ml_collections.ConfigDict
                 ) -> tuple[Callable[[dict], int], list[str]]:
    """(label_of(record), class names) for `data.label` of a TFDS dataset: a class feature
    (`label`), or comma-separated binary attributes (`Male,Smiling` of celeb_a)."""
    wanted = data_config.label
    feature = features[wanted] if wanted in features else None
    if feature is not None and hasattr(feature, "names"):
        return (lambda record: int(record[wanted])), list(feature.names)
    attributes = [name.strip() for name in wanted.split(",")]
    table = features["attributes"] if "attributes" in features else {}
    if attributes and all(name in table for name in attributes):
        return ((lambda record: attribute_label([record["attributes"][a] for a in attributes])),
                attribute_classes(attributes))
    choices = [key for key in features if hasattr(features[key], "names")]
    attrs = sorted(table) if table else []
    raise DataError(
        f"data.label={wanted!r} is not a class feature of TFDS dataset {data_config.name!r}"
        + (f" (its class features: {', '.join(choices)})" if choices else " (it has no class feature)")
        + (f" nor a comma-separated list of its attributes ({', '.join(attrs)})" if attrs else "")
    )


def _manual_download_message(builder: Any, data_config: ml_collections.ConfigDict) -> str:
    files = sorted({info.filename for info in (builder.url_infos or {}).values() if info.filename})
    lines = [
        f"TFDS dataset {data_config.name!r} is not prepared in "
        f"data.data_dir={data_config.data_dir or '~/tensorflow_datasets'!r} and could not be built.",
    ]
    if files:
        lines.append("Download these files by hand and put them in one folder:")
        lines += [f"  {name}" for name in files]
        urls = sorted(builder.url_infos)
        lines.append("(their sources are listed in TFDS's checksums for this dataset: "
                     + ", ".join(urls[:2]) + (", ..." if len(urls) > 2 else "") + ")")
    lines.append(
        "then pass that folder as --config.data.manual_dir=/path/to/folder (TFDS builds the "
        "dataset from it once), or prepare it elsewhere with `tfds build "
        f"{data_config.name} --file_format=array_record` and set --config.data.data_dir."
    )
    if not console.tensorflow_installed():
        lines.append(BUILD_NEEDS_TENSORFLOW)
    return "\n".join(lines)


BUILD_NEEDS_TENSORFLOW = ('TFDS builds data sets with TensorFlow, which is not installed: '
                          'pip install -e ".[tfds]" (reading a prepared data set needs none)')


def _import_tensorflow_to_build(data_config: ml_collections.ConfigDict) -> None:
    """Loads TensorFlow, which TFDS builds data sets with; its absence is a DataError."""
    try:
        console.import_tensorflow()
    except ImportError as error:
        raise DataError(f"TFDS dataset {data_config.name!r} is not prepared yet. "
                        + BUILD_NEEDS_TENSORFLOW) from error


class _DropTfdsWarnings(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return "tensorflow_datasets" not in record.pathname or record.levelno >= pylogging.ERROR


@contextlib.contextmanager
def _without_tfds_warnings() -> Iterator[None]:
    """Hides TFDS's warnings for the body: its probing of folders that do not exist, which
    a missing dataset's own message explains."""
    handler, dropped = logging.get_absl_handler(), _DropTfdsWarnings()
    handler.addFilter(dropped)
    try:
        yield
    finally:
        handler.removeFilter(dropped)


def open_source(data_config: ml_collections.ConfigDict) -> TfdsImageSource:
    """Opens a TFDS dataset for random access, preparing it (download or manual_dir) if needed."""
    import tensorflow_datasets as tfds  # reads prepared data sets without TensorFlow

    try:
        with _without_tfds_warnings():  # it probes version folders that may not exist
            builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
            prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataError(
            f"unknown TFDS dataset data.name={data_config.name!r}; use a name from "
            "`tfds.list_builders()` or set data.source='folder'"
        ) from error
    def open_source() -> Any:
        return tfds.data_source(
            data_config.name, split=data_config.split, data_dir=data_config.data_dir or None,
            download=False, builder_kwargs={"file_format": "array_record"},
        )

    if prepared:
        try:
            return _tfds_image_source(open_source(), data_config)
        except DataError:
            raise
        except Exception as error:
            raise DataError(
                f"could not open TFDS dataset {data_config.name!r} split {data_config.split!r} "
                f"for random access ({error}); prepare it with file_format=array_record"
            ) from error
    try:  # a source TFDS can serve without a local build (e.g. under tfds.testing.mock_data)
        with _without_tfds_warnings():
            served = open_source()
    except Exception:
        served = None
    if served is not None:
        return _tfds_image_source(served, data_config)
    manual_dir = data_config.manual_dir or None
    if not (data_config.download or manual_dir):
        raise DataError(_manual_download_message(builder, data_config))
    _import_tensorflow_to_build(data_config)
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
        )
        source = open_source()
    except Exception as error:  # network, quota, missing or corrupt manual files
        raise DataError(
            _manual_download_message(builder, data_config) + f"\n(TFDS said: {error})"
        ) from error
    return _tfds_image_source(source, data_config)


def _tfds_image_source(source: Any, data_config: ml_collections.ConfigDict) -> TfdsImageSource:
    """The opened TFDS source's images, with their classes when `data.label` asks."""
    if not data_config.get("label"):
        return TfdsImageSource(source, data_config.image_key)
    label_of, names = _tfds_labels(source.dataset_info.features, data_config)
    return TfdsImageSource(source, data_config.image_key, label_of, names)
