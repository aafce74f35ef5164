"""3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3).

A 3x3 convolution (stride 1, padding 1) of a 6x6 input tile gives a 4x4 output tile. Winograd's
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes
it as ``A^T [(G g G^T) * (B^T d B)] A``: the input tiles and the kernel are mapped by fixed
small matrices to 6x6 = 36 "frequencies", each frequency is one matrix product over channels,
and the products are mapped back. That is 36 multiplications per 16 outputs where the direct
convolution needs 144: 4x fewer FLOPs in the matrix products, for transforms that cost a few
memory passes. On XLA:CPU, with it on the 16x16 and larger layers, the DDPM CIFAR-10 net's
forward pass runs 1.4-1.7x faster than with XLA's own convolution kernels and its train step
1.1-1.2x (`docs/benchmarks.md`), so `conv_algorithm="auto"` uses it on the CPU backend.
Results differ from the direct convolution by float32 rounding (about 1e-5 relative; the
transforms' coefficients reach 1/24 and 8), so it is used for float32 only.

The gradients are Winograd convolutions too (custom VJP): the input gradient is the
convolution of the output gradient with the flipped kernel, and the kernel gradient is a
product of the same transformed input with the transformed output gradient.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (the hook `nnx.Conv`
takes): it takes the Winograd path where it applies and is known to be faster, and calls
`jax.lax.conv_general_dilated` for everything else.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# F(4, 3) on the interpolation points 0, 1, -1, 2, -2 and infinity.
INPUT_TRANSFORM = np.array([  # B^T: a 6-tap input tile -> 6 frequencies
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
], dtype=np.float64)
KERNEL_TRANSFORM = np.array([  # G: a 3-tap kernel -> 6 frequencies
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=np.float64)
OUTPUT_TRANSFORM = np.array([  # A^T: 6 frequencies -> a 4-tap output tile
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
], dtype=np.float64)
TILE = 4  # output tile side
TAPS = 6  # input tile side (TILE + 3 - 1)
# G (x) G: row 6a + b, column 3i + j holds G[a, i] G[b, j], so that the product with the
# kernel's taps (flattened the same way) gives every frequency at once.
_KERNEL_TRANSFORM_2D = np.einsum("ai,bj->abij", KERNEL_TRANSFORM,
                                 KERNEL_TRANSFORM).reshape(TAPS * TAPS, 9)

# Where the Winograd path is used by `conv_general_dilated` (measured on XLA:CPU: at 8x8 and
# below, or with few input channels, the direct convolution is as fast or faster).
MIN_SPATIAL = 16
MIN_IN_CHANNELS = 32


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


def _tiles(size: int) -> int:
    return -(-size // TILE)


def transform_input(x: jax.Array) -> jax.Array:
    """NHWC input -> [36, N * tiles_h * tiles_w, C]: ``B^T d B`` of every overlapping 6x6 tile.

    The input is zero-padded by one (the convolution's padding) and up to whole tiles.
    """
    n, height, width, channels = x.shape
    tiles_h, tiles_w = _tiles(height), _tiles(width)
    padded = jnp.pad(x, ((0, 0), (1, TILE * tiles_h + 1 - height),
                         (1, TILE * tiles_w + 1 - width), (0, 0)))
    rows = [padded[:, a:a + TILE * tiles_h:TILE] for a in range(TAPS)]
    by_rows = jnp.stack(_combine(INPUT_TRANSFORM, rows))  # [6, N, tiles_h, W + 2, C]
    cols = [by_rows[:, :, :, b:b + TILE * tiles_w:TILE] for b in range(TAPS)]
    tiles = jnp.stack(_combine(INPUT_TRANSFORM, cols), axis=1)  # [6, 6, N, tiles_h, tiles_w, C]
    return tiles.reshape(TAPS * TAPS, n * tiles_h * tiles_w, channels)


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO 3x3 kernel -> [36, I, O]: ``G g G^T``.

    One product of the constant [36, 9] matrix ``G (x) G`` with the kernel's taps, a single
    pass over the kernel. Unlike the activations' transforms (`_combine`), the kernel is
    small and the product has I x O columns: on XLA:CPU it runs about 5x faster than 36
    fused sums and their concatenation, which the forward pays on every call (the denoiser's
    forward at batch 16: 1-2% faster).
    """
    _, _, in_channels, out_channels = kernel.shape
    flat = kernel.reshape(9, in_channels * out_channels)
    return _exact_dot(_KERNEL_TRANSFORM_2D, flat).reshape(TAPS * TAPS, in_channels,
                                                          out_channels)


def transform_output(products: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """[36, N * tiles, O] -> NHWC output ``A^T m A`` of each tile, cropped to (N, H, W)."""
    n, height, width = shape
    tiles_h, tiles_w = _tiles(height), _tiles(width)
    products = products.reshape(TAPS, TAPS, n, tiles_h, tiles_w, -1)
    by_cols = [jnp.stack(_combine(OUTPUT_TRANSFORM, [products[a, b] for b in range(TAPS)]),
                         axis=3) for a in range(TAPS)]  # 6 x [N, tiles_h, tiles_w, 4, O]
    out = jnp.stack(_combine(OUTPUT_TRANSFORM, by_cols), axis=2)  # [N, tiles_h, 4, tiles_w, 4, O]
    out = out.reshape(n, TILE * tiles_h, TILE * tiles_w, -1)
    return out[:, :height, :width]


def transform_output_transpose(grad: jax.Array) -> jax.Array:
    """The transpose of `transform_output`: NHWC output gradient -> [36, N * tiles, O]."""
    n, height, width, channels = grad.shape
    tiles_h, tiles_w = _tiles(height), _tiles(width)
    grad = jnp.pad(grad, ((0, 0), (0, TILE * tiles_h - height), (0, TILE * tiles_w - width),
                          (0, 0)))
    grad = grad.reshape(n, tiles_h, TILE, tiles_w, TILE, channels)
    by_rows = jnp.stack(_combine(OUTPUT_TRANSFORM.T, [grad[:, :, r] for r in range(TILE)]))
    tiles = jnp.stack(_combine(OUTPUT_TRANSFORM.T, [by_rows[..., s, :] for s in range(TILE)]),
                      axis=1)  # [6, 6, N, tiles_h, tiles_w, O]
    return tiles.reshape(TAPS * TAPS, n * tiles_h * tiles_w, channels)


def transform_kernel_transpose(grad: jax.Array) -> jax.Array:
    """The transpose of `transform_kernel`: [36, I, O] -> HWIO 3x3 kernel gradient."""
    _, in_channels, out_channels = grad.shape
    flat = grad.reshape(TAPS * TAPS, in_channels * out_channels)
    return _exact_dot(_KERNEL_TRANSFORM_2D.T, flat).reshape(3, 3, in_channels, out_channels)


def _batched_matmul(lhs: jax.Array, rhs: jax.Array, transpose_rhs: bool = False) -> jax.Array:
    """One matrix product per frequency: [36, P, I] x [36, I, O] (or [36, O, I]) -> [36, P, O]."""
    contract = 2 if transpose_rhs else 1
    return lax.dot_general(lhs, rhs, (((2,), (contract,)), ((0,), (0,))))


def _forward(x: jax.Array, kernel: jax.Array, transpose_kernel: bool = False) -> jax.Array:
    products = _batched_matmul(transform_input(x), transform_kernel(kernel), transpose_kernel)
    return transform_output(products, x.shape[:3])


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution of NHWC `x` with HWIO `kernel`, stride 1, zero padding 1 ("SAME")."""
    return _forward(x, kernel)


def _conv3x3_forward(x: jax.Array, kernel: jax.Array):
    return _forward(x, kernel), (x, kernel)


def _conv3x3_backward(residuals, grad: jax.Array):
    x, kernel = residuals
    # Input gradient: the same convolution with the kernel flipped in space and its channel
    # axes swapped (the swap is folded into the matrix product).
    grad_x = _forward(grad, jnp.flip(kernel, (0, 1)), transpose_kernel=True)
    # Kernel gradient: per frequency, transformed input^T x transformed output gradient.
    # Transform x again rather than keep the forward's transformed input (2.25x the size of x)
    # alive until the backward pass: the barrier stops XLA from merging the two. Less memory
    # and, on XLA:CPU, faster (0.95 s against 1.06 s for the CIFAR-10 net's step at batch 8).
    x = lax.optimization_barrier(x)
    products = jnp.einsum("kpi,kpo->kio", transform_input(x), transform_output_transpose(grad))
    return grad_x, transform_kernel_transpose(products)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


def applies(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding,
            lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count: int,
            precision) -> bool:
    """Whether a `lax.conv_general_dilated` call is one `conv3x3` computes faster."""
    if lhs.ndim != 4 or rhs.shape[:2] != (3, 3) or feature_group_count != 1:
        return False
    if precision is not None or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if tuple(window_strides) != (1, 1) or isinstance(padding, str):
        return False
    if tuple(tuple(p) for p in padding) != ((1, 1), (1, 1)):
        return False
    if any(d is not None and tuple(np.broadcast_to(d, (2,))) != (1, 1)
           for d in (lhs_dilation, rhs_dilation)):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        return False
    _, height, width, channels = lhs.shape
    return min(height, width) >= MIN_SPATIAL and channels >= MIN_IN_CHANNELS


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
    """`jax.lax.conv_general_dilated`, by `conv3x3` where that applies."""
    if not kwargs.get("preferred_element_type") and not kwargs.get("out_sharding") and applies(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision):
        return conv3x3(lhs, rhs)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)
