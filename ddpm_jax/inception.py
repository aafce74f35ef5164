"""The FID Inception network: 2048-d pool features of the 2015-12-05 Inception-v3, in Flax NNX.

FID is only comparable between papers when every codebase uses the same network: the
Inception-v3 graph of 2015-12-05 (``inception-2015-12-05.tgz``) that the original FID code
runs. Its weights are commonly distributed ported to PyTorch as
``pt_inception-2015-12-05-6726825d.pth`` (the FID weights release of the pytorch-fid
project). This module rebuilds that network with the same module names, so the file's
state dict maps key by key onto the parameters here:

* ``load_weights("pt_inception-2015-12-05-6726825d.pth")`` reads the file directly when
  PyTorch is installed (the sha256 prefix in the standard name is checked);
* ``python -m ddpm_jax.evaluate convert-weights --input=X.pth --output=X.npz`` converts it
  once to a NumPy file that loads without PyTorch (same keys and array layouts).

The network differs from torchvision's Inception-v3 in what the 2015 graph does: average
pools ignore the zero padding, the last block pools with a max instead of an average, and
the classifier has 1008 classes. Inputs are uint8 images of any size; they are resized to
299x299 bilinearly (half-pixel centres, no antialiasing: PyTorch's
``interpolate(mode="bilinear", align_corners=False)``) and scaled to [-1, 1].
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from ddpm_jax import image_utils
from ddpm_jax.core.errors import UserError

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + STANDARD_FILE
)
HIGHEST = jax.lax.Precision.HIGHEST  # features in full float32 on every chip (no TF32/bf16 passes)


class InceptionWeightsError(UserError):
    """The weight file is missing, unreadable, or does not hold the FID Inception's layout."""


# ------------------------------------------------------------------------------ network


class BasicConv(nnx.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], *,
                 stride: int = 1, padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(in_channels, out_channels, kernel_size=kernel, strides=stride,
                             padding=[(padding[0], padding[0]), (padding[1], padding[1])],
                             use_bias=False, precision=HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the valid pixels only (the 2015 graph's pooling at borders)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], -1)


class InceptionB(nnx.Module):
    """35 -> 17 reduction: strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), branch3x3dbl, max_pool_3x3(x, 2)], -1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], -1)


class InceptionD(nnx.Module):
    """17 -> 8 reduction: strided 3x3, 7x7-then-strided-3x3 and max-pool branches."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x, 2)], -1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `max_pool` marks the graph's last block."""

    def __init__(self, in_channels: int, *, max_pool: bool, rngs: nnx.Rngs):
        self.max_pool = max_pool
        self.branch1x1 = BasicConv(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = jnp.concatenate([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], -1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = jnp.concatenate(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], -1)
        pooled = max_pool_3x3(x, 1) if self.max_pool else avg_pool_3x3(x)
        branch_pool = self.branch_pool(pooled)
        return jnp.concatenate([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], -1)


class FIDInception(nnx.Module):
    """The FID Inception-v3 (no auxiliary head); attribute names follow the weight file's keys."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
        self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, precision=HIGHEST, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """uint8 images [B, H, W, 3] -> pool features [B, 2048] (float32)."""
        x = 2.0 * resize_bilinear(images.astype(jnp.float32) / 255.0, INPUT_SIZE) - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool_3x3(x, 2)
        x = max_pool_3x3(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def logits(self, features: jax.Array) -> jax.Array:
        """The 1008 class logits that the Inception Score is computed from: pool features
        times the classifier's weight, without its bias, as the original IS code takes them
        (it multiplies by the weight of the graph's ``softmax/logits/MatMul``)."""
        return jnp.dot(features, self.fc.kernel[...], precision=HIGHEST)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of [B, H, W, C] to size x size, half-pixel centres, no antialiasing."""
    height, width = images.shape[1:3]
    if (height, width) == (size, size):
        return images
    return jax.image.scale_and_translate(
        images, (images.shape[0], size, size, images.shape[3]), spatial_dims=(1, 2),
        scale=jnp.array([size / height, size / width]), translation=jnp.zeros(2),
        method="linear", antialias=False,
    )


# ------------------------------------------------------------------------------ weights


@functools.cache
def abstract_model() -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, parameter shapes as a pure dict) of the network, allocating nothing; traced
    once per process (tracing its 94 layers' initialisers takes seconds)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: FIDInception(rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


_BATCH_NORM_KEYS = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                    "var": "running_var"}


def _file_key_and_layout(path: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
    """The weight-file key of a parameter and the axis order taking the file's array to ours."""
    *module, leaf = path
    prefix = ".".join(module)
    if module[-1] == "conv":  # PyTorch OIHW -> Flax HWIO
        return f"{prefix}.weight", (2, 3, 1, 0)
    if module[-1] == "bn":
        return f"{prefix}.{_BATCH_NORM_KEYS[leaf]}", None
    if leaf == "kernel":  # Linear: [out, in] -> [in, out]
        return f"{prefix}.weight", (1, 0)
    return f"{prefix}.{leaf}", None


def _file_shape(shape: tuple[int, ...], axes: tuple[int, ...] | None) -> tuple[int, ...]:
    """The weight file's shape of a parameter of `shape` (undoing the layout transpose)."""
    return tuple(shape) if axes is None else tuple(shape[i] for i in np.argsort(axes))


def file_layout() -> dict[str, tuple[int, ...]]:
    """Every key the standard weight file holds (batch-norm step counters aside) and its shape."""
    _, state = abstract_model()
    layout = {}
    for path, leaf in _flatten(state):
        key, axes = _file_key_and_layout(path)
        layout[key] = _file_shape(leaf.shape, axes)
    return layout


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The network's pure-dict state from a PyTorch-layout state dict; checks every key and shape."""
    _, state = abstract_model()
    arrays = {k: v for k, v in state_dict.items()
              if not k.endswith("num_batches_tracked") and not k.startswith("_")}
    used, problems = set(), []
    converted = {}
    for path, leaf in _flatten(state):
        key, axes = _file_key_and_layout(path)
        if key not in arrays:
            problems.append(f"missing {key}")
            continue
        value = np.asarray(arrays[key], dtype=np.float32)
        value = value if axes is None else value.transpose(axes)
        if value.shape != leaf.shape:
            problems.append(f"{key}: shape {np.shape(arrays[key])}, expected "
                            f"{_file_shape(leaf.shape, axes)}")
        used.add(key)
        converted[path] = value
    problems += [f"unexpected {key}" for key in sorted(set(arrays) - used)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8
                                           else "")
        raise InceptionWeightsError(
            f"not the FID Inception-v3 weight layout ({STANDARD_FILE}): {shown}")
    return _unflatten(converted)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Arrays of a weight file: the PyTorch .pth (needs torch) or a converted .npz."""
    file = epath.Path(path)
    if not file.exists():
        raise InceptionWeightsError(
            f"no Inception weights at {path}; download {STANDARD_URL} (and optionally convert it "
            "with `python -m ddpm_jax.evaluate convert-weights`)")
    if file.suffix == ".npz":
        with file.open("rb") as f, np.load(f) as data:
            return {key: data[key] for key in data.files}
    if file.suffix not in (".pth", ".pt"):
        raise InceptionWeightsError(f"{path}: expected a .pth (PyTorch) or .npz weight file")
    _check_standard_hash(file)
    try:
        import torch  # optional and heavy: only to read the PyTorch weight file
    except ImportError as error:
        raise InceptionWeightsError(
            f"reading {path} needs PyTorch (`pip install torch`); or convert it once on a machine "
            "that has it: python -m ddpm_jax.evaluate convert-weights --input=... --output=X.npz"
        ) from error
    with file.open("rb") as f:
        state_dict = torch.load(f, map_location="cpu", weights_only=True)
    return {key: value.numpy() for key, value in state_dict.items()}


def _check_standard_hash(file: epath.Path) -> None:
    """A file carrying the standard name must have the sha256 prefix in that name."""
    match = re.fullmatch(r"pt_inception-2015-12-05-([0-9a-f]{8})\.pth", file.name)
    if match:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if not digest.startswith(match.group(1)):
            raise InceptionWeightsError(
                f"{file} has sha256 {digest[:8]}..., not {match.group(1)}...: the download is "
                f"incomplete or corrupt; fetch {STANDARD_URL} again")


def load(path: str) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, state) of the FID Inception with the weights in `path`.

    Non-finite weights are refused; weights that are not provably the standard file (its
    sha256 prefix, and for a converted .npz the digest of its arrays as converted) load
    with a warning that the FID is not comparable with published numbers.
    """
    graphdef, _ = abstract_model()
    state_dict = read_state_dict(path)
    bad = [key for key, value in state_dict.items()
           if not key.startswith("_") and np.issubdtype(np.asarray(value).dtype, np.floating)
           and not np.all(np.isfinite(value))]
    if bad:
        raise InceptionWeightsError(f"{path}: non-finite values in {', '.join(bad[:5])}"
                                    f"{' ...' if len(bad) > 5 else ''}; fetch {STANDARD_URL} again")
    params = params_from_state_dict(state_dict)
    reason = not_standard_reason(path, state_dict)
    if reason:
        logging.warning("Inception weights %s are not the standard %s (%s): FID computed with "
                        "them is not comparable with published numbers", path, STANDARD_FILE,
                        reason)
    return graphdef, params


def weights_digest(state_dict: Mapping[str, np.ndarray]) -> str:
    """sha256 over the weight arrays (names, float32 values), independent of the file format."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if not k.startswith("_")
                      and not k.endswith("num_batches_tracked")):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(state_dict[key], np.float32).tobytes())
    return digest.hexdigest()


def not_standard_reason(path: str, state_dict: Mapping[str, np.ndarray]) -> str:
    """Why the weights read from `path` are not provably the standard file ("" if they are)."""
    prefix = re.search(r"-([0-9a-f]{8})\.pth$", STANDARD_FILE).group(1)
    file = epath.Path(path)
    if file.suffix != ".npz":
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        return "" if digest.startswith(prefix) else f"sha256 {digest[:8]}..., not {prefix}..."
    source_digest = str(state_dict.get("_source_sha256", ""))
    if not source_digest:
        return "the .npz does not record the digest of the file it was converted from"
    if not source_digest.startswith(prefix):
        return f"converted from a file with sha256 {source_digest[:8]}..., not {prefix}..."
    if str(state_dict.get("_weights_sha256", "")) != weights_digest(state_dict):
        return "its arrays were changed after conversion"
    return ""


def save_npz(state_dict: Mapping[str, np.ndarray], path: str, source: str = "",
             source_sha256: str = "") -> None:
    """Writes a state dict as the .npz this module reads (same keys, float32, PyTorch layout),
    with the name and sha256 of the file it came from and the digest of its arrays."""
    params_from_state_dict(state_dict)  # refuse to write a file that would not load
    arrays = {key: np.asarray(value, np.float32) for key, value in state_dict.items()
              if not key.endswith("num_batches_tracked") and not key.startswith("_")}
    buffer = io.BytesIO()
    np.savez(buffer, _source=np.array(source), _source_sha256=np.array(source_sha256),
             _weights_sha256=np.array(weights_digest(arrays)), **arrays)
    image_utils.write_atomically(path, buffer.getvalue())


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
