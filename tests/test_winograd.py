"""Winograd F(4x4, 3x3) and F(2x2, 3x3) convolutions against XLA's convolution and the
algorithms' identities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from ddpm_jax import ops, train
from ddpm_jax.models import layers
from ddpm_jax.ops import winograd
from tests.helpers import micro_config, run_train_steps


def direct(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def relative_error(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


ALGORITHMS = pytest.mark.parametrize("algorithm", winograd.ALGORITHMS,
                                     ids=lambda algorithm: algorithm.name)


@ALGORITHMS
def test_transform_matrices_compute_a_correlation_exactly(algorithm):
    """A^T [(G g) * (B^T d)] is the m outputs of correlating an (m + 2)-tap d with a 3-tap g
    (float64)."""
    rng = np.random.default_rng(0)
    tile, taps = algorithm.tile, algorithm.taps
    assert algorithm.input_transform.shape == (taps, taps) and taps == tile + 2
    for _ in range(20):
        d, g = rng.standard_normal(taps), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ g for i in range(tile)])
        got = algorithm.output_transform @ ((algorithm.kernel_transform @ g)
                                            * (algorithm.input_transform @ d))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@ALGORITHMS
@pytest.mark.parametrize("shape", [(2, 16, 16, 8, 12), (1, 7, 10, 5, 3), (1, 4, 4, 2, 2)])
def test_convolution_and_gradients_match_xla(shape, algorithm):
    """Forward, input gradient and kernel gradient, also where H, W are not whole tiles."""
    n, height, width, cin, cout = shape
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (n, height, width, cin))
    kernel = jax.random.normal(keys[1], (3, 3, cin, cout)) / np.sqrt(9 * cin)
    cotangent = jax.random.normal(keys[2], (n, height, width, cout))

    want, want_vjp = jax.vjp(direct, x, kernel)
    got, got_vjp = jax.vjp(jax.jit(lambda a, b: winograd.conv3x3(a, b, algorithm)), x, kernel)
    # F(2x2)'s coefficients are 1 and 1/2: its rounding is the direct convolution's order.
    tolerance = 2e-5 if algorithm is winograd.F4 else 2e-6
    assert relative_error(got, want) < tolerance
    for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        assert got_grad.shape == want_grad.shape
        assert relative_error(got_grad, want_grad) < tolerance


def test_upsample_kernel_gives_each_output_phase():
    """Against the definition, tap by tap: output row 2i + a of the conv after nearest x2
    upsampling reads input rows i - 1 + u with the phase kernel's row u."""
    kernel = np.random.RandomState(0).standard_normal((3, 3, 2, 3)).astype(np.float32)
    combined = np.asarray(winograd.upsample_kernel(jnp.asarray(kernel))).reshape(3, 3, 2, 2, 2, 3)
    for a in range(2):
        for b in range(2):
            want = np.zeros((3, 3, 2, 3), np.float32)
            for i in range(3):
                for j in range(3):  # upsampled offset i - 1 -> input offset (a + i - 1) // 2
                    want[(a + i - 1) // 2 + 1, (b + j - 1) // 2 + 1] += kernel[i, j]
            np.testing.assert_allclose(combined[:, :, :, a, b], want, rtol=1e-6, atol=1e-6)


def test_upsample_conv_and_gradients_match_upsampling_then_convolving():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (2, 16, 20, 32))
    kernel = jax.random.normal(keys[1], (3, 3, 32, 40)) / np.sqrt(9 * 32)
    cotangent = jax.random.normal(keys[2], (2, 32, 40, 40))

    def upsample_then_direct(a, b):
        return direct(jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2), b)

    want, want_vjp = jax.vjp(upsample_then_direct, x, kernel)
    got, got_vjp = jax.vjp(jax.jit(winograd.upsample_conv3x3), x, kernel)
    assert got.shape == want.shape and relative_error(got, want) < 2e-5
    for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        assert relative_error(got_grad, want_grad) < 2e-5
    # Where F(4x4) does not apply to the small map, the caller upsamples and convolves.
    assert winograd.upsample_conv3x3(x[:, :8, :8], kernel) is None
    assert winograd.upsample_conv3x3(x[..., :16], kernel[:, :, :16]) is None


def test_upsample_block_by_phases_matches_the_direct_block():
    """The net's Upsample block: same parameters, same output with Winograd (by phases on a
    16x16 map) as with the direct convolution of the upsampled map."""
    from ddpm_jax.models.blocks import Upsample

    winograd_ops = layers.LayerOps(conv_general_dilated=winograd.conv_general_dilated,
                                   upsample_conv=winograd.upsample_conv)
    blocks = {name: Upsample(32, layers.Layers(jnp.float32, nnx.Rngs(0), layer_ops))
              for name, layer_ops in (("default", None), ("winograd", winograd_ops))}
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 32))
    # F(4x4) applies to this map, so the Winograd block goes by phases.
    assert winograd.upsample_conv3x3(x, blocks["winograd"].conv.kernel[...]) is not None
    bias = jax.random.normal(jax.random.PRNGKey(2), (32,))
    for block in blocks.values():
        block.conv.bias[...] = bias  # initialised to zero: make it count
    want, got = (nnx.jit(lambda block, x: block(x))(block, x) for block in blocks.values())
    assert relative_error(got, want) < 2e-5


@ALGORITHMS
def test_transposed_transforms_are_the_transposes(algorithm):
    """<T x, y> == <x, T^T y> for the output and kernel transforms the backward pass uses."""
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    frequencies = algorithm.taps ** 2
    tile = algorithm.tile
    height, width = 2 * tile - 1, 3 * tile - 1  # 2x3 tiles, the last row and column cropped
    products = jax.random.normal(keys[0], (frequencies, 2 * 2 * 3, 5))
    grad = jax.random.normal(keys[1], (2, height, width, 5))
    lhs = jnp.vdot(winograd.transform_output(products, (2, height, width), algorithm), grad)
    rhs = jnp.vdot(products, winograd.transform_output_transpose(grad, algorithm))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)

    kernel = jax.random.normal(keys[2], (3, 3, 4, 5))
    kernel_frequencies = jax.random.normal(keys[3], (frequencies, 4, 5))
    lhs = jnp.vdot(winograd.transform_kernel(kernel, algorithm), kernel_frequencies)
    rhs = jnp.vdot(kernel, winograd.transform_kernel_transpose(kernel_frequencies, algorithm))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_dispatch_picks_the_algorithm_by_map_size_and_only_where_one_applies():
    def choice(x_shape, kernel_shape, strides=(1, 1), padding=((1, 1), (1, 1)),
               dtype=jnp.float32):
        x = jax.ShapeDtypeStruct(x_shape, dtype)
        kernel = jax.ShapeDtypeStruct(kernel_shape, dtype)
        numbers = jax.lax.conv_dimension_numbers(x_shape, kernel_shape, ("NHWC", "HWIO", "NHWC"))
        text = str(jax.make_jaxpr(lambda a, b: winograd.conv_general_dilated(
            a, b, strides, padding, dimension_numbers=numbers))(x, kernel))
        algorithm = winograd.algorithm_for(x, kernel, strides, padding, None, None, numbers, 1,
                                           None)
        # Winograd's custom VJP, or else the direct convolution (on CPU with its own VJP).
        assert ("name=conv3x3" in text) != ("name=conv_nhwc" in text)
        assert ("name=conv3x3" in text) == (algorithm is not None)
        return algorithm

    assert choice((2, 16, 16, 32), (3, 3, 32, 64)) is winograd.F4
    assert choice((2, 32, 24, 128), (3, 3, 128, 32)) is winograd.F4
    assert choice((2, 8, 8, 32), (3, 3, 32, 64)) is winograd.F2
    assert choice((2, 4, 4, 256), (3, 3, 256, 256)) is winograd.F2
    assert choice((2, 32, 8, 32), (3, 3, 32, 64)) is winograd.F2  # the smaller side decides
    assert choice((2, 2, 2, 256), (3, 3, 256, 256)) is None  # too small to pay off
    assert choice((2, 16, 16, 3), (3, 3, 3, 64)) is None  # too few input channels
    assert choice((2, 32, 32, 128), (3, 3, 128, 3)) is None  # too few output channels
    assert choice((2, 32, 32, 128), (3, 3, 128, 16)) is None
    assert choice((2, 16, 16, 32), (3, 3, 32, 64), strides=(2, 2)) is None
    assert choice((2, 16, 16, 32), (1, 1, 32, 64), padding=((0, 0), (0, 0))) is None
    assert choice((2, 16, 16, 32), (3, 3, 32, 64), padding=((0, 0), (0, 0))) is None
    assert choice((2, 16, 16, 32), (3, 3, 32, 64), dtype=jnp.bfloat16) is None
    x, kernel = jnp.zeros((1, 16, 16, 32)), jnp.zeros((3, 3, 32, 32))
    nhwc = ("NHWC", "HWIO", "NHWC")
    assert winograd.algorithm_for(x, kernel, (1, 1), ((1, 1), (1, 1)), 1, (1, 1), nhwc, 1,
                                  None) is winograd.F4
    assert winograd.algorithm_for(x, kernel, (1, 1), ((1, 1), (1, 1)), None, 2, nhwc, 1,
                                  None) is None
    assert winograd.algorithm_for(x, kernel, (1, 1), "SAME", None, None, nhwc, 1, None) is None
    assert winograd.algorithm_for(x, kernel, (1, 1), ((1, 1), (1, 1)), None, None,
                                  ("NCHW", "OIHW", "NCHW"), 1, None) is None


def test_auto_picks_winograd_on_cpu_only(monkeypatch):
    config = default.get_config()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert ops.conv_algorithm(config) == "winograd"
    assert ops.layer_ops(config).conv_general_dilated is winograd.conv_general_dilated
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.conv_algorithm(config) == "direct"
    assert ops.layer_ops(config).upsample_conv is layers.upsample_then_conv
    config.conv_algorithm = "winograd"
    assert ops.conv_algorithm(config) == "winograd"
    config.conv_algorithm = "direct"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert ops.conv_algorithm(config) == "direct"
    config.conv_algorithm = "fft"
    with pytest.raises(ValueError, match="conv_algorithm"):
        ops.check_config(config)


@pytest.mark.slow
def test_train_steps_with_winograd_match_direct_convolutions():
    """Fixed seed, dropout off, random initial weights: the same losses and weights.

    Over the 4 test devices; the Winograd run also splits its parameters and optimizer state
    over 2 of them (FSDP), so the custom gradient is checked with sharded kernels too.
    """
    config = micro_config()
    config.data.image_size, config.model.base_channels, config.model.norm_groups = 16, 32, 8
    config.model.attention_resolutions, config.model.dropout = (), 0.0
    config.model.channel_mults = (1, 1)  # 16x16 maps (F(4x4, 3x3)) and 8x8 maps (F(2x2, 3x3))
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, (config.batch_size, 16, 16, 3), dtype=np.uint8)
            for _ in range(3)]
    results = {}
    for algorithm, fsdp in (("direct", 1), ("winograd", 2)):
        config.conv_algorithm, config.mesh.fsdp, config.mesh.fsdp_min_size = algorithm, fsdp, 1024
        mesh = train.create_mesh(config)
        assert mesh.devices.size == 4
        results[algorithm] = run_train_steps(config, mesh, data, weight_noise=0.05)
    (direct_state, direct_losses), (winograd_state, winograd_losses) = results.values()
    assert any(not leaf.sharding.is_fully_replicated and leaf.ndim == 4
               for leaf in jax.tree.leaves(winograd_state.params))  # kernels split by FSDP
    assert abs(direct_losses[0] - 1.0) > 0.05  # the loss sees the network, not just the noise
    np.testing.assert_allclose(winograd_losses, direct_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(winograd_state.params),
                         jax.tree.leaves(direct_state.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
