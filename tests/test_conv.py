"""Direct convolutions with gradients in XLA:CPU's fast layout (`ddpm_jax/ops/conv.py`)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.ops import conv

# (input NHWC, kernel HWIO, strides, padding): the net's stem and downsampling convolutions,
# 1x1 projections, and odd shapes where the gradients' paddings come out negative.
CASES = [
    ((2, 9, 9, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 6), (3, 3, 6, 4), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 7, 5), (3, 3, 5, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((0, 0), (0, 0))),
    ((2, 8, 6, 4), (3, 3, 4, 4), (2, 1), ((0, 1), (2, 0))),
    ((2, 5, 5, 4), (1, 1, 4, 7), (1, 1), ((0, 0), (0, 0))),
    ((1, 10, 9, 2), (5, 3, 2, 3), (3, 2), ((2, 1), (0, 0))),
]


def lax_conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=conv.NHWC)


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES)
def test_gradients_are_the_convolutions_adjoints_and_match_autodiff(x_shape, kernel_shape,
                                                                    strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
    out, vjp = jax.vjp(jax.jit(lambda a, b: conv.conv_nhwc(a, b, strides, padding)), x, kernel)
    want_out, want_vjp = jax.vjp(lambda a, b: lax_conv(a, b, strides, padding), x, kernel)
    np.testing.assert_array_equal(out, want_out)
    grad = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    grad_x, grad_kernel = vjp(grad)
    # The convolution is linear in each argument: <conv(x, k), g> = <x, dx> = <k, dk>.
    total = float(jnp.vdot(out, grad))
    np.testing.assert_allclose(float(jnp.vdot(x, grad_x)), total, rtol=1e-4)
    np.testing.assert_allclose(float(jnp.vdot(kernel, grad_kernel)), total, rtol=1e-4)
    want_x, want_kernel = want_vjp(grad)
    scale = float(jnp.max(jnp.abs(want_kernel)))
    np.testing.assert_allclose(grad_x, want_x, rtol=1e-5, atol=1e-5 * float(jnp.max(want_x)))
    np.testing.assert_allclose(grad_kernel, want_kernel, rtol=1e-5, atol=1e-5 * scale)


def convolution_layouts(hlo: str) -> list[str]:
    return re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} convolution\(.*?dim_labels=([\w>-]+)", hlo)


@pytest.mark.tied_to_jaxlib  # reads XLA:CPU's compiled HLO text, whose format jaxlib may change
def test_gradients_inside_a_loop_use_the_fast_layout():
    """XLA:CPU rewrites convolutions into its fast NHWC x HWIO layout only outside loops;
    `conv_nhwc`'s gradients are in that layout already, so a `lax.scan` of train steps runs
    every convolution with the fast kernel."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)

    def steps(conv_fn):
        def loss(x, kernel):
            return jnp.sum(conv_fn(x, kernel, (2, 2), ((1, 1), (1, 1))) ** 2)

        def body(carry, _):
            grads = jax.grad(loss, (0, 1))(*carry)
            return jax.tree.map(lambda value, grad: value - 1e-3 * grad, carry, grads), None
        return jax.jit(lambda x, kernel: jax.lax.scan(body, (x, kernel), None, length=3)[0])

    hlo = steps(conv.conv_nhwc).lower(x, kernel).compile().as_text()
    layouts = convolution_layouts(hlo)
    assert len(layouts) == 3  # forward, input gradient, kernel gradient
    assert set(layouts) == {"b01f_01io->b01f"}
    for got, want in zip(steps(conv.conv_nhwc)(x, kernel), steps(lax_conv)(x, kernel),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dispatch_takes_the_custom_gradient_for_plain_nhwc_convolutions_only():
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)

    def uses_conv_nhwc(**kwargs):
        arguments = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)),
                     "dimension_numbers": conv.NHWC, **kwargs}
        text = str(jax.make_jaxpr(
            lambda a, b: conv.conv_general_dilated(a, b, **arguments))(x, kernel))
        return "name=conv_nhwc" in text

    assert uses_conv_nhwc()
    assert uses_conv_nhwc(window_strides=(2, 2), padding=[(0, 1), (1, 0)])
    assert not uses_conv_nhwc(padding="SAME")
    assert not uses_conv_nhwc(rhs_dilation=(2, 2))
    assert not uses_conv_nhwc(precision=jax.lax.Precision.HIGHEST)
    assert not uses_conv_nhwc(preferred_element_type=jnp.float32)
