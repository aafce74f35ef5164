"""Non-leaky augmentation (Karras et al. 2022, EDM, appendix B.5; the transforms of Karras et
al. 2020's ADA): each training image is transformed with some probability, and the net is
told how (a vector of the transforms' parameters, zero for an image left alone), so it learns
the augmented distribution as a conditional one and samples the plain one given zeros.

Each transform has a probability multiplier (0: off); with overall probability p an enabled
transform is applied to an image with probability min(1, multiplier x p), independently of
the others. The parameters are drawn as EDM's `AugmentPipe` draws them (the ranges below are
its defaults), in its order: pixel blitting (x-flip, y-flip, 90-degree rotation, integer
translation with reflection), then one geometric warp (isotropic scaling, arbitrary rotation,
anisotropic scaling, fractional translation), then one colour matrix (brightness, contrast,
luma flip, hue rotation, saturation). The vector gives each enabled transform's entries in
that order.

The warp samples the image, reflect-padded, after a 2x upsampling with the symlet-6 wavelet
filter, bilinearly on a 2x grid, then filters and decimates, as EDM does (in its frame, to
float rounding): with this orthogonal filter no warp, or a whole-pixel shift, gives the
pixels exactly. Functions here take one image [H, W, C] in [-1, 1] and its own key; the train
step maps them over the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

# name: entries in the vector, in the vector's order
LABEL_SIZES = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1,
               "rotate_frac": 2, "aniso": 2, "translate_frac": 2, "brightness": 1,
               "contrast": 1, "lumaflip": 1, "hue": 2, "saturation": 1}
TRANSFORMS = tuple(LABEL_SIZES)
GEOMETRIC = ("scale", "rotate_frac", "aniso", "translate_frac")
COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")

# EDM's AugmentPipe defaults
TRANSLATE_INT_MAX = 0.125  # integer translation range, a fraction of the side
SCALE_STD = 0.2  # log2 std of isotropic scaling
ROTATE_FRAC_MAX = 1.0  # range of arbitrary rotation, 1 = the full circle
ANISO_STD = 0.2  # log2 std of anisotropic scaling
ANISO_ROTATE_PROB = 0.5  # chance the anisotropic scaling is along rotated axes
TRANSLATE_FRAC_STD = 0.125  # std of fractional translation, a fraction of the side
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5  # log2
HUE_MAX = 1.0  # 1 = the full circle
SATURATION_STD = 1.0  # log2

# The symlet-6 low-pass decomposition filter (as listed by PyWavelets and EDM).
SYM6 = np.array([0.015404109327027373, 0.0034907120842174702, -0.11799011114819057,
                 -0.048311742585633, 0.4910559419267466, 0.787641141030194,
                 0.3379294217276218, -0.07263752278646252, -0.021060292512300564,
                 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148])
FILTER_MARGIN = len(SYM6) // 4  # output pixels computed beyond each side, then cropped
LUMA_AXIS = np.array([1.0, 1.0, 1.0, 0.0]) / np.sqrt(3)


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """`probability` (EDM's p) and the multiplier of each enabled transform, in order."""

    probability: float
    multipliers: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, probability: float, multipliers: Mapping[str, float]) -> AugmentSettings:
        unknown = sorted(set(multipliers) - set(TRANSFORMS))
        if unknown:
            raise ValueError(f"unknown augmentations {unknown}; known: {', '.join(TRANSFORMS)}")
        return cls(float(probability), tuple((name, float(multipliers[name]))
                                             for name in TRANSFORMS
                                             if multipliers.get(name, 0.0) > 0))

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.multipliers)

    @property
    def label_dim(self) -> int:
        return label_dim(self.enabled)


def settings_of(section: Mapping[str, float]) -> AugmentSettings | None:
    """The settings of a mapping with `probability` and transforms' multipliers (a config's
    `data.augment`; absent transforms are off); None when the probability is 0."""
    probability = section.get("probability", 0.0)
    if not probability:
        return None
    return AugmentSettings.of(probability, {name: section.get(name, 0.0) for name in TRANSFORMS})


def label_dim(enabled: tuple[str, ...] | list[str]) -> int:
    """Entries of the vector the net is told, for these transforms."""
    return sum(LABEL_SIZES[name] for name in enabled)


def draw(key: jax.Array, settings: AugmentSettings, height: int, width: int
         ) -> dict[str, jax.Array]:
    """One image's parameters: per enabled transform, its draw (zero where the transform is
    not applied), as EDM draws it. Each transform draws from its own key, so enabling one
    leaves the others' draws alone."""
    params = {}
    for name, multiplier in settings.multipliers:
        k_gate, k_value, k_extra = jax.random.split(jax.random.fold_in(key, TRANSFORMS.index(name)), 3)
        applied = jax.random.uniform(k_gate) < multiplier * settings.probability
        if name in ("xflip", "yflip", "lumaflip"):
            value = jax.random.randint(k_value, (), 0, 2)
        elif name == "rotate_int":
            value = jax.random.randint(k_value, (), 0, 4)
        elif name == "translate_int":
            value = jax.random.uniform(k_value, (2,), minval=-1.0, maxval=1.0)
        elif name == "translate_frac":
            value = jax.random.normal(k_value, (2,))
        elif name == "rotate_frac":
            value = jax.random.uniform(k_value, (), minval=-1.0, maxval=1.0) * np.pi * ROTATE_FRAC_MAX
        elif name == "hue":
            value = jax.random.uniform(k_value, (), minval=-1.0, maxval=1.0) * np.pi * HUE_MAX
        else:  # scale, aniso, brightness, contrast, saturation: log-normal or normal
            value = jax.random.normal(k_value, ())
        params[name] = jnp.where(applied, value, jnp.zeros_like(value))
        if name == "translate_int":  # whole pixels
            params[name] = jnp.round(params[name] * jnp.array([width, height]) * TRANSLATE_INT_MAX)
        if name == "aniso":  # the axes: rotated by r with probability ANISO_ROTATE_PROB
            k_rotate, k_angle = jax.random.split(k_extra)
            angle = jax.random.uniform(k_angle, (), minval=-1.0, maxval=1.0) * np.pi
            params["aniso_angle"] = jnp.where(
                jax.random.uniform(k_rotate) < ANISO_ROTATE_PROB, angle, 0.0)
    return params


def labels(params: dict[str, jax.Array], settings: AugmentSettings, height: int, width: int
           ) -> jax.Array:
    """The vector the net is told [label_dim], EDM's `augment_labels`: zero for an image
    left alone."""
    parts = []
    for name in settings.enabled:
        w = params[name].astype(jnp.float32)
        if name == "rotate_int":
            parts += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        elif name == "translate_int":
            parts += [w[0] / (width * TRANSLATE_INT_MAX), w[1] / (height * TRANSLATE_INT_MAX)]
        elif name in ("rotate_frac", "hue"):
            parts += [jnp.cos(w) - 1, jnp.sin(w)]
        elif name == "aniso":
            angle = params["aniso_angle"]
            parts += [w * jnp.cos(angle), w * jnp.sin(angle)]
        elif name == "translate_frac":
            parts += [w[0], w[1]]
        else:
            parts.append(w)
    return jnp.stack([jnp.asarray(p, jnp.float32) for p in parts])


def augment(key: jax.Array, image: jax.Array, settings: AugmentSettings
            ) -> tuple[jax.Array, jax.Array]:
    """(augmented image, its label vector) of one image [H, W, C] in [-1, 1]."""
    height, width = image.shape[:2]
    params = draw(key, settings, height, width)
    image = blit(image, params)
    if any(name in params for name in GEOMETRIC):
        image = warp(image, warp_matrix(params, height, width))
    if any(name in params for name in COLOUR):
        matrix = colour_matrix(params)
        image = image @ matrix[:3, :3].T + matrix[:3, 3]
    return image, labels(params, settings, height, width)


def blit(image: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """The pixel-moving transforms: flips, quarter turns (square images) and whole-pixel
    translation with the image reflected at its borders."""
    height, width = image.shape[:2]
    if "xflip" in params:
        image = jnp.where(params["xflip"] == 1, image[:, ::-1], image)
    if "yflip" in params:
        image = jnp.where(params["yflip"] == 1, image[::-1], image)
    if "rotate_int" in params:
        turn = params["rotate_int"]
        image = jnp.where((turn == 1) | (turn == 2), image[:, ::-1], image)
        image = jnp.where((turn == 2) | (turn == 3), image[::-1], image)
        image = jnp.where((turn == 1) | (turn == 3), jnp.swapaxes(image, 0, 1), image)
    if "translate_int" in params:
        tx, ty = params["translate_int"].astype(jnp.int32)
        x, y = jnp.arange(width), jnp.arange(height)
        # reflected indices: x - tx and y + ty folded back into the image (as EDM)
        x = width - 1 - jnp.abs(width - 1 - jnp.mod(x - tx, 2 * width - 2))
        y = height - 1 - jnp.abs(height - 1 - jnp.mod(y + ty, 2 * height - 2))
        image = image[y][:, x]
    return image


def _rotation(angle: jax.Array) -> jax.Array:
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])


def _scaling(sx: jax.Array, sy: jax.Array) -> jax.Array:
    return jnp.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def warp_matrix(params: dict[str, jax.Array], height: int, width: int) -> jax.Array:
    """G^-1 [3, 3]: for an output pixel's position (x right, y down, in pixels, from the
    origin `warp` uses), the input position it shows."""
    g_inv = jnp.eye(3)
    if "scale" in params:
        s = 2.0 ** (params["scale"] * SCALE_STD)
        g_inv = g_inv @ _scaling(1 / s, 1 / s)
    if "rotate_frac" in params:
        g_inv = g_inv @ _rotation(params["rotate_frac"])
    if "aniso" in params:
        s, r = 2.0 ** (params["aniso"] * ANISO_STD), params["aniso_angle"]
        g_inv = g_inv @ _rotation(-r) @ _scaling(1 / s, s) @ _rotation(r)
    if "translate_frac" in params:
        shift = params["translate_frac"] * jnp.array([width, height]) * TRANSLATE_FRAC_STD
        g_inv = g_inv @ jnp.array([[1.0, 0.0, -shift[0]], [0.0, 1.0, -shift[1]], [0, 0, 1.0]])
    return g_inv


def _correlate(x: jax.Array, weights: np.ndarray, pad: int, axis: int) -> jax.Array:
    """out[n] = sum_m weights[m] x_padded[n + m] along `axis` (x zero-padded by `pad`)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    padded = jnp.pad(x, widths)
    length = x.shape[axis] + 2 * pad - len(weights) + 1
    return sum(float(w) * jax.lax.slice_in_dim(padded, m, m + length, axis=axis)
               for m, w in enumerate(weights))


def _upsample(x: jax.Array, axis: int) -> jax.Array:
    """2x along `axis`: zeros between samples, then the filter; sample n of the result lies
    at input position (n - 1/2) / 2."""
    length = x.shape[axis]
    shape = list(x.shape)
    shape[axis] = 2 * length - 1
    index = [slice(None)] * x.ndim
    index[axis] = slice(None, None, 2)
    spread = jnp.zeros(shape, x.dtype).at[tuple(index)].set(x)
    return _correlate(spread, SYM6[::-1], (len(SYM6) + 1) // 2, axis)


def _downsample(x: jax.Array, axis: int) -> jax.Array:
    """The filter, then every second sample: the inverse of `_upsample`'s positions."""
    filtered = _correlate(x, SYM6, (len(SYM6) - 1) // 2, axis)
    return jax.lax.slice_in_dim(filtered, 0, None, stride=2, axis=axis)


def warp(image: jax.Array, g_inv: jax.Array) -> jax.Array:
    """The image [H, W, C] seen through G^-1 (`warp_matrix`): reflect-padded by a side
    (EDM's largest margin), upsampled 2x, sampled bilinearly (zero outside) on a 2x grid of
    the output and FILTER_MARGIN pixels around it, filtered and decimated, cropped."""
    height, width, _ = image.shape
    pad_y, pad_x, margin = height - 1, width - 1, FILTER_MARGIN
    padded = jnp.pad(image, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    upsampled = _upsample(_upsample(padded, 0), 1)
    # the origin of G^-1's frame: EDM's, a quarter pixel up and left of the image centre
    # (where its half-sample shift of the 2x grid puts it)
    centre_y, centre_x = (height - 1) / 2 - 0.25, (width - 1) / 2 - 0.25
    # output pixel position of each sample of the 2x grid, from that origin
    ys = (jnp.arange(2 * (height + 2 * margin)) - 0.5) / 2 - margin - centre_y
    xs = (jnp.arange(2 * (width + 2 * margin)) - 0.5) / 2 - margin - centre_x
    grid_y, grid_x = jnp.meshgrid(ys, xs, indexing="ij")
    source_x = g_inv[0, 0] * grid_x + g_inv[0, 1] * grid_y + g_inv[0, 2]
    source_y = g_inv[1, 0] * grid_x + g_inv[1, 1] * grid_y + g_inv[1, 2]
    # their indices in the upsampled, padded image (position p lies at index 2 p + 1/2)
    rows = 2 * (source_y + centre_y + pad_y) + 0.5
    cols = 2 * (source_x + centre_x + pad_x) + 0.5
    sampled = jnp.stack([ndimage.map_coordinates(upsampled[..., c], [rows, cols], order=1,
                                                 mode="constant", cval=0.0)
                         for c in range(image.shape[-1])], axis=-1)
    out = _downsample(_downsample(sampled, 0), 1)
    return out[margin:margin + height, margin:margin + width]


def colour_matrix(params: dict[str, jax.Array]) -> jax.Array:
    """The 4x4 colour transform (RGB and 1), applied after the warp."""
    eye = jnp.eye(4)
    luma = jnp.outer(LUMA_AXIS, LUMA_AXIS)
    matrix = eye
    if "brightness" in params:
        b = params["brightness"] * BRIGHTNESS_STD
        matrix = eye.at[:3, 3].set(b) @ matrix
    if "contrast" in params:
        c = 2.0 ** (params["contrast"] * CONTRAST_STD)
        matrix = jnp.diag(jnp.array([1.0, 1.0, 1.0, 1.0]).at[:3].set(c)) @ matrix
    if "lumaflip" in params:
        matrix = (eye - 2 * luma * params["lumaflip"]) @ matrix
    if "hue" in params:
        matrix = _axis_rotation(LUMA_AXIS, params["hue"]) @ matrix
    if "saturation" in params:
        matrix = (luma + (eye - luma) * 2.0 ** (params["saturation"] * SATURATION_STD)) @ matrix
    return matrix


def _axis_rotation(axis: np.ndarray, angle: jax.Array) -> jax.Array:
    """Rotation by `angle` about the unit vector `axis` (x, y, z; Rodrigues), as a 4x4."""
    x, y, z = (float(v) for v in axis[:3])
    s, c = jnp.sin(angle), jnp.cos(angle)
    cc = 1 - c
    return jnp.array([
        [x * x * cc + c, x * y * cc - z * s, x * z * cc + y * s, 0.0],
        [y * x * cc + z * s, y * y * cc + c, y * z * cc - x * s, 0.0],
        [z * x * cc - y * s, z * y * cc + x * s, z * z * cc + c, 0.0],
        [0.0, 0.0, 0.0, 1.0]])
