"""The blocks of the nets after Ho et al.'s (ADM, Dhariwal & Nichol 2021; DDPM++, Song et al.
2021 and EDM): each against its function written out in NumPy, and the published nets'
parameter counts against counts derived from their own construction rules."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddpm_jax.core.errors import UserError
from ddpm_jax.models.architecture import BLOCK_OPTION_DEFAULTS
from ddpm_jax.models.blocks import Blocks, ResBlock
from ddpm_jax.models.layers import Layers
from ddpm_jax.models.unet import build, make_unet
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT))
from configs import adm64, ddpmpp_cifar10  # noqa: E402

# ---- parameter counts from the architectures' rules (EDM's training/networks.py) ----------

def conv(cin, cout, kernel):
    return kernel * kernel * cin * cout + cout


def linear(cin, cout, bias=True):
    return cin * cout + (cout if bias else 0)


def group_norm(channels):
    return 2 * channels


def unet_block(cin, cout, emb, *, attention, resample, adaptive_scale, resample_proj):
    """EDM's UNetBlock: norm0, conv0, affine (2x for adaptive scale), norm1, conv1, a 1x1
    skip where the width changes or (with resample_proj) the block resamples, and an
    attention part (norm2, qkv, proj)."""
    count = (group_norm(cin) + conv(cin, cout, 3) + linear(emb, cout * (2 if adaptive_scale else 1))
             + group_norm(cout) + conv(cout, cout, 3))
    if cin != cout or (resample and resample_proj):
        count += conv(cin, cout, 1)
    if attention:
        count += group_norm(cout) + conv(cout, 3 * cout, 1) + conv(cout, cout, 1)
    return count


def edm_unet_count(img, channels, mults, blocks, attention, *, adaptive_scale, resample_proj,
                   decoder_attention_last, label_dim=0, out_channels=3, augment_dim=0):
    """Parameters of EDM's SongUNet (DDPM++) or DhariwalUNet (ADM), from their constructors:
    noise embedding MLP, label map, encoder (conv in, then a down block per level after the
    first, `blocks` blocks per level), decoder (in0 with attention and in1 at the lowest
    level, else an up block; `blocks` + 1 blocks per level, each fed a skip), output norm and
    conv; with `augment_dim`, SongUNet's map of the augmentation vector onto the noise
    embedding."""
    emb = 4 * channels
    count = linear(channels, emb) + linear(emb, emb) + linear(label_dim, emb, bias=False)
    count += linear(augment_dim, channels, bias=False)
    options = dict(adaptive_scale=adaptive_scale, resample_proj=resample_proj)
    skips, width = [], 3
    for level, mult in enumerate(mults):
        res = img >> level
        if level == 0:
            count += conv(width, channels, 3)
            width = channels
        else:
            count += unet_block(width, width, emb, attention=False, resample=True, **options)
        skips.append(width)
        for _ in range(blocks):
            count += unet_block(width, channels * mult, emb, attention=res in attention,
                                resample=False, **options)
            width = channels * mult
            skips.append(width)
    for level, mult in reversed(list(enumerate(mults))):
        res = img >> level
        if level == len(mults) - 1:
            count += unet_block(width, width, emb, attention=True, resample=False, **options)
            count += unet_block(width, width, emb, attention=False, resample=False, **options)
        else:
            count += unet_block(width, width, emb, attention=False, resample=True, **options)
        for index in range(blocks + 1):
            attends = res in attention and (index == blocks or not decoder_attention_last)
            count += unet_block(width + skips.pop(), channels * mult, emb, attention=attends,
                                resample=False, **options)
            width = channels * mult
    return count + group_norm(width) + conv(width, out_channels, 3)


def config_param_count(config):
    model = nnx.eval_shape(lambda: build(config, nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_ddpmpp_cifar10_has_edms_parameter_count():
    want = edm_unet_count(32, 128, (2, 2, 2), 4, (16,), adaptive_scale=False,
                          resample_proj=True, decoder_attention_last=True,
                          augment_dim=9)  # trained with EDM's augmentation (--augment=0.12)
    assert round(want / 1e6, 2) == 55.73  # EDM, Table 7
    assert config_param_count(ddpmpp_cifar10.get_config()) == want


def test_adm64_has_adms_parameter_count_plus_the_null_label():
    published = edm_unet_count(64, 192, (1, 2, 3, 4), 3, (32, 16, 8), adaptive_scale=True,
                               resample_proj=False, decoder_attention_last=False,
                               label_dim=1000)
    assert round(published / 1e6, 2) == 295.90  # EDM, Table 7 (3 output channels)
    learned_variance = edm_unet_count(64, 192, (1, 2, 3, 4), 3, (32, 16, 8),
                                      adaptive_scale=True, resample_proj=False,
                                      decoder_attention_last=False, label_dim=1000,
                                      out_channels=6)
    null_label = 4 * 192
    assert config_param_count(adm64.get_config()) == learned_variance + null_label


# ---- each block against NumPy ---------------------------------------------------------------

def np_group_norm(x, groups, scale, bias, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_conv3x3(x, kernel, bias):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    out = sum(padded[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(3) for j in range(3))
    return out + bias


def silu(x):
    return x / (1 + np.exp(-x))


def array(param):
    return np.asarray(param[...], np.float64)


def randomised(module, seed=0):
    """Every parameter of `module` set to N(0, 0.3^2) (no zero-initialised outputs)."""
    rng = np.random.default_rng(seed)
    for _, param in nnx.iter_graph(module):
        if isinstance(param, nnx.Param):
            param[...] = jnp.asarray(rng.normal(0, 0.3, param.shape), jnp.float32)
    return module


def np_res_block(block, x, temb, *, scale_shift, resample, skip_scale):
    """ADM's ResBlock (with scale-shift norm and up/down) and DDPM++'s, in NumPy."""
    h = silu(np_group_norm(x, 4, array(block.norm1.scale), array(block.norm1.bias)))
    if resample == "down":
        pool = lambda a: a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2,  # noqa: E731
                                   a.shape[3]).mean(axis=(2, 4))
        h, x = pool(h), pool(x)
    elif resample == "up":
        repeat = lambda a: a.repeat(2, axis=1).repeat(2, axis=2)  # noqa: E731
        h, x = repeat(h), repeat(x)
    h = np_conv3x3(h, array(block.conv1.kernel), array(block.conv1.bias))
    emb = (silu(temb) @ array(block.temb_proj.kernel) + array(block.temb_proj.bias))[:, None, None]
    norm2 = (array(block.norm2.scale), array(block.norm2.bias))
    if scale_shift:
        scale, shift = np.split(emb, 2, axis=-1)
        h = silu(np_group_norm(h, 4, *norm2) * (1 + scale) + shift)
    else:
        h = silu(np_group_norm(h + emb, 4, *norm2))
    h = np_conv3x3(h, array(block.conv2.kernel), array(block.conv2.bias))
    if block.skip is not None:
        x = x @ array(block.skip.kernel) + array(block.skip.bias)
    return (x + h) * skip_scale


@pytest.mark.parametrize("cin,cout,scale_shift,resample,projection,skip_scale", [
    (8, 8, True, None, False, 1.0),  # ADM's scale-shift norm
    (8, 16, True, None, False, 1.0),
    (8, 8, True, "down", False, 1.0),  # ADM's residual downsample
    (8, 8, False, "down", True, 0.5**0.5),  # DDPM++'s, with the skip's 1x1 conv
    (8, 8, True, "up", False, 1.0),
    (8, 8, False, "up", True, 0.5**0.5),
])
def test_res_block_options_compute_their_numpy_functions(cin, cout, scale_shift, resample,
                                                         projection, skip_scale):
    block = randomised(ResBlock(cin, cout, 12, dropout=0.0, norm_groups=4, time_activation=True,
                                layers=Layers(jnp.float32, nnx.Rngs(0)), scale_shift=scale_shift,
                                resample=resample, resample_projection=projection,
                                skip_scale=skip_scale))
    assert (block.skip is not None) == (cin != cout or projection)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 4, cin)).astype(np.float32)
    temb = rng.normal(size=(2, 12)).astype(np.float32)
    got = nnx.jit(lambda block, x, temb: block(x, temb, None))(block, x, temb)
    want = np_res_block(block, x.astype(np.float64), temb.astype(np.float64),
                        scale_shift=scale_shift, resample=resample, skip_scale=skip_scale)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("folded,head_channels", [(False, 8), (False, 32), (True, 32)])
def test_attention_with_a_fixed_head_width_and_skip_scale_computes_its_numpy_function(
        folded, head_channels):
    """As written, and (one head) in the backend's folded form."""
    from ddpm_jax.models.architecture import Architecture
    from ddpm_jax.ops import layer_ops

    arch = Architecture(image_size=8, base_channels=32, channel_mults=(1,),
                        head_channels=head_channels, attention_resolutions=(8,),
                        skip_scale=0.5**0.5, norm_groups=8)
    ops = layer_ops(ops_config()) if folded else None
    block = randomised(Blocks(arch, Layers(jnp.float32, nnx.Rngs(0), ops)).attention(32))
    assert type(block).__name__ == ("FoldedAttention" if folded else "DDPMAttention")
    heads = 32 // head_channels
    assert block.num_heads == heads
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 6, 32)).astype(np.float32)
    h = np.asarray(block.norm(x), np.float64).reshape(2, 24, 32)
    project = lambda layer, a: a @ array(layer.kernel) + array(layer.bias)  # noqa: E731
    split = lambda a: a.reshape(2, 24, heads, head_channels)  # noqa: E731
    q, k, v = (split(project(layer, h)) for layer in (block.q, block.k, block.v))
    scores = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(head_channels)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhlm,bmhd->blhd", weights, v).reshape(2, 24, 32)
    want = (x.astype(np.float64) + project(block.proj_out, attended).reshape(x.shape)) * 0.5**0.5
    got = nnx.jit(lambda block, x: block(x))(block, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def ops_config():
    from tests.helpers import micro_config

    return micro_config()


def test_a_net_with_every_option_runs_and_the_decoder_attends_where_asked():
    common = dict(image_size=16, base_channels=8, channel_mults=(1, 2), num_res_blocks=2,
                  attention_resolutions=(16, 8), norm_groups=4, rngs=nnx.Rngs(0))
    every = make_unet(**common, scale_shift_norm=True, resample="resblock", head_channels=4,
                      skip_scale=0.5**0.5, resample_projection=True)
    last = make_unet(**common, resample="resblock", decoder_attention="last_block")
    assert [len(level.attn) for level in every.up] == [3, 3]
    assert [len(level.attn) for level in last.up] == [1, 1]
    assert isinstance(every.down[0].downsample, ResBlock)
    assert isinstance(every.up[0].upsample, ResBlock)
    x = jnp.ones((2, 16, 16, 3))
    for net in (every, last):
        out = nnx.jit(lambda net, x: net(x, jnp.array([3, 500])))(randomised(net), x)
        assert out.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(layout="mirror", resample="resblock"), "model.resample is an option of the ddpm"),
    (dict(head_channels=12), "model.head_channels=12 must divide"),
    (dict(skip_scale=0.0), "model.skip_scale must be positive"),
    (dict(resample="pool"), "model.resample"),
    (dict(decoder_attention="first_block"), "model.decoder_attention"),
])
def test_bad_block_options_name_the_field(kwargs, match):
    with pytest.raises(UserError, match=match):
        make_unet(image_size=16, base_channels=8, channel_mults=(1, 2), norm_groups=4,
                  attention_resolutions=(8,), rngs=nnx.Rngs(0), **kwargs)


def test_to_diffusers_refuses_ddpmpps_options_naming_the_field():
    from ddpm_jax import diffusers_format

    config = ddpmpp_cifar10.get_config()
    config.diffusion.formulation = "ddpm"
    with pytest.raises(UserError, match="model.resample_projection=True: diffusers"):
        diffusers_format.check_exportable(config)
    for field in ("resample_projection", "skip_scale", "decoder_attention"):
        config.model[field] = BLOCK_OPTION_DEFAULTS[field]
    # DDPM++'s input conv gives 128 channels to a first level of 256; UNet2DModel's gives 256
    with pytest.raises(UserError, match=r"model.channel_mults=\(2, 2, 2\): UNet2DModel's input"):
        diffusers_format.check_exportable(config)


ADM_STYLE_UNET = {  # the options UNet2DModel has: scale-shift, residual resampling, head width
    "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64],
    "layers_per_block": 1, "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D"], "attention_head_dim": 16,
    "norm_num_groups": 8, "attn_norm_num_groups": 8, "resnet_time_scale_shift": "scale_shift",
    "downsample_type": "resnet", "upsample_type": "resnet", "freq_shift": 1,
    "flip_sin_to_cos": False, "downsample_padding": 0, "norm_eps": 1e-6,
}


# residual resampling at a level without attention: diffusers' Resnet{Down,Up}sampleBlock2D
MIXED_UNET = {**ADM_STYLE_UNET, "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"]}


@pytest.mark.parametrize("unet_fields", [ADM_STYLE_UNET, MIXED_UNET], ids=["attn", "mixed"])
def test_the_options_unet2dmodel_has_convert_both_ways_with_diffusers_outputs(tmp_path,
                                                                              unet_fields):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from ddpm_jax import convert, diffusers_format, loading
    from ddpm_jax.runtime import network

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**unet_fields).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "unet")
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    t = np.array([3, 700])

    def theirs(model):
        with torch.no_grad():
            out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    def relative_error(ours, want):
        return float(np.abs(np.asarray(ours) - want).max() / np.abs(want).max())

    model, config = loading.load_model(str(tmp_path / "unet"))
    m = config.model
    assert (m.scale_shift_norm, m.resample) == (True, "resblock")
    assert diffusers_format.unet_config(config)["attention_head_dim"] == 16  # heads of 16
    config.conv_algorithm = "direct"
    assert relative_error(loading.Model(config, model.params)(x, t), theirs(unet)) <= 1e-5

    params = network.random_params(config, seed=1)
    convert.write_diffusers(config, params, str(tmp_path / "exported"))
    exported, info = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported" / "unet",
                                                           output_loading_info=True)
    assert not any(info.values()), info
    assert relative_error(loading.Model(config, params)(x, t), theirs(exported.eval())) <= 1e-5


def test_what_unet2dmodel_cannot_hold_is_refused_both_ways():
    from ddpm_jax import diffusers_format

    mixed = {**ADM_STYLE_UNET, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
    with pytest.raises(UserError, match="resamples one way at every level"):
        diffusers_format.model_config(mixed)
    no_norm = {**ADM_STYLE_UNET, "attn_norm_num_groups": None}
    with pytest.raises(UserError, match="middle attention without its GroupNorm"):
        diffusers_format.model_config(no_norm)
    plain_and_residual = {**ADM_STYLE_UNET, "down_block_types": ["ResnetDownsampleBlock2D",
                                                                 "DownBlock2D", "DownBlock2D"],
                          "block_out_channels": [32, 64, 64], "up_block_types": ["UpBlock2D"] * 3}
    with pytest.raises(UserError, match="resamples one way at every level"):
        diffusers_format.model_config(plain_and_residual)


def test_adm_exports_with_residual_resampling_blocks_where_it_does_not_attend():
    from ddpm_jax import diffusers_format

    unet = diffusers_format.unet_config(adm64.get_config())  # ADM: no attention at 64x64
    assert unet["down_block_types"] == ["ResnetDownsampleBlock2D"] + ["AttnDownBlock2D"] * 3
    assert unet["up_block_types"] == ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"]
    size, fields = diffusers_format.model_config(unet)
    m = adm64.get_config().model
    assert size == 64 and fields["resample"] == "resblock" and fields["scale_shift_norm"]
    assert (fields["attention_resolutions"], fields["head_channels"]) == (
        tuple(m.attention_resolutions), m.head_channels)
