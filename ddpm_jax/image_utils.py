"""Conversions from model-space images to pictures: clamped uint8, grids and PNG files."""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import uuid
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from ddpm_jax.core.errors import UserError


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Maps [-1, 1] floats to uint8, clamping first so out-of-range values never wrap around.

    NumPy in, NumPy out; a JAX array (or a traced one, inside jit) stays on device with the
    same arithmetic, so samples scored on device equal the PNGs written from the host.
    """
    xp = jnp if isinstance(images, jax.Array) else np
    images = xp.clip(xp.asarray(images, dtype=xp.float32), -1.0, 1.0)
    return xp.round((images + 1.0) * 127.5).astype(xp.uint8)


def make_grid(images: np.ndarray, num_columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows*(H+p)+p, cols*(W+p)+p, C] picture."""
    count, height, width, channels = images.shape
    columns = num_columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        dtype=images.dtype,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top: top + height, left: left + width] = image
    return grid


class OutputWriteError(OSError, UserError):
    """An output could not be written where asked; the message says where it was saved."""

    def __str__(self) -> str:
        return str(self.strerror)


def rescue_folder() -> str:
    """Where outputs that could not be written where asked are saved instead."""
    return os.path.join(tempfile.gettempdir(), "ddpm_jax-rescued")


def write_atomically(path: str | epath.Path, data: bytes) -> None:
    """Writes `data` to a temporary name beside `path` and renames it: `path` is complete or
    untouched, never a truncated file (a full disk, a kill). Creates the folder first.

    When the write fails (a full disk, a permission), the work is not lost: `data` is saved
    under `rescue_folder()` and OutputWriteError says where."""
    target = epath.Path(path)
    staged = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(data)
        staged.replace(target)
    except OSError as error:
        with contextlib.suppress(OSError):
            if staged.exists():
                staged.unlink()
        raise _rescued(target, data, error) from error
    except BaseException:
        with contextlib.suppress(OSError):
            if staged.exists():
                staged.unlink()
        raise


def _rescued(target: epath.Path, data: bytes, error: OSError) -> OutputWriteError:
    """Saves `data`, which could not be written at `target`, under `rescue_folder()`; the
    error to raise says where (or that it could not be saved anywhere)."""
    reason = error.strerror or str(error)
    try:
        os.makedirs(rescue_folder(), exist_ok=True)
        fd, rescued = tempfile.mkstemp(prefix=f"{target.stem}.", suffix=target.suffix,
                                       dir=rescue_folder())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as second:
        return OutputWriteError(error.errno, f"could not write {target} ({reason}), nor save it "
                                f"under {rescue_folder()} ({second.strerror or second})")
    return OutputWriteError(error.errno, f"could not write {target} ({reason}); the result is "
                            f"saved at {rescued} instead: move it where you want it")


def check_writable(path: str | epath.Path) -> None:
    """Raises OSError (with the reason) unless a file can be written at `path`: its folder is
    created and a probe file written and removed there, so a command can fail before any work."""
    target = epath.Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    probe = target.parent / f".{target.name}.{uuid.uuid4().hex}.probe"  # one per caller
    probe.write_bytes(b"")
    probe.unlink()


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 HW or HWC image (1 channel as HW) encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str) -> None:
    """Writes a uint8 HWC image to a local or gs:// path (`write_atomically`)."""
    write_atomically(path, png_bytes(image))


def line_chart(xs: Sequence[float], panels: dict[str, Sequence[float]], x_label: str,
               width: int = 480, panel_height: int = 200) -> np.ndarray:
    """A uint8 RGB chart [H, W, 3]: one panel per metric (name -> a value per x), each a
    polyline with its points marked, the x values and the metric's range written on the
    axes. For small tables (a metric against a setting) where a plotting library would be
    a dependency for one picture."""
    left, right, top, bottom = 64, 16, 24, 36
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    x_min, x_max = min(xs), max(xs)
    x_span = (x_max - x_min) or 1.0
    for row, (name, values) in enumerate(panels.items()):
        y0 = row * panel_height
        finite = [v for v in values if v is not None and math.isfinite(v)]
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
        span = (high - low) or 1.0
        plot_w, plot_h = width - left - right, panel_height - top - bottom
        draw.rectangle([left, y0 + top, left + plot_w, y0 + top + plot_h], outline="black")
        draw.text((left, y0 + 4), name, fill="black")
        draw.text((4, y0 + top), f"{high:.4g}", fill="black")
        draw.text((4, y0 + top + plot_h - 10), f"{low:.4g}", fill="black")
        points = []
        for x, value in zip(xs, values, strict=True):
            px = left + (x - x_min) / x_span * plot_w
            draw.text((px - 8, y0 + top + plot_h + 4), f"{x:g}", fill="black")
            if value is not None and math.isfinite(value):
                points.append((px, y0 + top + plot_h - (value - low) / span * plot_h))
        if len(points) > 1:
            draw.line(points, fill=(30, 80, 200), width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(30, 80, 200))
        draw.text((left + plot_w - 8 * len(x_label), y0 + panel_height - 14), x_label,
                  fill="black")
    return np.asarray(image)
