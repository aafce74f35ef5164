"""The registered "unet" network (`config.model.name`): Ho et al.'s net (`ddpm.py`) or the
PyTorch project's (`mirror.py`), as `config.model.layout` says, built from one
`Architecture`."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice
from ddpm_jax.models import ddpm, mirror
from ddpm_jax.models.architecture import Architecture
from ddpm_jax.models.base import MODELS, Network
from ddpm_jax.models.layers import LayerOps

NETS = {"ddpm": ddpm.DDPMUNet, "mirror": mirror.MirrorUNet}
LEGACY_BLOCK_PATHS = {"ddpm": ddpm.legacy_block_paths, "mirror": mirror.legacy_block_paths}


def make_unet(*, rngs: nnx.Rngs, layer_ops: LayerOps | None = None, **fields: Any) -> nnx.Module:
    """The UNet of `Architecture(**fields)`, its layers computed by `layer_ops` (default:
    Flax's)."""
    arch = Architecture(**fields)
    return NETS[arch.layout](arch, layer_ops=layer_ops, rngs=rngs)


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
          layer_ops: LayerOps | None = None) -> nnx.Module:
    """The UNet of `config.model` for images of `config.data.image_size`."""
    arch = Architecture.from_config(config)
    return NETS[arch.layout](arch, layer_ops=layer_ops, rngs=rngs)


def _legacy_block_paths(config: ml_collections.ConfigDict) -> dict[str, list[tuple]]:
    arch = Architecture.from_config(config)
    return LEGACY_BLOCK_PATHS[arch.layout](arch)


def from_flat_params(params: dict, config: ml_collections.ConfigDict) -> dict:
    """Parameters saved before the nets were nested by level (`encoder[i]`, `middle[i]`,
    `decoder[i]`, the blocks in the order they run), moved to where each block is now."""
    if not any(section in params for section in ("encoder", "middle", "decoder")):
        return params
    nested = {key: value for key, value in params.items()
              if key not in ("encoder", "middle", "decoder")}
    paths = _legacy_block_paths(config)
    for section, blocks in paths.items():
        stored = params.get(section, {})
        for index, path in enumerate(blocks):
            block = stored[index] if index in stored else stored[str(index)]
            node = nested
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = block
    return nested


def to_flat_params(params: dict, config: ml_collections.ConfigDict) -> dict:
    """The inverse of `from_flat_params`: nested parameters in the old flat layout (the tree
    a checkpoint saved before the nesting holds, to restore it into)."""
    flat = dict(params)
    paths = _legacy_block_paths(config)
    for section, blocks in paths.items():
        flat[section] = {}
        for index, path in enumerate(blocks):
            node = params
            for key in path:
                node = node[key]
            flat[section][index] = node
    for key in ("down", "mid", "up", "res_out"):
        flat.pop(key, None)
    return flat


def check(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the field when `config.model` cannot be built for
    `config.data.image_size`."""
    m = config.model
    for field in ("base_channels", "num_res_blocks", "num_heads", "norm_groups"):
        value = m[field]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"model.{field} must be a positive integer, got {value!r}")
    for field in ("channel_mults", "attention_resolutions"):
        values = m[field]
        if not isinstance(values, (tuple, list)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise UserError(f"model.{field} must be a tuple of positive integers, such as "
                             f"(1, 2, 2), got {values!r}")
    if not m.channel_mults:
        raise UserError("model.channel_mults must have at least one level, such as (1, 2, 2)")
    check_choice("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
    num_classes = m.get("num_classes", 0)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise UserError(f"model.num_classes must be an integer >= 0 (0: unconditional), got "
                        f"{num_classes!r}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not m.norm_eps > 0:
        raise UserError(f"model.norm_eps must be positive, got {m.norm_eps}")
    half = (m.time_embedding_width or m.base_channels) // 2
    if not m.time_embedding_freq_shift < half:
        raise UserError(f"model.time_embedding_freq_shift={m.time_embedding_freq_shift} must be "
                         f"below half the time embedding width ({half})")
    Architecture.from_config(config)  # checks the net can be built




MODELS.register("unet", Network(build=build, check=check, from_legacy=from_flat_params,
                                to_legacy=to_flat_params))
