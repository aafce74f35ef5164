"""Image sources by name (`config.data.source`; docs/extending.md): random access to
decoded images, with the checks that fail fast on missing or unusable data.

  * ``tfds``: any TFDS image dataset (`data.name`, e.g. ``celeb_a``), read through
    `tfds.data_source` (ArrayRecord, random access; `tfds_data.py`);
  * ``folder``: every JPEG/PNG/WebP/BMP/TIFF image under `data.path`, recursively, decoded
    as a person sees it (`to_rgb8`);
  * ``bundled``: the 100 LFW face crops that ship inside scikit-image (offline);
  * ``digits``: the 1,797 handwritten digits (8x8, labelled 0-9) that ship inside
    scikit-learn (offline; `pip install -e ".[examples]"`).

With `data.label` set, a source also gives each image's class (`LABELS`): records are then
`{"image": ..., "label": int}` and the source's `class_names` lists the classes, in label
order. A new source is one file that registers a `DataSource` in `DATA_SOURCES`. The
pipeline that turns a source into batches is `input_pipeline.py`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageOps

from ddpm_jax import tfds_data
from ddpm_jax.core.errors import DataError, UserError
from ddpm_jax.core.registry import Registry, check_choice

CROPS = ("none", "center", "box")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Transparent pixels are composited on this colour (white, as image viewers show them).
BACKGROUND = (255, 255, 255)


def to_rgb8(image: Image.Image) -> np.ndarray:
    """An opened image as uint8 RGB [H, W, 3], as a person sees it.

    The EXIF orientation is applied (phone photos are stored sideways); 16-bit images keep
    their top 8 bits (x / 257); single-channel float images are read as [0, 1] (clipped);
    transparency is composited on `BACKGROUND`. Raises ValueError for what has no such
    reading: 32-bit integer pixels (no standard range) and NaN or infinite float pixels.
    """
    # TIFF's BitsPerSample, read before exif_transpose (its copy has no tags)
    bits = getattr(image, "tag_v2", {}).get(258, (16,))[0] if image.mode == "I" else 16
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # one deep channel
        if image.mode == "I" and bits > 16:
            raise UserError(f"{bits}-bit integer pixels have no standard range; save the image "
                             "with 8 or 16 bits per channel")
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and not np.isfinite(values).all():
            raise UserError(f"{int((~np.isfinite(values)).sum())} pixels are NaN or infinite")
        scale = 255.0 if image.mode == "F" else 1.0 / 257.0
        gray = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def read_image(path: str) -> np.ndarray:
    """Decodes the image file at `path` with `to_rgb8` (training, fid-stats, evaluate fid)."""
    with Image.open(path) as image:
        return to_rgb8(image)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A registered data source.

    open: `fn(data_config) -> source`, a random-access sequence (`len`, `[i]`) of uint8 images
        [H, W, C]; raises DataError, saying what to change, when the data cannot be read.
        With `data_config.label` set, the records are `{"image", "label"}` and the source
        has `class_names` (a source that has no labels raises DataError saying so).
    check: `fn(data_config)`, raising ValueError naming the field when the settings cannot
        work, before anything is read.
    """

    open: Callable[[ml_collections.ConfigDict], Any]
    check: Callable[[ml_collections.ConfigDict], None] = lambda data_config: None


DATA_SOURCES: Registry[DataSource] = Registry("data.source")


# ----------------------------------------------------------------------------- sources


class ArraySource:
    """Random-access source over an in-memory uint8 image array [N, H, W, C]."""

    def __init__(self, images: np.ndarray):
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._images[index]


class FolderSource:
    """Random-access source over image files; decodes with PIL on access.

    A file that fails to decode (truncated, corrupt) is replaced by the next readable file
    (so batches stay full and identical for any process count); each such file is logged,
    and more than `max_bad_fraction` of the files read so far (once at least 100 were
    read) stops training with a DataError.
    """

    def __init__(self, paths: Sequence[str], max_bad_fraction: float = 0.01):
        self._paths = list(paths)
        self._max_bad_fraction = max_bad_fraction
        self._reads = 0
        self._bad = 0

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self._paths):
            raise IndexError(index)
        for offset in range(len(self._paths)):
            image = self.read(self._paths[(index + offset) % len(self._paths)])
            if image is not None:
                return image
        raise DataError("no file in the folder could be decoded")

    def read(self, path: str) -> np.ndarray | None:
        """The decoded RGB image, or None (logged and counted) if the file is broken."""
        self._reads += 1
        try:
            return read_image(path)
        except Exception as error:  # PIL raises several types for broken files
            self._bad += 1
            logging.warning("skipping unreadable image %s (%s); %d of %d reads bad in this process",
                            path, error, self._bad, self._reads)
            if self._reads >= 100 and self._bad > self._max_bad_fraction * self._reads:
                raise DataError(
                    f"{self._bad} of {self._reads} images read were unreadable, more than "
                    f"data.max_bad_fraction={self._max_bad_fraction}; fix or remove the files"
                ) from error
            return None


class LabelledSource:
    """Images of another source with a class per index: records `{"image", "label"}`."""

    def __init__(self, images: Any, labels: np.ndarray, class_names: Sequence[str]):
        self.images, self.labels = images, np.asarray(labels, np.int32)
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def class_names(source: Any) -> tuple[str, ...]:
    """The classes of a labelled source, in label order (empty: unlabelled)."""
    return tuple(getattr(source, "class_names", ()))


def image_of(record: np.ndarray | dict) -> np.ndarray:
    """The image of a record, labelled or not."""
    return record["image"] if isinstance(record, dict) else record


def bundled_faces() -> np.ndarray:
    """The 100 LFW face crops (25x25 grayscale) shipped with scikit-image, as uint8 RGB."""
    from skimage import data as skimage_data  # heavy: loaded only for this source

    faces = skimage_data.lfw_subset()[:100]  # the first 100 of the 200 are faces
    faces = np.round(faces * 255.0).astype(np.uint8)
    return np.repeat(faces[..., None], 3, axis=-1)


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB images [1797, 8, 8, 3], digit labels [1797]) of scikit-learn's bundled
    handwritten digits (UCI; ink 0-16, drawn white on black)."""
    try:
        from sklearn import datasets  # an optional dependency: loaded only for this source
    except ImportError as error:
        raise DataError('data.source="digits" needs scikit-learn: pip install -e ".[examples]"'
                        ) from error
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int32)


def _open_digits(data_config: ml_collections.ConfigDict) -> ArraySource | LabelledSource:
    images, labels = bundled_digits()
    if not data_config.get("label"):
        return ArraySource(images)
    return LabelledSource(ArraySource(images), labels, [str(d) for d in range(10)])


def _check_digits(data_config: ml_collections.ConfigDict) -> None:
    if data_config.get("label") not in ("", "digit"):
        raise UserError(f"data.label={data_config.label!r}: the digits' class is 'digit'")


def _image_size(path: str) -> tuple[int, int] | str:
    """(height, width) as displayed (EXIF rotation applied), or why the header cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # 5..8 rotate by 90 degrees
            return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def scan_folder(paths: Sequence[str], data_config: ml_collections.ConfigDict) -> list[str]:
    """Reads every header once: drops unreadable files (each logged with its reason, bounded
    by max_bad_fraction) and fails on images too small for the configured crop, before any
    training work."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(_image_size, paths))
    sizes = [None if isinstance(result, str) else result for result in results]
    bad = [p for p, size in zip(paths, sizes, strict=True) if size is None]
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, str):
            logging.warning("skipping unreadable image %s (%s)", path, result)
    if bad:
        logging.warning("skipping %d unreadable of %d files under %s", len(bad), len(paths),
                        data_config.path)
    if len(bad) > data_config.max_bad_fraction * len(paths):
        raise DataError(
            f"{len(bad)} of {len(paths)} files under data.path={data_config.path!r} are "
            f"unreadable (e.g. {bad[0]}), more than data.max_bad_fraction="
            f"{data_config.max_bad_fraction}; fix or remove them, or raise data.max_bad_fraction"
        )
    good = [(p, size) for p, size in zip(paths, sizes, strict=True) if size is not None]
    for path, (height, width) in good:
        try:
            crop_image(np.empty((height, width, 0), np.uint8), data_config.crop,
                       data_config.crop_size, tuple(data_config.crop_box))
        except DataError as error:
            raise DataError(f"{path}: {error}") from error
    return [p for p, _ in good]


def list_image_files(path: str) -> list[str]:
    """Sorted paths of every image file under `path`, recursively, following symlinked
    folders (each real folder once, so a link loop ends); a folder that cannot be read is
    reported and skipped."""
    if not os.path.isdir(path):
        raise DataError(f"data.path={path!r} is not a directory; point it at a folder of images")

    def report(error: OSError) -> None:
        logging.warning("cannot read folder %s (%s): its images are not used",
                        error.filename, error.strerror)

    files, visited = [], set()
    for root, folders, names in os.walk(path, onerror=report, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a link back to a folder already scanned
            folders[:] = []
            continue
        visited.add(real)
        files += [os.path.join(root, name) for name in names
                  if name.lower().endswith(IMAGE_EXTENSIONS)]
    files.sort()
    if not files:
        raise DataError(
            f"data.path={path!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files; "
            "point data.path at a folder of images"
        )
    return files


def _open_folder(data_config: ml_collections.ConfigDict) -> FolderSource | LabelledSource:
    files = list_image_files(data_config.path)
    if data_config.get("label"):
        check_folder_classes(data_config.path, files)
    paths = scan_folder(files, data_config)
    source = FolderSource(paths, data_config.max_bad_fraction)
    if not data_config.get("label"):
        return source
    names, labels = folder_classes(data_config.path, paths)
    return LabelledSource(source, labels, names)


def _class_folder(root: str, path: str) -> str:
    """The immediate subfolder of `root` holding `path` ("" for a file in the root)."""
    parts = os.path.relpath(path, root).split(os.sep)
    return parts[0] if len(parts) > 1 else ""


def check_folder_classes(root: str, paths: Sequence[str]) -> None:
    """Refuses a labelled folder with images directly in its root (they have no class)."""
    loose = [p for p in paths if not _class_folder(root, p)]
    if loose:
        raise DataError(
            f"data.label='subfolder': {len(loose)} images lie directly in data.path={root!r} "
            f"(e.g. {os.path.basename(loose[0])}), so they have no class; move them into a "
            "subfolder named after their class, or set data.label=''")


def folder_classes(root: str, paths: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(class names, label per path): each immediate subfolder of `root` is a class, in
    sorted order (torchvision's ImageFolder), its images at any depth below it."""
    folders = [_class_folder(root, p) for p in paths]
    names = sorted(set(folders))
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index[f] for f in folders], np.int32)


def _check_folder(data_config: ml_collections.ConfigDict) -> None:
    if not data_config.path:
        raise UserError("data.source='folder' needs data.path, the folder of images")
    if data_config.get("label") not in ("", "subfolder"):
        raise UserError(f"data.label={data_config.label!r}: an image folder's classes are its "
                        "subfolders; set data.label='subfolder' (or '' for no labels)")


def _check_tfds(data_config: ml_collections.ConfigDict) -> None:
    if not data_config.name:
        raise UserError("data.source='tfds' needs data.name, a TFDS dataset name")


def _open_tfds(data_config: ml_collections.ConfigDict) -> tfds_data.TfdsImageSource:
    source = tfds_data.open_source(data_config)
    first = image_of(source[0])  # one decode: check the crop against the dataset's image size
    crop_image(np.empty(first.shape[:2] + (0,), np.uint8), data_config.crop,
               data_config.crop_size, tuple(data_config.crop_box))
    return source


DATA_SOURCES.register("tfds", DataSource(open=_open_tfds, check=_check_tfds))
DATA_SOURCES.register("folder", DataSource(open=_open_folder, check=_check_folder))
DATA_SOURCES.register("digits", DataSource(open=_open_digits, check=_check_digits))
DATA_SOURCES.register("bundled", DataSource(open=lambda data_config: ArraySource(bundled_faces()),
                                            check=lambda data_config: _check_unlabelled(
                                                data_config, "the bundled faces")))


def _check_unlabelled(data_config: ml_collections.ConfigDict, what: str) -> None:
    if data_config.get("label"):
        raise UserError(f"data.label={data_config.label!r}: {what} have no classes; set "
                        "data.label='' (or use a labelled source)")


def make_source(data_config: ml_collections.ConfigDict) -> Any:
    """The random-access image source named by `data_config.source`."""
    try:
        source = DATA_SOURCES.get(data_config.source)
    except ValueError as error:
        raise DataError(str(error)) from None
    opened = source.open(data_config)
    if data_config.get("label") and not class_names(opened):
        raise DataError(f"data.label={data_config.label!r}, but data.source="
                        f"{data_config.source!r} gives no classes; set data.label=''")
    return opened


def check_config(data_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when `config.data` cannot work."""
    source = DATA_SOURCES.get(data_config.source)
    if not isinstance(data_config.get("label", ""), str):
        raise UserError(f"data.label must be a string (a class feature, attributes such as "
                        f"'Male,Smiling', or 'subfolder'), got {data_config.label!r}")
    check_choice("data.crop", data_config.crop, CROPS)
    if data_config.crop == "center" and data_config.crop_size <= 0:
        raise UserError("data.crop='center' needs a positive data.crop_size")
    source.check(data_config)


def crop_image(image: np.ndarray, crop: str, crop_size: int, box: Sequence[int]) -> np.ndarray:
    """Crops before resizing: ``none`` keeps all, ``center`` a centred square, ``box`` (top, left, h, w)."""
    if crop == "none":
        return image
    height, width = image.shape[:2]
    if crop == "center":
        if crop_size > min(height, width):
            raise DataError(
                f"data.crop_size={crop_size} is larger than an image of {height}x{width}; "
                "lower data.crop_size"
            )
        top, left = (height - crop_size) // 2, (width - crop_size) // 2
        return image[top: top + crop_size, left: left + crop_size]
    if crop == "box":
        top, left, box_height, box_width = box
        if top < 0 or left < 0 or top + box_height > height or left + box_width > width:
            raise DataError(
                f"data.crop_box={tuple(box)} (top, left, height, width) does not fit an image "
                f"of {height}x{width}"
            )
        return image[top: top + box_height, left: left + box_width]
    raise DataError(f"unknown data.crop {crop!r}; choose one of {CROPS}")
