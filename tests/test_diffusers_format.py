"""Weights both ways with diffusers: names and shapes, round trips, refusals, the commands.

The comparison with diffusers itself runs where torch and diffusers are installed (the
`interop` extra) and is skipped elsewhere.
"""

import importlib.util
import json
import logging
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import cifar10
from ddpm_jax import convert, diffusers_format, diffusers_weights, loading, sample, train
from ddpm_jax.diffusers_format import UnsupportedError
from ddpm_jax.runtime import network
from tests.helpers import micro_config, tiny_config


def diffusers_cifar10_shapes() -> dict[str, tuple[int, ...]]:
    """diffusers' `UNet2DModel` state dict (names, PyTorch shapes) for Ho et al.'s CIFAR-10
    net, written from diffusers' block rules: down blocks of 2 resnets (+ attention at level
    1) and a stride-2 conv; up blocks of 3 resnets fed with skips, nearest x2 + conv."""
    widths, attends, temb = [128, 256, 256, 256], [False, True, False, False], 512
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def linear(name, cout, cin):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin)
        linear(f"{name}.time_emb_proj", cout, temb)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cout, cin, k=1)

    def attention(name, c):
        norm(f"{name}.group_norm", c)
        for part in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(f"{name}.{part}", c, c)

    conv("conv_in", 128, 3)
    linear("time_embedding.linear_1", temb, 128)
    linear("time_embedding.linear_2", temb, temb)
    channels = 128
    for i, width in enumerate(widths):
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", channels if j == 0 else width, width)
            if attends[i]:
                attention(f"down_blocks.{i}.attentions.{j}", width)
        if i < 3:
            conv(f"down_blocks.{i}.downsamplers.0.conv", width, width)
        channels = width
    resnet("mid_block.resnets.0", 256, 256)
    attention("mid_block.attentions.0", 256)
    resnet("mid_block.resnets.1", 256, 256)
    reversed_widths, previous = widths[::-1], widths[-1]
    for i, width in enumerate(reversed_widths):
        below = reversed_widths[min(i + 1, 3)]
        for j in range(3):
            skip = below if j == 2 else width
            resnet(f"up_blocks.{i}.resnets.{j}", (previous if j == 0 else width) + skip, width)
            if attends[3 - i]:
                attention(f"up_blocks.{i}.attentions.{j}", width)
        if i < 3:
            conv(f"up_blocks.{i}.upsamplers.0.conv", width, width)
        previous = width
    norm("conv_norm_out", 128)
    conv("conv_out", 3, 128)
    return shapes


def test_cifar10_names_and_shapes_are_diffusers_own():
    config = cifar10.get_config()
    expected = diffusers_cifar10_shapes()
    assert sum(int(np.prod(s)) for s in expected.values()) == 35_746_307  # Ho et al.'s count
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), network.abstract_params(config))
    written = diffusers_weights.to_state_dict(zeros, config)
    assert {name: value.shape for name, value in written.items()} == expected


def test_export_then_import_gives_the_same_parameters_and_config():
    config = tiny_config()
    config.model.num_heads = 2  # one attention width (32), so a fixed head width expresses it
    config.model.attention_resolutions = ()
    config.model.downsample_padding = "symmetric"
    config.model.time_embedding_cos_first = True
    config.diffusion.prediction = "v"
    config.diffusion.variance = "fixed_small"
    config.diffusion.schedule = "cosine"
    params = network.random_params(config)
    state_dict = diffusers_weights.to_state_dict(params, config)
    unet = json.loads(json.dumps(diffusers_format.unet_config(config)))
    scheduler = json.loads(json.dumps(diffusers_format.scheduler_config(config)))
    imported = diffusers_format.config_from_diffusers(unet, scheduler)
    for section in ("model", "diffusion"):
        for key, value in config[section].items():
            if key not in ("dtype", "remat", "mlp_ratio", "beta_start", "beta_end", "loss"):
                assert imported[section][key] == value, f"{section}.{key}"
    assert imported.data.image_size == config.data.image_size
    back = diffusers_weights.from_state_dict(state_dict, imported)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_unnamed_schedules_are_written_as_trained_betas_and_old_attention_names_load():
    from ddpm_jax.core import diffusion, schedules

    config = tiny_config()
    schedules.BETA_SCHEDULES.register("halved_linear")(
        lambda n, start, end: schedules.linear(n, start, end) / 2)
    try:
        config.diffusion.schedule = "halved_linear"
        written = diffusers_format.scheduler_config(config)
        np.testing.assert_allclose(written["trained_betas"], diffusion.make_betas(
            "linear", 1000, config.diffusion.beta_start, config.diffusion.beta_end) / 2)
    finally:
        schedules.BETA_SCHEDULES.unregister("halved_linear")
    config = tiny_config()
    params = network.random_params(config)
    old = {name.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
           .replace("to_out.0", "proj_attn"): value
           for name, value in diffusers_weights.to_state_dict(params, config).items()}
    assert any(".query." in name for name in old)
    back = diffusers_weights.from_state_dict(old, config)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("field, value, match", [
    ("layout", "mirror", "model.layout"),
    ("attention_type", "transformer", "model.attention_type"),
    ("time_projection", "linear", "model.time_projection"),
    ("time_embedding_width", 64, "model.time_embedding_width"),
])
def test_export_refuses_what_unet2dmodel_cannot_express(field, value, match):
    config = tiny_config()
    config.model[field] = value
    with pytest.raises(UnsupportedError, match=match):
        diffusers_format.unet_config(config)


CIFAR10_UNET = {
    "_class_name": "UNet2DModel", "sample_size": 32, "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2, "attention_head_dim": None, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "norm_num_groups": 32,
}


@pytest.mark.parametrize("change, match", [
    ({"num_class_embeds": 1}, "num_class_embeds=1: a class table needs at least 2 rows"),
    ({"class_embed_type": "timestep", "num_class_embeds": None}, "class_embed_type='timestep'"),
    ({"class_embed_type": "identity"}, "class_embed_type='identity'"),
    ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": 8},
     "class_embed_type='projection'"),
    ({"class_embed_type": "simple_projection"}, "class_embed_type='simple_projection'"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
                           "DownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
     "attend at the levels"),
    ({"attention_head_dim": 96}, "attention_head_dim=96 does not divide"),
    ({"downsample_type": "resnet", "upsample_type": "resnet"}, "resamples one way"),
    ({"block_out_channels": [128, 192, 256, 256]}, "multiple of the first"),
    ({"out_channels": 6}, "out_channels"),
    ({"sample_size": 1_000_000_000}, "more than 8192 pixels a side"),
    ({"sample_size": 36}, "divisible by 8"),
    ({"block_out_channels": []}, "block_out_channels=\\[\\]: must be a list of positive"),
    ({"block_out_channels": [0]}, "block_out_channels=\\[0\\]: must be a list of positive"),
    ({"block_out_channels": "128"}, "must be a list of positive integers"),
    ({"attention_head_dim": 0}, "attention_head_dim=0: must be a positive integer or null"),
    ({"layers_per_block": 0}, "layers_per_block=0: must be a positive integer"),
    ({"norm_num_groups": "32"}, "norm_num_groups='32': must be a positive integer"),
])
def test_import_refuses_what_the_unet_cannot_represent(change, match):
    with pytest.raises(UnsupportedError, match=match):
        diffusers_format.config_from_diffusers({**CIFAR10_UNET, **change}, None)
    config = diffusers_format.config_from_diffusers(CIFAR10_UNET, {"variance_type": "fixed_large"})
    assert config.model.downsample_padding == "same" and config.diffusion.variance == "fixed_large"
    assert network.abstract_params(config)  # the unchanged config builds


@pytest.mark.slow
def test_from_diffusers_then_sample_then_fine_tune_on_an_image_folder(tmp_path, caplog):
    """A random-weight pipeline folder in diffusers' layout through the whole path."""
    config = micro_config()
    config.diffusion.variance = "fixed_small"
    params = network.random_params(config)
    pipeline = tmp_path / "pipeline"
    convert.write_diffusers(config, params, str(pipeline))
    assert sorted(str(p.relative_to(pipeline)) for p in pipeline.rglob("*")) == [
        "model_index.json", "scheduler", "scheduler/scheduler_config.json", "unet",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    with pytest.raises(ValueError, match="not empty"):
        convert.write_diffusers(config, params, str(pipeline))

    workdir = tmp_path / "run"
    # what a killed conversion leaves: an unfinished save, which is not a checkpoint
    (workdir / "checkpoints" / "0.orbax-checkpoint-tmp-1").mkdir(parents=True)
    commands = convert.from_diffusers(str(pipeline), str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0"]
    assert f"--config={workdir}/config.py" in commands
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert.from_diffusers(str(pipeline), str(workdir))
    with caplog.at_level(logging.WARNING):
        loaded, run_config = loading.load_model(str(workdir))
    assert [record.getMessage() for record in caplog.records] == []  # no library warnings
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    assert run_config.diffusion.variance == "fixed_small"
    images, _ = sample.generate(str(workdir), 2, sampler="ddim", num_steps=2)
    assert images.shape == (2, 8, 8, 3)

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(folder / f"{i}.png")
    spec = importlib.util.spec_from_file_location("converted", workdir / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tuned = module.get_config()
    tuned.data.path = str(folder)
    tuned.num_train_steps = 2
    tuned.batch_size = 4
    tuned.save_every_steps = tuned.sample_every_steps = tuned.log_every_steps = 2
    tuned.sample.num_images = 2
    tuned.sample.sampler, tuned.sample.num_steps = "ddim", 2
    state = train.train_and_evaluate(tuned, str(workdir))
    assert int(state.step) == 2
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                         state.params, params)
    assert max(jax.tree.leaves(moved)) > 0  # it trained from the imported weights


@pytest.fixture(scope="module")
def micro_pipeline(tmp_path_factory):
    """A random-weight DDPMPipeline folder of the micro net, in diffusers' layout."""
    config = micro_config()
    config.diffusion.variance = "fixed_small"
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    convert.write_diffusers(config, network.random_params(config), str(folder))
    return folder


def _damaged_copy(pipeline, tmp_path, damage):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(pipeline, copy)
    damage(copy / "unet")
    return copy


def _lying_header(unet):
    path = unet / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    first = next(key for key in header if key != "__metadata__")
    header[first]["data_offsets"] = [0, 10**12]  # past the end of the file
    text = json.dumps(header).encode().ljust(length)
    if len(text) == length:
        path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + length:]))
    else:  # a longer header: its new length first
        path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data[8 + length:]))


def _nan_weights(unet):
    from safetensors.numpy import load_file, save_file

    path = str(unet / "diffusion_pytorch_model.safetensors")
    weights = load_file(path)
    weights["conv_in.weight"][0, 0, 0, 0] = np.nan
    save_file(weights, path)


def _sharded_without_weight_map(unet):
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')


@pytest.mark.parametrize("damage, match", [
    (lambda unet: (unet / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    (lambda unet: (unet / "config.json").write_text("{"), "cannot read .*config.json"),
    (_sharded_without_weight_map, "has no weight_map"),
    (_lying_header, "cannot read .*safetensors.*damaged or truncated"),
    (lambda unet: (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" * 12),
     "cannot read .*safetensors"),
    (_nan_weights, "conv_in.weight: 1 of its 216 values are NaN or infinite"),
])
def test_damaged_diffusers_files_are_refused_in_one_line_before_anything_is_written(
        micro_pipeline, tmp_path, damage, match):
    damaged = _damaged_copy(micro_pipeline, tmp_path, damage)
    with pytest.raises(ValueError, match=match):
        convert.from_diffusers(str(damaged), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_export_follows_the_umask_refuses_a_file_and_clears_abandoned_staging(
        micro_pipeline, tmp_path):
    import os
    import socket
    import stat

    config, params = convert.read_diffusers(str(micro_pipeline))
    existing = tmp_path / "file"
    existing.write_text("")
    with pytest.raises(ValueError, match="is a file; choose a new folder"):
        convert.write_diffusers(config, params, str(existing))
    host = socket.gethostname()
    dead = tmp_path / f".out.staging-999999999@{host}.abc"  # an export killed part-way
    (dead / "unet").mkdir(parents=True)
    mine = tmp_path / f".out.staging-{os.getpid()}@{host}.abc"  # an export still running
    mine.mkdir()
    elsewhere = tmp_path / ".out.staging-999999999@another-host.abc"  # not ours to judge
    elsewhere.mkdir()
    old_umask = os.umask(0o022)
    try:
        convert.write_diffusers(config, params, str(tmp_path / "out"))
    finally:
        os.umask(old_umask)
    assert not dead.exists() and mine.exists() and elsewhere.exists()
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert modes["out"] == modes["out/unet"] == 0o755
    assert modes["out/unet/diffusion_pytorch_model.safetensors"] == modes["out/model_index.json"] == 0o644


def test_load_model_checks_its_inputs(tmp_path):
    config = tiny_config()
    model = loading.Model(config, network.random_params(config))
    out = model(np.zeros((2, 16, 16, 3), np.float32), np.array([0, 999]))
    assert out.shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match=r"\[B, 16, 16, 3\]"):
        model(np.zeros((2, 3, 16, 16), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="integer timesteps"):
        model(np.zeros((2, 16, 16, 3), np.float32), np.array([0.5, 1.0]))


def conditional_config():
    config = tiny_config()
    config.model.num_classes, config.data.label = 3, "subfolder"
    config.model.attention_resolutions = ()
    return config


def test_a_class_conditional_net_round_trips_through_a_safetensors_folder(tmp_path):
    """Torch-free: written as diffusers' files, read back; the class table is diffusers'
    `class_embedding` with num_class_embeds = classes + 1 (the null label last)."""
    config = conditional_config()
    params = network.random_params(config, seed=2)
    convert.write_diffusers(config, params, str(tmp_path / "exported"))
    unet = json.loads((tmp_path / "exported" / "unet" / "config.json").read_text())
    assert unet["num_class_embeds"] == 4 and unet["class_embed_type"] is None
    model, imported = loading.load_model(str(tmp_path / "exported"))
    assert imported.model.num_classes == 3 and imported.data.label == "subfolder"
    jax.tree.map(np.testing.assert_array_equal, model.params, params)
    x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
    t, labels = np.array([3, 3, 3, 3]), np.array([0, 1, 2, model.null_label])
    original = loading.Model(config, params)
    # (the imported config is the paper recipe's, whose speed settings round differently)
    np.testing.assert_allclose(model(x, t, labels), original(x, t, labels), rtol=1e-5, atol=1e-7)
    # no labels: the null label's row (another compiled program: equal to float rounding)
    np.testing.assert_allclose(model(x, t), original(x, t, labels[3:].repeat(4)), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="unconditional"):
        loading.Model(tiny_config(), network.random_params(tiny_config()))(x, t, labels)


def test_pickled_weights_without_torch_say_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(CIFAR10_UNET))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ValueError, match="needs torch"):
        convert.read_diffusers(str(tmp_path))


# ----------------------------------------------------------------- against diffusers itself


def _relative_error(ours, theirs):
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def test_outputs_equal_diffusers_unet2dmodel_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{k: v for k, v in CIFAR10_UNET.items() if k[0] != "_"}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # its zero-free init, made less regular
    unet.save_pretrained(tmp_path / "unet")
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    t = np.array([0, 1, 500, 999])

    def theirs(model):
        with torch.no_grad():
            out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    model, config = loading.load_model(str(tmp_path / "unet"))
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    config.conv_algorithm = "direct"  # XLA's convolutions: the same sums as PyTorch's
    direct = loading.Model(config, model.params)
    assert _relative_error(direct(x, t), theirs(unet)) <= 1e-5
    # Winograd (the CPU default) rounds differently, within float32 error of the exact value.
    assert _relative_error(model(x, t), theirs(unet)) <= 2e-5

    params = network.random_params(config, seed=1)
    convert.write_diffusers(config, params, str(tmp_path / "exported"))
    exported, info = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported" / "unet",
                                                           output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert _relative_error(loading.Model(config, params)(x, t), theirs(exported.eval())) <= 1e-5
    # A bare UNet folder with a PyTorch pickle under the pre-0.14 attention names.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "unet" / "config.json").read_text())
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, value in unet.state_dict().items():
        for new, old in old_names.items():
            name = name.replace(f".{new}.", f".{old}.")
        state[name] = value
    torch.save(state, legacy / "diffusion_pytorch_model.bin")
    from_bin, _ = loading.load_model(str(legacy))
    jax.tree.map(np.testing.assert_array_equal, from_bin.params, model.params)

    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "exported")
    images = pipeline(batch_size=1, num_inference_steps=3, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_class_conditional_outputs_equal_diffusers_with_num_class_embeds_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = conditional_config()
    params = network.random_params(config, seed=3)
    convert.write_diffusers(config, params, str(tmp_path / "exported"))
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported" / "unet").eval()
    x = np.random.default_rng(1).standard_normal((4, 16, 16, 3)).astype(np.float32)
    t, labels = np.array([0, 10, 500, 999]), np.array([2, 0, 1, 3])  # 3: the null label

    def run(model):
        with torch.no_grad():
            out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        class_labels=torch.from_numpy(labels)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    config.conv_algorithm = "direct"
    assert _relative_error(loading.Model(config, params)(x, t, labels), run(theirs)) <= 1e-5
    # and from diffusers: a UNet2DModel of its own making, read by ddpm-jax
    torch.manual_seed(0)
    fresh = diffusers.UNet2DModel.from_config(theirs.config).eval()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh.save_pretrained(tmp_path / "fresh")
    model, imported = loading.load_model(str(tmp_path / "fresh"))
    imported.conv_algorithm = "direct"
    assert _relative_error(loading.Model(imported, model.params)(x, t, labels), run(fresh)) <= 1e-5
