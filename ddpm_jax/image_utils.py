"""Conversions from model-space images to pictures: clamped uint8, grids and PNG files."""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image


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


def save_png(image: np.ndarray, path: str) -> None:
    """Writes a uint8 HWC image to a local or gs:// path, creating the folder first."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    target.write_bytes(buffer.getvalue())
