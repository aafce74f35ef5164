"""The UNet: shapes, parameter counts of published nets, configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddpm_jax.models.architecture import DOWNSAMPLE_PADDINGS
from ddpm_jax.models.blocks import timestep_embedding
from ddpm_jax.models.unet import make_unet

# The net as one compiled call: op-by-op dispatch of a forward pass is many times slower.
forward = nnx.jit(lambda model, x, t: model(x, t))


def param_count(**kwargs):
    model = nnx.eval_shape(lambda: make_unet(rngs=nnx.Rngs(0), **kwargs))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_ddpm_cifar10_net_has_the_published_parameter_count():
    # Ho et al.'s CIFAR-10 net: 35,746,307 parameters (35.7 M).
    assert param_count(image_size=32) == 35_746_307


def test_ddpm_256_net_is_within_half_a_percent_of_114m():
    count = param_count(image_size=256, channel_mults=(1, 1, 2, 2, 4, 4), dropout=0.0)
    assert abs(count / 114e6 - 1) < 0.005


@pytest.mark.parametrize("attention_type,heads", [("ddpm", 1), ("ddpm", 2), ("transformer", 4)])
def test_output_shape_and_zero_initialised_output(attention_type, heads):
    model = make_unet(image_size=16, base_channels=16, channel_mults=(1, 2), norm_groups=4,
                 attention_resolutions=(8, 16), attention_type=attention_type, num_heads=heads,
                 rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3))
    out = forward(model, x, jnp.array([0, 10, 999]))
    assert out.shape == (3, 16, 16, 3) and out.dtype == jnp.float32
    # The last conv starts at zero (Ho et al.), so the initial prediction is exactly 0.
    np.testing.assert_array_equal(out, 0.0)


def perturb_zero_kernels(model, scale=0.1):
    """Gives every zero-initialised kernel random values, so every branch contributes."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(42)  # drawn on the host: no op-by-op dispatch
    leaves = [
        jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype)
        if p.ndim > 1 and not np.any(p) else p
        for p in leaves
    ]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


def test_output_depends_on_input_and_timestep_after_perturbing_weights():
    model = make_unet(image_size=8, base_channels=8, channel_mults=(1, 2), norm_groups=4,
                 attention_resolutions=(4,), rngs=nnx.Rngs(0))
    perturb_zero_kernels(model)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    a = forward(model, x, jnp.array([1, 1]))
    b = forward(model, x, jnp.array([500, 500]))
    c = forward(model, x * 0.5, jnp.array([1, 1]))
    assert not np.allclose(a, b) and not np.allclose(a, c)
    # Examples in a batch do not interact (GroupNorm is per example).
    single = forward(model, x[:1], jnp.array([1]))
    np.testing.assert_allclose(single[0], a[0], atol=1e-5)


def test_dropout_only_with_keys_and_per_example():
    model = make_unet(image_size=8, base_channels=8, channel_mults=(1,), norm_groups=4,
                 attention_resolutions=(), dropout=0.5, rngs=nnx.Rngs(0))
    perturb_zero_kernels(model)
    x = jnp.ones((1, 8, 8, 3))
    t = jnp.array([3])
    np.testing.assert_array_equal(model(x, t), model(x, t))
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    assert not np.allclose(model(x, t, dropout_keys=keys[:1]), model(x, t, dropout_keys=keys[1:]))
    # Each example's masks come from its own key alone: the same in any batch.
    pair = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), dropout_keys=keys)
    np.testing.assert_allclose(pair[1:], model(x, t, dropout_keys=keys[1:]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(pair[0], pair[1])


def test_bfloat16_compute_keeps_float32_params():
    model = make_unet(image_size=8, base_channels=8, channel_mults=(1,), norm_groups=4,
                 attention_resolutions=(8,), dtype="bfloat16", rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    assert forward(model, jnp.ones((1, 8, 8, 3)), jnp.array([3])).dtype == jnp.float32


def test_timestep_embedding_matches_formula():
    emb = timestep_embedding(jnp.array([0, 7]), 8)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 3)
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(7 * freqs), np.cos(7 * freqs)]), rtol=1e-5)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("padding, lax_padding", [("same", "SAME"), ("symmetric", ((1, 1), (1, 1)))])
@pytest.mark.parametrize("conv_algorithm", ["direct", "winograd"])
def test_downsample_padding_is_tensorflows_same_or_pytorchs_symmetric(padding, lax_padding,
                                                                      conv_algorithm):
    from ddpm_jax import ops
    from ddpm_jax.models.blocks import Downsample
    from ddpm_jax.models.layers import Layers
    from tests.helpers import tiny_config

    config = tiny_config()
    config.conv_algorithm = conv_algorithm
    layers = Layers(jnp.float32, nnx.Rngs(0), ops.layer_ops(config))
    block = Downsample(4, layers, DOWNSAMPLE_PADDINGS[padding])
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
    want = jax.lax.conv_general_dilated(x, block.conv.kernel[...], (2, 2), lax_padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(block(x), want + block.conv.bias[...], rtol=1e-5, atol=1e-5)


def test_timestep_embedding_shift_and_order():
    emb = timestep_embedding(jnp.array([7]), 8, freq_shift=0.0, cos_first=True)[0]
    freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
    np.testing.assert_allclose(emb, np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)]),
                               rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_size=30, channel_mults=(1, 2, 2)), "divisible by 4"),
        (dict(image_size=32, attention_resolutions=(5,)), "only has resolutions"),
        (dict(image_size=32, attention_type="linear"), "attention_type"),
        (dict(image_size=32, base_channels=30, num_heads=4), "num_heads"),
        (dict(image_size=32, base_channels=24, norm_groups=32), "norm_groups"),
        (dict(image_size=32, downsample_padding="valid"), "model.downsample_padding"),
    ],
)
def test_bad_architectures_fail_with_the_field_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_unet(rngs=nnx.Rngs(0), **kwargs)


def test_mirror_layout_runs_and_attends_after_each_downsample():
    model = make_unet(image_size=16, base_channels=8, channel_mults=(1, 2, 3), layout="mirror",
                 attention_type="transformer", num_heads=2, attention_resolutions=(8, 4, 2),
                 norm_groups=4, time_embedding_width=16, time_projection="linear", dropout=0.0,
                 rngs=nnx.Rngs(0))
    perturb_zero_kernels(model)
    out = forward(model, jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3)),
                  jnp.array([3, 700]))
    assert out.shape == (2, 16, 16, 3) and np.all(np.isfinite(out))
    attention = [level.attn for level in (*model.down, *model.up) if level.attn is not None]
    assert len(attention) == 6  # three in the encoder, three mirrored in the decoder
    with pytest.raises(ValueError, match="only has resolutions"):
        make_unet(image_size=16, base_channels=8, channel_mults=(1, 2), layout="mirror",
             attention_resolutions=(16,), norm_groups=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("folded", [False, True])
def test_ddpm_attention_block_matches_float64_reference(heads, folded):
    """GroupNorm, q/k/v projections, softmax over positions, output projection, residual, with
    nonzero biases everywhere: the block as written, and the backend's form that folds the
    single-head block's projections (a different computation of the same function)."""
    from ddpm_jax.models.blocks import DDPMAttention
    from ddpm_jax.models.layers import Layers
    from ddpm_jax.ops.attention import FoldedAttention

    kind = FoldedAttention if folded else DDPMAttention
    block = kind(32, num_heads=heads, norm_groups=8, layers=Layers(jnp.float32, nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    layers = (block.q, block.k, block.v, block.proj_out)
    for layer in layers:
        layer.kernel[...] = jnp.asarray(rng.normal(0, 0.3, layer.kernel.shape), jnp.float32)
        layer.bias[...] = jnp.asarray(rng.normal(0, 0.5, layer.bias.shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 4, 6, 32)), jnp.float32)

    h = np.asarray(block.norm(x), np.float64).reshape(2, 24, 32)
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (
        (np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64))
        for layer in layers)
    split = lambda a: a.reshape(2, 24, heads, 32 // heads)  # noqa: E731
    q, k, v = split(h @ wq + bq), split(h @ wk + bk), split(h @ wv + bv)
    scores = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(32 // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhlm,bmhd->blhd", weights, v).reshape(2, 24, 32)
    want = np.asarray(x, np.float64) + (attended @ wo + bo).reshape(x.shape)

    got = nnx.jit(lambda block, x: block(x))(block, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_initial_parameters_are_those_of_flax_own_rng_stream():
    """`network.init_params` advances its key stream its own way (fast to trace): it must draw
    exactly the keys flax's RngStream draws, so the same seed gives the same weights."""
    from ddpm_jax.runtime import network
    from tests.helpers import micro_config

    config = micro_config()
    key = jax.random.PRNGKey(3)
    ours = jax.jit(lambda k: network.init_params(config, k))(key)
    flax_own = jax.jit(lambda k: nnx.to_pure_dict(nnx.state(
        network.build(config, nnx.Rngs(params=k)), nnx.Param)))(key)
    leaves = jax.tree.leaves(ours)
    assert len(leaves) == len(jax.tree.leaves(flax_own)) > 10
    for a, b in zip(leaves, jax.tree.leaves(flax_own), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len({float(np.asarray(leaf).ravel()[0]) for leaf in leaves if np.std(leaf) > 0}) > 5


LAYOUTS = {
    "ddpm": dict(image_size=16, base_channels=8, channel_mults=(1, 2, 2), norm_groups=4,
                 attention_resolutions=(8,)),
    "mirror": dict(image_size=16, base_channels=8, channel_mults=(1, 2, 3), layout="mirror",
                   attention_type="transformer", num_heads=2, attention_resolutions=(8, 2),
                   norm_groups=4, time_embedding_width=16, time_projection="linear"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_blocks_are_numbered_as_the_flat_tree_of_earlier_runs_listed_them(layout):
    """The flat tree of runs saved before the nesting listed the blocks in the order they run
    (`legacy_block_paths`); each block's number (which picks its dropout masks) is its place
    in that list, so a resumed run draws the masks it drew before, and the list holds every
    block of the net once."""
    from ddpm_jax.models import blocks, unet
    from ddpm_jax.models.architecture import Architecture

    fields = LAYOUTS[layout]
    model = nnx.eval_shape(lambda: make_unet(rngs=nnx.Rngs(0), **fields))
    paths = unet.LEGACY_BLOCK_PATHS[layout](Architecture(**fields))
    listed = [path for section in ("encoder", "middle", "decoder") for path in paths[section]]

    def module_at(path):
        node = model
        for key in path:
            node = node[key] if isinstance(key, int) else getattr(node, key)
        return node

    found = [module_at(path) for path in listed]
    for position, block in enumerate(found):
        if isinstance(block, blocks.ResBlock):
            assert block.index == position
    kinds = (blocks.ResBlock, blocks.DDPMAttention, blocks.TransformerAttention,
             blocks.Downsample, blocks.Upsample)
    in_net = [node for _, node in nnx.iter_graph(model) if isinstance(node, kinds)]
    assert len({id(block) for block in found}) == len(found) == len(in_net)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_flat_parameter_tree_of_an_earlier_run_moves_to_the_nested_tree_and_back(layout):
    from ddpm_jax.models import unet
    from tests.helpers import micro_config

    config = micro_config()
    config.data.image_size = LAYOUTS[layout]["image_size"]
    config.model.update({k: v for k, v in LAYOUTS[layout].items() if k != "image_size"})
    model = nnx.eval_shape(lambda: unet.build(config, nnx.Rngs(0)))
    nested = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = unet.to_flat_params(nested, config)
    assert {"encoder", "middle", "decoder"} <= set(flat)
    assert not {"down", "mid", "up", "res_out"} & set(flat)
    assert [key for key in flat["encoder"]] == list(range(len(flat["encoder"])))
    back = unet.from_flat_params(flat, config)
    assert jax.tree.structure(back) == jax.tree.structure(nested)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(nested), strict=True):
        assert a is b
    assert unet.from_flat_params(nested, config) is nested  # already nested: as it is
