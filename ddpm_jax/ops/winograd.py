"""3x3 convolutions by Winograd's minimal filtering algorithms F(4x4, 3x3) and F(2x2, 3x3).

A 3x3 convolution (stride 1, padding 1) of a 6x6 input tile gives a 4x4 output tile. Winograd's
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes
it as ``A^T [(G g G^T) * (B^T d B)] A``: the input tiles and the kernel are mapped by fixed
small matrices to 6x6 = 36 "frequencies", each frequency is one matrix product over channels,
and the products are mapped back. That is 36 multiplications per 16 outputs where the direct
convolution needs 144: 4x fewer FLOPs in the matrix products, for transforms that cost a few
memory passes. F(2x2, 3x3) does the same with 4x4 input tiles and 16 frequencies per 2x2
output tile (2.25x fewer FLOPs); on small maps its products have 4x more rows than F(4x4)'s,
which keeps them efficient. On XLA:CPU both are faster than its own convolution kernels for
the DDPM net (docs/benchmarks.md), so `conv_algorithm="auto"` uses them on the CPU backend.
Results differ from the direct convolution by float32 rounding (about 1e-5 relative for
F(4x4), whose coefficients reach 1/24 and 8; about 1e-7 for F(2x2)), so it is used for
float32 only.

The gradients are Winograd convolutions too (custom VJP): the input gradient is the
convolution of the output gradient with the flipped kernel, and the kernel gradient is a
product of the same transformed input with the transformed output gradient.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (the hook `nnx.Conv`
takes): it takes a Winograd path where one applies and is known to be faster, and calls
`conv.conv_general_dilated` for everything else. `upsample_conv3x3` computes nearest x2
upsampling then a 3x3 convolution as one F(4x4) convolution of the small map, and
`upsample_conv` uses it as the net's `LayerOps.upsample_conv`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ddpm_jax.models import layers
from ddpm_jax.ops import conv


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
    """Winograd's F(m x m, 3 x 3): its three transform matrices.

    ``output_transform @ ((kernel_transform @ g) * (input_transform @ d))`` is the m outputs of
    correlating an (m + 2)-tap signal d with a 3-tap kernel g; applied along both axes of a
    tile it gives an m x m output tile from (m + 2)^2 products.
    """

    name: str
    input_transform: np.ndarray  # B^T: [taps, taps], an input tile -> frequencies
    kernel_transform: np.ndarray  # G: [taps, 3], a kernel -> frequencies
    output_transform: np.ndarray  # A^T: [tile, taps], frequencies -> an output tile
    min_spatial: int  # smallest map side `conv_general_dilated` uses it for

    @property
    def tile(self) -> int:
        """Output tile side m."""
        return self.output_transform.shape[0]

    @property
    def taps(self) -> int:
        """Input tile side m + 2, also the number of frequencies per axis."""
        return self.output_transform.shape[1]

    @functools.cached_property
    def kernel_transform_2d(self) -> np.ndarray:
        """G (x) G: row ``taps * a + b``, column ``3 i + j`` holds G[a, i] G[b, j], so that the
        product with the kernel's taps (flattened the same way) gives every frequency at once."""
        return np.einsum("ai,bj->abij", self.kernel_transform, self.kernel_transform).reshape(
            self.taps * self.taps, 9)


# F(4, 3) on the interpolation points 0, 1, -1, 2, -2 and infinity: 36 products per 16
# outputs (4x fewer than direct), coefficients up to 8 and down to 1/24.
F4 = Algorithm(
    name="F(4x4, 3x3)",
    input_transform=np.array([
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ], dtype=np.float64),
    kernel_transform=np.array([
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ], dtype=np.float64),
    output_transform=np.array([
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ], dtype=np.float64),
    min_spatial=16,
)
# F(2, 3) on the points 0, 1, -1 and infinity: 16 products per 4 outputs (2.25x fewer than
# direct), coefficients 1 and 1/2 (rounding as small as the direct convolution's). For small
# maps, where F(4, 3)'s 4x4 tiles leave few rows in each product.
F2 = Algorithm(
    name="F(2x2, 3x3)",
    input_transform=np.array([
        [1, 0, -1, 0],
        [0, 1, 1, 0],
        [0, -1, 1, 0],
        [0, 1, 0, -1],
    ], dtype=np.float64),
    kernel_transform=np.array([
        [1, 0, 0],
        [1 / 2, 1 / 2, 1 / 2],
        [1 / 2, -1 / 2, 1 / 2],
        [0, 0, 1],
    ], dtype=np.float64),
    output_transform=np.array([
        [1, 1, 1, 0],
        [0, 1, -1, -1],
    ], dtype=np.float64),
    min_spatial=4,
)

# What `conv_general_dilated` takes, first match by `min_spatial`: F(4, 3) from 16x16, F(2, 3)
# on 4x4 and 8x8 maps. With fewer input or output channels the per-frequency products are too
# thin to beat the direct convolution (docs/performance-notes.md).
ALGORITHMS = (F4, F2)
MIN_CHANNELS = 32


def _combine(matrix: np.ndarray, terms: Sequence[jax.Array]) -> list[jax.Array]:
    """Rows of ``matrix @ terms`` written out as sums, skipping zero coefficients.

    The transforms are tiny, sparse, constant matrices: as element-wise sums XLA fuses them
    into one memory pass, where a dot with a 6-long contraction would be a slow library call.
    """
    rows = []
    for coefficients in matrix:
        total = None
        for coefficient, term in zip(coefficients, terms, strict=True):
            if coefficient == 0:
                continue
            scaled = term if coefficient == 1 else term * jnp.asarray(coefficient, term.dtype)
            total = scaled if total is None else total + scaled
        rows.append(total)
    return rows


def _exact_dot(matrix: np.ndarray, values: jax.Array) -> jax.Array:
    """``matrix @ values`` for a small constant matrix, in the values' dtype at full precision
    (no reduced-precision passes on accelerators)."""
    return jnp.dot(jnp.asarray(matrix, values.dtype), values, precision=lax.Precision.HIGHEST)


def _tiles(size: int, algorithm: Algorithm) -> int:
    return -(-size // algorithm.tile)


def transform_input(x: jax.Array, algorithm: Algorithm = F4) -> jax.Array:
    """NHWC input -> [taps^2, N * tiles_h * tiles_w, C]: ``B^T d B`` of every overlapping
    input tile.

    The input is zero-padded by one (the convolution's padding) and up to whole tiles.
    """
    n, height, width, channels = x.shape
    tile, taps = algorithm.tile, algorithm.taps
    tiles_h, tiles_w = _tiles(height, algorithm), _tiles(width, algorithm)
    padded = jnp.pad(x, ((0, 0), (1, tile * tiles_h + 1 - height),
                         (1, tile * tiles_w + 1 - width), (0, 0)))
    rows = [padded[:, a:a + tile * tiles_h:tile] for a in range(taps)]
    # [taps, N, tiles_h, W + 2, C]
    by_rows = jnp.stack(_combine(algorithm.input_transform, rows))
    cols = [by_rows[:, :, :, b:b + tile * tiles_w:tile] for b in range(taps)]
    # [taps, taps, N, tiles_h, tiles_w, C]
    tiles = jnp.stack(_combine(algorithm.input_transform, cols), axis=1)
    return tiles.reshape(taps * taps, n * tiles_h * tiles_w, channels)


def transform_kernel(kernel: jax.Array, algorithm: Algorithm = F4) -> jax.Array:
    """HWIO 3x3 kernel -> [taps^2, I, O]: ``G g G^T``.

    One product of the constant [taps^2, 9] matrix ``G (x) G`` with the kernel's taps, a
    single pass over the kernel. Unlike the activations' transforms (`_combine`), the kernel
    is small and the product has I x O columns: on XLA:CPU it runs faster than fused sums and
    their concatenation, which the forward pays on every call (docs/performance-notes.md).
    """
    _, _, in_channels, out_channels = kernel.shape
    flat = kernel.reshape(9, in_channels * out_channels)
    return _exact_dot(algorithm.kernel_transform_2d, flat).reshape(
        algorithm.taps ** 2, in_channels, out_channels)


def transform_output(products: jax.Array, shape: tuple[int, int, int],
                     algorithm: Algorithm = F4) -> jax.Array:
    """[taps^2, N * tiles, O] -> NHWC output ``A^T m A`` of each tile, cropped to (N, H, W)."""
    n, height, width = shape
    tile, taps = algorithm.tile, algorithm.taps
    tiles_h, tiles_w = _tiles(height, algorithm), _tiles(width, algorithm)
    products = products.reshape(taps, taps, n, tiles_h, tiles_w, -1)
    by_cols = [jnp.stack(_combine(algorithm.output_transform,
                                  [products[a, b] for b in range(taps)]), axis=3)
               for a in range(taps)]  # taps x [N, tiles_h, tiles_w, tile, O]
    # [N, tiles_h, tile, tiles_w, tile, O]
    out = jnp.stack(_combine(algorithm.output_transform, by_cols), axis=2)
    out = out.reshape(n, tile * tiles_h, tile * tiles_w, -1)
    return out[:, :height, :width]


def transform_output_transpose(grad: jax.Array, algorithm: Algorithm = F4) -> jax.Array:
    """The transpose of `transform_output`: NHWC output gradient -> [taps^2, N * tiles, O]."""
    n, height, width, channels = grad.shape
    tile, taps = algorithm.tile, algorithm.taps
    tiles_h, tiles_w = _tiles(height, algorithm), _tiles(width, algorithm)
    grad = jnp.pad(grad, ((0, 0), (0, tile * tiles_h - height), (0, tile * tiles_w - width),
                          (0, 0)))
    grad = grad.reshape(n, tiles_h, tile, tiles_w, tile, channels)
    transposed = algorithm.output_transform.T
    by_rows = jnp.stack(_combine(transposed, [grad[:, :, r] for r in range(tile)]))
    # [taps, taps, N, tiles_h, tiles_w, O]
    tiles = jnp.stack(_combine(transposed, [by_rows[..., s, :] for s in range(tile)]), axis=1)
    return tiles.reshape(taps * taps, n * tiles_h * tiles_w, channels)


def transform_kernel_transpose(grad: jax.Array, algorithm: Algorithm = F4) -> jax.Array:
    """The transpose of `transform_kernel`: [taps^2, I, O] -> HWIO 3x3 kernel gradient."""
    _, in_channels, out_channels = grad.shape
    flat = grad.reshape(algorithm.taps ** 2, in_channels * out_channels)
    return _exact_dot(algorithm.kernel_transform_2d.T, flat).reshape(3, 3, in_channels,
                                                                     out_channels)


def _batched_matmul(lhs: jax.Array, rhs: jax.Array, transpose_rhs: bool = False) -> jax.Array:
    """One matrix product per frequency: [F, P, I] x [F, I, O] (or [F, O, I]) -> [F, P, O]."""
    contract = 2 if transpose_rhs else 1
    return lax.dot_general(lhs, rhs, (((2,), (contract,)), ((0,), (0,))))


def _forward(x: jax.Array, kernel: jax.Array, algorithm: Algorithm,
             transpose_kernel: bool = False) -> jax.Array:
    products = _batched_matmul(transform_input(x, algorithm), transform_kernel(kernel, algorithm),
                               transpose_kernel)
    return transform_output(products, x.shape[:3], algorithm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, kernel: jax.Array, algorithm: Algorithm = F4) -> jax.Array:
    """3x3 convolution of NHWC `x` with HWIO `kernel`, stride 1, zero padding 1 ("SAME"),
    by `algorithm` (`F4` or `F2`)."""
    return _forward(x, kernel, algorithm)


def _conv3x3_forward(x: jax.Array, kernel: jax.Array, algorithm: Algorithm):
    return _forward(x, kernel, algorithm), (x, kernel)


def _conv3x3_backward(algorithm: Algorithm, residuals, grad: jax.Array):
    x, kernel = residuals
    # Input gradient: the same convolution with the kernel flipped in space and its channel
    # axes swapped (the swap is folded into the matrix product).
    grad_x = _forward(grad, jnp.flip(kernel, (0, 1)), algorithm, transpose_kernel=True)
    # Kernel gradient: per frequency, transformed input^T x transformed output gradient.
    # Transform x again rather than keep the forward's transformed input (2.25x the size of x
    # for F4) alive until the backward pass: the barrier stops XLA from merging the two. Less
    # memory and, on XLA:CPU, faster (docs/performance-notes.md).
    x = lax.optimization_barrier(x)
    products = jnp.einsum("kpi,kpo->kio", transform_input(x, algorithm),
                          transform_output_transpose(grad, algorithm))
    return grad_x, transform_kernel_transpose(products, algorithm)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


def algorithm_for(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding,
                  lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count: int,
                  precision, **kwargs) -> Algorithm | None:
    """The Winograd algorithm that computes this `lax.conv_general_dilated` call faster, if any."""
    if not conv.plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                           feature_group_count, precision, **kwargs):
        return None
    if rhs.shape[:2] != (3, 3) or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return None
    if tuple(window_strides) != (1, 1) or tuple(tuple(p) for p in padding) != ((1, 1), (1, 1)):
        return None
    _, height, width, channels = lhs.shape
    if min(channels, rhs.shape[3]) < MIN_CHANNELS:
        return None
    return next((algorithm for algorithm in ALGORITHMS
                 if min(height, width) >= algorithm.min_spatial), None)


# Nearest-neighbour x2 upsampling then a 3x3 convolution, per output phase: output row 2i + a
# reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows i - 1 .. i + 1 with the kernel's
# rows combined as below ([phase a, input row offset + 1, kernel row]; the same for columns).
_UPSAMPLE_TAPS = np.array([
    [[1, 0, 0], [0, 1, 1], [0, 0, 0]],  # even rows: row i - 1 gets k0, row i gets k1 + k2
    [[0, 0, 0], [1, 1, 0], [0, 0, 1]],  # odd rows: row i gets k0 + k1, row i + 1 gets k2
], dtype=np.float32)


def upsample_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO [3, 3, I, O] -> [3, 3, I, 4 O]: the kernel that, applied to a map before nearest x2
    upsampling, gives the four output phases (row parity, column parity, O) of the kernel
    applied after it. Each tap is a sum of 1 to 4 of the kernel's taps."""
    _, _, in_channels, out_channels = kernel.shape
    taps = jnp.asarray(_UPSAMPLE_TAPS, kernel.dtype)
    combined = jnp.einsum("aui,bvj,ijco->uvcabo", taps, taps, kernel,
                          precision=lax.Precision.HIGHEST)
    return combined.reshape(3, 3, in_channels, 4 * out_channels)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array | None:
    """``conv3x3(nearest_upsample_x2(x), kernel)`` ("SAME" padding) computed on `x` itself, or
    None where Winograd's F(4x4, 3x3) does not apply to `x` (then upsample and convolve).

    One F(4x4) convolution of the small map with the four phases' kernels (`upsample_kernel`)
    as 4 O output channels, then the phases interleaved: the same product FLOPs as convolving
    the upsampled map (9 taps of which 4 are nonzero per phase, at 4x fewer positions), but
    the input transforms run over a map 4x smaller and the upsampled map is never written.
    """
    combined_shape = jax.ShapeDtypeStruct(kernel.shape[:3] + (4 * kernel.shape[3],), kernel.dtype)
    if algorithm_for(x, combined_shape, (1, 1), ((1, 1), (1, 1)), None, None, conv.NHWC, 1,
                     None) is not F4:
        return None
    return _upsample_conv3x3(x, kernel)


def upsample_conv(conv_layer: nnx.Conv, x: jax.Array) -> jax.Array:
    """`LayerOps.upsample_conv` by `upsample_conv3x3` where F(4x4) applies, else upsample then
    `conv_layer` (which runs its own convolution)."""
    x_in, kernel, bias = conv_layer.promote_dtype(
        (x, conv_layer.kernel[...], conv_layer.bias[...]), dtype=conv_layer.dtype)
    y = upsample_conv3x3(x_in, kernel)
    if y is None:
        return layers.upsample_then_conv(conv_layer, x)
    return y + bias


def _upsample_then_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return conv3x3(layers.upsample_nearest2x(x), kernel, F4)


@jax.custom_vjp
def _upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    n, height, width, _ = x.shape
    phases = conv3x3(x, upsample_kernel(kernel), F4).reshape(n, height, width, 2, 2, -1)
    return phases.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * height, 2 * width, -1)


def _upsample_conv3x3_forward(x: jax.Array, kernel: jax.Array):
    return _upsample_conv3x3(x, kernel), (x, kernel)


def _upsample_conv3x3_backward(residuals, grad: jax.Array):
    # The gradients of upsampling then convolving (the same function): through the phase
    # kernels the train step was slower (docs/performance-notes.md), while the forward gains.
    _, vjp = jax.vjp(_upsample_then_conv3x3, *residuals)
    return vjp(grad)


_upsample_conv3x3.defvjp(_upsample_conv3x3_forward, _upsample_conv3x3_backward)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
    """`jax.lax.conv_general_dilated`, by `conv3x3` where that applies, else by
    `conv.conv_general_dilated`."""
    algorithm = algorithm_for(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count, precision, **kwargs)
    if algorithm is not None:
        return conv3x3(lhs, rhs, algorithm)
    return conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)
