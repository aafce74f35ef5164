"""Direct convolutions whose gradients XLA:CPU runs with its fast kernels inside loops too.

XLA:CPU computes a convolution with its fast (Eigen) kernel only in one layout: NHWC input,
HWIO kernel, NHWC output. Autodiff expresses a convolution's gradients as convolutions in
other layouts (the kernel gradient treats the batch as the contracted feature), and XLA:CPU
rewrites those into the fast layout with explicit transposes, but only in a program's top
level: inside a loop body (`lax.scan`, `lax.fori_loop`) they stay as they are and run on a
generic loop, many times slower (docs/performance-notes.md).

`conv_nhwc` is the same convolution with a custom VJP that writes both gradients in the fast
layout itself, transposing the operands behind `optimization_barrier`s (XLA would otherwise
fold the transposes back into the convolution's dimension numbers). The gradients are the
same sums as autodiff's, in the same order (equal to the last bit in the tests). With it the
train step runs inside a loop at full speed, which lets the train step run several steps
per call (`config.steps_per_dispatch`) and in chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")

Padding = tuple[tuple[int, int], ...]


def plain_nhwc(lhs: jax.Array, rhs: jax.Array, padding, lhs_dilation, rhs_dilation,
               dimension_numbers, feature_group_count: int, precision, **kwargs) -> bool:
    """Whether a `lax.conv_general_dilated` call is a plain 2-D NHWC x HWIO convolution:
    explicit padding, no dilation, no feature groups, default precision and output type."""
    if lhs.ndim != 4 or feature_group_count != 1 or precision is not None or any(kwargs.values()):
        return False
    if isinstance(padding, str):
        return False
    if any(d is not None and tuple(np.broadcast_to(d, (2,))) != (1, 1)
           for d in (lhs_dilation, rhs_dilation)):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: Padding) -> jax.Array:
    """NHWC `x` convolved with HWIO `kernel` (`lax.conv_general_dilated`), its gradients in
    XLA:CPU's fast layout."""
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _conv_nhwc_forward(x, kernel, strides, padding):
    return conv_nhwc(x, kernel, strides, padding), (x, kernel)


def _conv_nhwc_backward(strides, padding, residuals, grad):
    x, kernel = residuals
    windows = kernel.shape[:2]
    in_sizes, out_sizes = x.shape[1:3], grad.shape[1:3]
    # Input gradient: the output gradient, dilated by the strides, convolved with the kernel
    # flipped in space and with its channel axes swapped; padded so that it covers the input.
    input_padding = [(k - 1 - low, n - 1 - (m - 1) * s + low)
                     for k, (low, _), n, m, s in zip(windows, padding, in_sizes, out_sizes,
                                                     strides, strict=True)]
    flipped = lax.optimization_barrier(jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3))
    grad_x = lax.conv_general_dilated(grad, flipped, (1, 1), input_padding,
                                      lhs_dilation=strides, dimension_numbers=NHWC)
    # Kernel gradient: the input with batch and channels swapped ([C, H, W, N]) convolved
    # with the output gradient as a kernel ([H', W', N, O], dilated by the strides); the
    # result [C, kh, kw, O] is the HWIO gradient transposed.
    kernel_padding = [(low, k - n - low + (m - 1) * s)
                      for k, (low, _), n, m, s in zip(windows, padding, in_sizes, out_sizes,
                                                      strides, strict=True)]
    x_t, grad_t = lax.optimization_barrier(
        (jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(grad, (1, 2, 0, 3))))
    grad_kernel = lax.conv_general_dilated(x_t, grad_t, (1, 1), kernel_padding,
                                           rhs_dilation=strides, dimension_numbers=NHWC)
    return grad_x, jnp.transpose(lax.optimization_barrier(grad_kernel), (1, 2, 0, 3))


conv_nhwc.defvjp(_conv_nhwc_forward, _conv_nhwc_backward)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
    """`jax.lax.conv_general_dilated`, by `conv_nhwc` for plain NHWC convolutions on the CPU
    backend (other backends choose their own gradient layouts)."""
    if jax.default_backend() == "cpu" and plain_nhwc(
            lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision, **kwargs):
        return conv_nhwc(lhs, rhs, tuple(window_strides),
                         tuple((int(low), int(high)) for low, high in padding))
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)
