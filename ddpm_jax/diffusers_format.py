"""diffusers' DDPM format (`UNet2DModel` + `DDPMScheduler`) <-> ddpm-jax configs and weights.

The published DDPM checkpoints (Ho et al.'s CIFAR-10, CelebA-HQ and LSUN nets) are
`DDPMPipeline` folders: ``model_index.json``, ``unet/`` (``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``) and ``scheduler/``
(``scheduler_config.json``). Their UNet is ddpm-jax's ``ddpm`` layout block for block, so a
config maps field by field (here) and each weight is one of ours, renamed and transposed
(`diffusers_weights.py`).

This module is pure mapping (dicts); reading and writing folders is in `convert.py`. What
one side cannot express raises `UnsupportedError`, naming the field.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import ddpm_paper
from ddpm_jax.core import diffusion
from ddpm_jax.core.errors import UserError
from ddpm_jax.models.architecture import BLOCK_OPTION_DEFAULTS

# Written into exported configs: the oldest diffusers this format is tested with.
DIFFUSERS_VERSION = "0.30.0"
UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
              "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
              "learned_range": "learned_range"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}


class UnsupportedError(UserError):
    """A model one side has and the other cannot express; the message names the field."""


# ------------------------------------------------------------------------------ configs


def _attended_levels(config: ml_collections.ConfigDict) -> list[bool]:
    size, m = config.data.image_size, config.model
    return [size // 2**level in tuple(m.attention_resolutions)
            for level in range(len(m.channel_mults))]


def check_exportable(config: ml_collections.ConfigDict) -> None:
    """Raises `UnsupportedError` for a ddpm-jax net that `UNet2DModel` cannot express."""
    m = config.model
    required = (("model.name", m.get("name", "unet"), "unet"),
                ("model.layout", m.layout, "ddpm"),
                ("model.attention_type", m.attention_type, "ddpm"),
                ("model.time_projection", m.time_projection, "silu_linear"))
    for field, value, wanted in required:
        if value != wanted:
            raise UnsupportedError(f"{field}={value!r}: diffusers' UNet2DModel has only the "
                                   f"{wanted!r} form of it")
    for field in ("resample_projection", "skip_scale", "decoder_attention"):
        default = BLOCK_OPTION_DEFAULTS[field]
        if m.get(field, default) != default:
            raise UnsupportedError(f"model.{field}={m[field]!r}: diffusers' UNet2DModel has no "
                                   f"such option (only {default!r})")
    if m.channel_mults[0] != 1:
        first = m.base_channels * m.channel_mults[0]
        raise UnsupportedError(
            f"model.channel_mults={tuple(m.channel_mults)}: UNet2DModel's input conv and time "
            "embedding are as wide as its first level, ddpm-jax's as model.base_channels; a "
            f"first multiplier of 1 (model.base_channels={first} and the multipliers divided "
            f"by {m.channel_mults[0]}) converts")
    if m.time_embedding_width not in (0, m.base_channels):
        raise UnsupportedError(
            f"model.time_embedding_width={m.time_embedding_width}: UNet2DModel's sinusoidal "
            f"embedding is as wide as the first level (model.base_channels={m.base_channels})")
    _head_width(config)


def _block_types(attended: list[bool], direction: str, residual: bool) -> list[str]:
    """UNet2DModel's block types of one path: an attention block where the level attends
    (it resamples as `downsample_type`/`upsample_type` say), else a plain block (conv
    resampling) or, for residual resampling, diffusers' Resnet{Down,Up}sampleBlock2D."""
    plain = f"Resnet{direction}sampleBlock2D" if residual else f"{direction}Block2D"
    return [f"Attn{direction}Block2D" if attend else plain for attend in attended]


def _attention_widths(config: ml_collections.ConfigDict) -> list[int]:
    """Channels of every attention block: the attended levels and the middle."""
    m = config.model
    widths = [m.base_channels * mult
              for mult, attend in zip(m.channel_mults, _attended_levels(config), strict=True)
              if attend]
    return widths + [m.base_channels * m.channel_mults[-1]]


def _head_width(config: ml_collections.ConfigDict) -> int | None:
    """UNet2DModel's `attention_head_dim` for `config.model.head_channels` or `num_heads`
    (None: one head)."""
    if config.model.get("head_channels", 0):
        return config.model.head_channels
    heads = config.model.num_heads
    if heads == 1:
        return None
    widths = sorted(set(_attention_widths(config)))
    if len(widths) > 1:
        raise UnsupportedError(
            f"model.num_heads={heads} with attention at widths {widths}: UNet2DModel fixes the "
            "head width (attention_head_dim), not the head count; use num_heads=1 or attend "
            "only at levels of one width")
    return widths[0] // heads


def unet_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `UNet2DModel` config.json of `config`'s network."""
    check_exportable(config)
    m = config.model
    attended = _attended_levels(config)
    residual = m.get("resample") == "resblock"
    shift = m.time_embedding_freq_shift
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.data.image_size,
        "in_channels": 3,
        "out_channels": 6 if config.diffusion.variance == "learned_range" else 3,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": int(shift) if float(shift).is_integer() else shift,
        "flip_sin_to_cos": bool(m.time_embedding_cos_first),
        "down_block_types": _block_types(attended, "Down", residual),
        "up_block_types": _block_types(attended[::-1], "Up", residual),
        "block_out_channels": [m.base_channels * mult for mult in m.channel_mults],
        "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": {"same": 0, "symmetric": 1}[m.downsample_padding],
        "downsample_type": "resnet" if residual else "conv",
        "upsample_type": "resnet" if residual else "conv",
        "dropout": m.dropout,
        "act_fn": "silu",
        "attention_head_dim": _head_width(config),
        "norm_num_groups": m.norm_groups,
        # diffusers drops the middle attention's GroupNorm of a scale-shift net unless named
        "attn_norm_num_groups": m.norm_groups if m.get("scale_shift_norm") else None,
        "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if m.get("scale_shift_norm") else "default",
        "add_attention": True,
        "class_embed_type": None,
        # a class-conditional net's table: a row per class, and the null label's last
        "num_class_embeds": m.num_classes + 1 if m.get("num_classes", 0) else None,
    }


def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `DDPMScheduler` scheduler_config.json of `config.diffusion`.

    A beta schedule diffusers has no name for is written out as `trained_betas`.
    """

    d = config.diffusion
    names = {ours: theirs for theirs, ours in _SCHEDULES.items()}
    result = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.num_timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": names.get(d.schedule, "linear"),
        "trained_betas": None,
        "variance_type": d.variance,
        "clip_sample": bool(d.clip_x0),
        "clip_sample_range": 1.0,
        "prediction_type": {ours: theirs for theirs, ours in _PREDICTIONS.items()}[d.prediction],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    if d.schedule not in names:
        betas = diffusion.make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
        result["trained_betas"] = betas.tolist()
    return result


def pipeline_index() -> dict[str, Any]:
    """model_index.json of a `DDPMPipeline` folder."""
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


def _expect(unet: dict, field: str, allowed: tuple, default: Any) -> Any:
    value = unet.get(field, default)
    if value not in allowed:
        raise UnsupportedError(f"unet config {field}={value!r}: ddpm-jax's UNet supports "
                               f"{' or '.join(repr(a) for a in allowed)}")
    return value


# The largest image side a converted config may have: far above any published DDPM net,
# far below a side whose activations could never be allocated.
MAX_IMAGE_SIZE = 8192


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _count(unet: dict, field: str, default: Any) -> int:
    """A positive integer field of config.json."""
    value = unet.get(field, default)
    if not _is_count(value):
        raise UnsupportedError(f"unet config {field}={value!r}: must be a positive integer")
    return value


def _image_size(unet: dict) -> int:
    size = unet.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise UnsupportedError(f"unet config sample_size={size}: only square images")
        size = size[0]
    if not _is_count(size):
        raise UnsupportedError(f"unet config sample_size={size!r}: the image side is needed")
    if size > MAX_IMAGE_SIZE:
        raise UnsupportedError(f"unet config sample_size={size}: more than {MAX_IMAGE_SIZE} "
                               "pixels a side; no net of that size can run")
    return size


def _resample(unet: dict, down: list[str], up: list[str]) -> str:
    """model.resample of a config.json: how every level that resamples does it.

    An attention block resamples as `downsample_type`/`upsample_type` say, a plain block
    with a conv, a Resnet{Down,Up}sampleBlock2D with a residual block. The last block of
    each path does not resample.
    """
    types = {"down": down[:-1], "up": up[:-1]}
    named = {"down": unet.get("downsample_type", "conv"), "up": unet.get("upsample_type", "conv")}
    kinds = {("resnet" if t.startswith("Resnet") else named[path] if t.startswith("Attn")
              else "conv") for path, path_types in types.items() for t in path_types}
    if len(kinds) > 1:
        raise UnsupportedError(
            f"unet config down_block_types={down}, up_block_types={up} with downsample_type="
            f"{named['down']!r}, upsample_type={named['up']!r}: ddpm-jax resamples one way at "
            "every level (all with a conv or all with a residual block)")
    return "resblock" if kinds == {"resnet"} else "conv"


def model_config(unet: dict) -> tuple[int, dict[str, Any]]:
    """(image size, `config.model` fields) of a `UNet2DModel` config.json.

    Raises `UnsupportedError` naming the first field ddpm-jax's UNet cannot represent.
    """
    if unet.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UnsupportedError(f"unet config _class_name={unet['_class_name']!r}: only "
                               "UNet2DModel (the DDPM pipelines' net) converts")
    for field, allowed, default in (
            ("in_channels", (3,), 3), ("out_channels", (3, 6), 3),
            ("center_input_sample", (False,), False),
            ("time_embedding_type", ("positional",), "positional"),
            ("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D"),
            ("mid_block_scale_factor", (1,), 1),
            ("downsample_type", ("conv", "resnet"), "conv"),
            ("upsample_type", ("conv", "resnet"), "conv"), ("act_fn", ("silu",), "silu"),
            ("resnet_time_scale_shift", ("default", "scale_shift"), "default"),
            ("add_attention", (True,), True), ("class_embed_type", (None,), None),
            ("downsample_padding", (0, 1), 1)):
        _expect(unet, field, allowed, default)
    class_rows = unet.get("num_class_embeds")
    if class_rows is not None and (not _is_count(class_rows) or class_rows < 2):
        raise UnsupportedError(f"unet config num_class_embeds={class_rows!r}: a class table "
                               "needs at least 2 rows (a class and the null label), or null")
    size = _image_size(unet)
    widths = unet.get("block_out_channels", (224, 448, 672, 896))
    if not isinstance(widths, (list, tuple)) or not widths or not all(map(_is_count, widths)):
        raise UnsupportedError(f"unet config block_out_channels={widths!r}: must be a list of "
                               "positive integers, one per level")
    widths = list(widths)
    if size % 2 ** (len(widths) - 1):
        raise UnsupportedError(f"unet config sample_size={size} with {len(widths)} levels: the "
                               f"side must be divisible by {2 ** (len(widths) - 1)}")
    base = widths[0]
    if any(width % base for width in widths):
        raise UnsupportedError(f"unet config block_out_channels={widths}: every width must be "
                               f"a multiple of the first (model.channel_mults are integers)")
    if unet.get("time_embedding_dim") not in (None, 4 * base):
        raise UnsupportedError(f"unet config time_embedding_dim={unet['time_embedding_dim']}: "
                               f"ddpm-jax's is 4 x block_out_channels[0] = {4 * base}")
    down = list(unet.get("down_block_types", ()))
    up = list(unet.get("up_block_types", ()))
    if len(down) != len(widths) or len(up) != len(widths):
        raise UnsupportedError("unet config down_block_types / up_block_types: one per entry of "
                               f"block_out_channels ({len(widths)})")
    for field, types, known in (
            ("down_block_types", down,
             ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")),
            ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"))):
        unknown = [t for t in types if t not in known]
        if unknown:
            raise UnsupportedError(f"unet config {field} has {unknown}; ddpm-jax's UNet has "
                                   f"only {known}")
    attended = [t.startswith("Attn") for t in down]
    if [t.startswith("Attn") for t in reversed(up)] != attended:
        raise UnsupportedError(f"unet config up_block_types={up} must attend at the levels "
                               f"down_block_types={down} attend at (in reverse order)")
    groups = _count(unet, "norm_num_groups", 32)
    _count(unet, "layers_per_block", 2)
    scale_shift = unet.get("resnet_time_scale_shift", "default") == "scale_shift"
    if scale_shift and unet.get("attn_norm_num_groups") is None:
        raise UnsupportedError("unet config resnet_time_scale_shift='scale_shift' without "
                               "attn_norm_num_groups: diffusers then builds the middle attention "
                               "without its GroupNorm, which ddpm-jax's net always has")
    if unet.get("attn_norm_num_groups") not in (None, groups):
        raise UnsupportedError(f"unet config attn_norm_num_groups="
                               f"{unet['attn_norm_num_groups']}: ddpm-jax's attention uses "
                               f"norm_num_groups ({groups})")
    attention_widths = [w for w, a in zip(widths, attended, strict=True) if a] + [widths[-1]]
    head_width = unet.get("attention_head_dim", 8)
    if head_width is not None and not _is_count(head_width):
        raise UnsupportedError(f"unet config attention_head_dim={head_width!r}: must be a "
                               "positive integer or null")
    heads = {1} if head_width is None else {w // head_width for w in attention_widths}
    if head_width is not None and any(w % head_width for w in attention_widths):
        raise UnsupportedError(
            f"unet config attention_head_dim={head_width} does not divide the attention widths "
            f"{attention_widths}")
    resample = _resample(unet, down, up)
    fields = {
        "name": "unet", "layout": "ddpm", "attention_type": "ddpm",
        "time_projection": "silu_linear", "time_embedding_width": 0,
        "base_channels": base,
        "channel_mults": tuple(w // base for w in widths),
        "num_res_blocks": unet.get("layers_per_block", 2),
        "attention_resolutions": tuple(size // 2**level
                                       for level, a in enumerate(attended) if a),
        # one head count: model.num_heads; several: the fixed head width
        "num_heads": heads.pop() if len(heads) == 1 else 1,
        "head_channels": head_width if len(heads) > 1 else 0,
        "scale_shift_norm": scale_shift,
        "resample": resample,
        "dropout": float(unet.get("dropout", 0.0)),
        "norm_groups": groups,
        "norm_eps": float(unet.get("norm_eps", 1e-5)),
        "time_embedding_freq_shift": float(unet.get("freq_shift", 0)),
        "time_embedding_cos_first": bool(unet.get("flip_sin_to_cos", True)),
        "downsample_padding": "same" if unet.get("downsample_padding", 1) == 0 else "symmetric",
        # the last row of the class table is read as the null label (as ddpm-jax writes it)
        "num_classes": class_rows - 1 if class_rows else 0,
    }
    return size, fields


def diffusion_config(scheduler: dict) -> dict[str, Any]:
    """`config.diffusion` fields of a `DDPMScheduler` scheduler_config.json (its defaults
    for absent fields)."""
    if scheduler.get("trained_betas") is not None:
        raise UnsupportedError("scheduler config trained_betas: ddpm-jax's schedules are named "
                               "(diffusion.schedule); register one that gives these betas")
    for field, allowed, default in (("thresholding", (False,), False),
                                    ("rescale_betas_zero_snr", (False,), False),
                                    ("clip_sample_range", (1.0,), 1.0)):
        value = scheduler.get(field, default)
        if value not in allowed:
            raise UnsupportedError(f"scheduler config {field}={value!r}: ddpm-jax supports "
                                   f"{allowed[0]!r}")
    fields = {}
    for field, table, default, ours in (
            ("beta_schedule", _SCHEDULES, "linear", "schedule"),
            ("variance_type", _VARIANCES, "fixed_small", "variance"),
            ("prediction_type", _PREDICTIONS, "epsilon", "prediction")):
        value = scheduler.get(field, default)
        if value not in table:
            raise UnsupportedError(f"scheduler config {field}={value!r}: ddpm-jax supports "
                                   f"{sorted(table)}")
        fields[ours] = table[value]
    fields.update(num_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
                  beta_start=float(scheduler.get("beta_start", 1e-4)),
                  beta_end=float(scheduler.get("beta_end", 0.02)),
                  clip_x0=bool(scheduler.get("clip_sample", True)))
    return fields


def config_from_diffusers(unet: dict, scheduler: dict | None) -> ml_collections.ConfigDict:
    """A complete ddpm-jax config for a diffusers UNet (and scheduler).

    The training recipe is the DDPM paper's (`configs/ddpm_paper.py`), to fine-tune on an
    image folder (`data.path`); without a scheduler, the diffusion settings are the paper's.
    """
    config = ddpm_paper.get_config()
    size, model = model_config(unet)
    config.data.image_size = size
    config.data.source = "folder"
    config.data.name = ""
    config.model.update(model)
    if config.model.num_classes:  # fine-tuning reads classes from the folder's subfolders
        config.data.label = "subfolder"
    if scheduler is not None:
        config.diffusion.update(diffusion_config(scheduler))
    learned = config.diffusion.variance == "learned_range"
    if (unet.get("out_channels", 3) == 6) != learned:
        raise UnsupportedError(
            f"unet config out_channels={unet.get('out_channels', 3)} with the scheduler's "
            f"variance {config.diffusion.variance!r}: ddpm-jax reads 6 channels as the "
            "prediction and learned-range variance values (variance_type='learned_range'), "
            "3 as the prediction alone")
    return config
