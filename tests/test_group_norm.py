"""GroupNorm with two-stage statistics against Flax's GroupNorm and a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddpm_jax.ops.group_norm import GroupNorm


def make_pair(channels, groups, dtype=None):
    """Our GroupNorm and nnx.GroupNorm with the same random scale and bias."""
    rng = np.random.RandomState(1)
    scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    pair = []
    for cls in (GroupNorm, nnx.GroupNorm):
        layer = cls(channels, num_groups=groups, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
        layer.scale[...], layer.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
        pair.append(layer)
    return pair, scale, bias


def reference(x, scale, bias, groups, epsilon=1e-6):
    """GroupNorm in float64 NumPy, two-pass variance."""
    x = np.asarray(x, np.float64)
    grouped = x.reshape(x.shape[:-1] + (groups, -1))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = grouped.mean(axes, keepdims=True)
    variance = ((grouped - mean) ** 2).mean(axes, keepdims=True)
    normalized = ((grouped - mean) / np.sqrt(variance + epsilon)).reshape(x.shape)
    return normalized * scale + bias


@pytest.mark.parametrize("shape,groups", [((3, 8, 8, 32), 8), ((2, 4, 6, 16), 16),
                                          ((2, 10, 12), 4)])
def test_outputs_match_flax_and_float64(shape, groups):
    (ours, flax_norm), scale, bias = make_pair(shape[-1], groups)
    # An offset larger than the spread, as activations have: E[x^2] - E[x]^2 must hold up.
    x = jax.random.normal(jax.random.PRNGKey(0), shape) * 2.0 + 3.0
    expected = reference(x, scale, bias, groups)
    np.testing.assert_allclose(ours(x), expected, atol=2e-5)
    np.testing.assert_allclose(ours(x), flax_norm(x), atol=2e-5)


def test_gradients_match_flax():
    (ours, flax_norm), _, _ = make_pair(32, 8)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 32)) * 1.5 + 0.5
    weights = jax.random.normal(jax.random.PRNGKey(1), x.shape)

    def grads(layer):
        graphdef, params = nnx.split(layer)

        def loss(params, x):  # a non-trivial function of the output, as the net's SiLU
            return jnp.sum(jax.nn.silu(nnx.merge(graphdef, params)(x)) * weights)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    (ours_params, ours_x), (flax_params, flax_x) = grads(ours), grads(flax_norm)
    np.testing.assert_allclose(ours_x, flax_x, atol=1e-5 * float(jnp.abs(flax_x).max()))
    for name in ("scale", "bias"):
        expected = flax_params[name][...]
        np.testing.assert_allclose(ours_params[name][...], expected,
                                   atol=1e-5 * float(jnp.abs(expected).max()))


def test_same_parameters_as_flax_so_checkpoints_carry_over():
    (ours, flax_norm), _, _ = make_pair(16, 4)
    ours_state, flax_state = nnx.state(ours, nnx.Param), nnx.state(flax_norm, nnx.Param)
    assert jax.tree.structure(ours_state) == jax.tree.structure(flax_state)


def test_bfloat16_compute_returns_bfloat16_close_to_flax():
    (ours, flax_norm), _, _ = make_pair(32, 8, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32)).astype(jnp.bfloat16)
    out = ours(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), flax_norm(x).astype(np.float32),
                               atol=0.05)


def test_mask_falls_back_to_flax():
    (ours, flax_norm), _, _ = make_pair(16, 4)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
    mask = jnp.broadcast_to(jnp.arange(16).reshape(1, 4, 4, 1) % 3 > 0, x.shape)
    np.testing.assert_array_equal(ours(x, mask=mask), flax_norm(x, mask=mask))


def test_group_values_reach_their_channels_exactly():
    """The one-hot product that puts group statistics on channels gives the same values as a
    repeat, exactly, for values of any magnitude and sign (one nonzero term per output)."""
    from ddpm_jax.ops.group_norm import _per_channel

    rng = np.random.RandomState(0)
    per_group = (rng.normal(size=(3, 8)) * 10.0 ** rng.randint(-30, 30, size=(3, 8)))
    per_group = per_group.astype(np.float32)
    per_group[0, :3] = [0.0, -0.0, np.finfo(np.float32).tiny]
    got = np.asarray(jax.jit(_per_channel, static_argnums=1)(jnp.asarray(per_group), 5))
    np.testing.assert_array_equal(got, np.repeat(per_group, 5, axis=1))
