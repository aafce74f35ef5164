"""diffusers' `UNet2DModel` weights <-> ddpm-jax parameters: the same tree, renamed.

Ho et al.'s net (`models/ddpm.py`) is nested as diffusers names it, so a parameter's
diffusers name is its path renamed level by level (`diffusers_name`), and each weight is
ours transposed to PyTorch's layout:

  * a conv kernel HWIO [kh, kw, in, out] is OIHW [out, in, kh, kw];
  * a dense kernel [in, out] is a Linear weight [out, in], and the residual blocks' 1x1
    shortcut a Conv2d weight [out, in, 1, 1];
  * a norm's ``scale`` is its ``weight``;
  * a class-conditional net's class table [rows, width] is diffusers' `class_embedding`
    (an nn.Embedding, the same layout; its last row is the null label).

Pure mapping (dicts and NumPy arrays); the configs are `diffusers_format.py`'s, reading
and writing folders `convert.py`'s.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax.diffusers_format import UnsupportedError, check_exportable
from ddpm_jax.runtime import network

# Our sub-layer names -> diffusers' inside a residual block and an attention block.
_RES_BLOCK = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
              "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
              "proj_out": "to_out.0"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Attention weights as diffusers named them before its 0.14 attention rewrite (still in the
# published .bin files); diffusers renames them on load, and so does `rename_legacy_keys`.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# Our top-level layers -> diffusers' modules.
_TOP = {"conv_in": "conv_in", "temb_dense1": "time_embedding.linear_1",
        "temb_dense2": "time_embedding.linear_2", "norm_out": "conv_norm_out",
        "conv_out": "conv_out"}
_MIDDLE = {"res1": ("mid_block.resnets.0", _RES_BLOCK),
           "attn": ("mid_block.attentions.0", _ATTENTION),
           "res2": ("mid_block.resnets.1", _RES_BLOCK)}


CLASS_EMBEDDING = "class_embedding.weight"


def diffusers_name(path: tuple) -> str:
    """Our parameter path -> its diffusers state-dict name: the same tree, renamed level by
    level (`down[l].res[i]` is `down_blocks.l.resnets.i`, `up[j].attn[i]` is
    `up_blocks.j.attentions.i`, `mid.res1` is `mid_block.resnets.0`, ...)."""
    if path[0] == "class_embedding":
        return CLASS_EMBEDDING
    head, *inner, leaf = path
    leaf = _LEAF[leaf]
    if head in _TOP:
        return f"{_TOP[head]}.{leaf}"
    if head == "mid":
        block, layer = inner
        module, table = _MIDDLE[block]
        return f"{module}.{table[layer]}.{leaf}"
    level, kind, *rest = inner  # down[level] or up[level]
    if kind in ("downsample", "upsample"):
        layer = rest[0]  # "conv", or a layer of a residual resampling block
        inner_name = "conv" if layer == "conv" else _RES_BLOCK[layer]
        return f"{head}_blocks.{level}.{kind}rs.0.{inner_name}.{leaf}"
    index, layer = rest
    module, table = ("resnets", _RES_BLOCK) if kind == "res" else ("attentions", _ATTENTION)
    return f"{head}_blocks.{level}.{module}.{index}.{table[layer]}.{leaf}"


def _key(entry: Any) -> Any:
    return getattr(entry, "key", getattr(entry, "idx", entry))


# A net trained with augmentation maps the augmentation vector onto its time embedding; at
# sampling that vector is zero, so UNet2DModel without the map computes the same function.
SAMPLING_ONLY_DROPPED = ("augment_map",)


def weight_names(config: ml_collections.ConfigDict) -> dict[tuple, str]:
    """Every parameter path of `config`'s network -> its diffusers state-dict name (but the
    augmentation map's, `SAMPLING_ONLY_DROPPED`)."""
    check_exportable(config)
    return {path: diffusers_name(path)
            for path in (tuple(_key(entry) for entry in keys) for keys, _ in
                         jax.tree_util.tree_flatten_with_path(network.abstract_params(config))[0])
            if path[0] not in SAMPLING_ONLY_DROPPED}


def _to_torch_layout(array: np.ndarray, name: str) -> np.ndarray:
    if name == CLASS_EMBEDDING:  # an embedding table is [rows, width] in both
        return array
    if array.ndim == 4:  # HWIO -> OIHW
        return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:  # [in, out] -> [out, in] (a 1x1 Conv2d for the shortcut)
        weight = array.T
        return weight[:, :, None, None] if name.endswith("conv_shortcut.weight") else weight
    return array


def _from_torch_layout(array: np.ndarray, ndim: int, name: str) -> np.ndarray:
    if name == CLASS_EMBEDDING:
        return array
    if ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if ndim == 2:
        return array.reshape(array.shape[:2]).T
    return array


def to_state_dict(params: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """`params` (a pure dict, any placement) as a diffusers `UNet2DModel` state dict."""
    names = weight_names(config)
    flat = [(tuple(_key(e) for e in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]]
    return {names[path]: np.ascontiguousarray(_to_torch_layout(np.asarray(leaf, np.float32),
                                                               names[path]))
            for path, leaf in flat if path[0] not in SAMPLING_ONLY_DROPPED}


def rename_legacy_keys(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Attention weights under their pre-0.14 names (query, key, value, proj_attn) renamed."""
    pattern = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
    renamed = {}
    for name, value in state_dict.items():
        match = pattern.match(name)
        if match:
            name = f"{match[1]}.{_LEGACY_ATTENTION[match[2]]}.{match[3]}"
        renamed[name] = value
    return renamed


def from_state_dict(state_dict: dict[str, np.ndarray],
                    config: ml_collections.ConfigDict) -> Any:
    """A diffusers `UNet2DModel` state dict as `config`'s parameters (a pure dict, float32).

    Raises `UnsupportedError` listing missing and unexpected names, or a shape mismatch.
    """
    state_dict = rename_legacy_keys(state_dict)
    names = weight_names(config)
    missing = sorted(set(names.values()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(names.values()))
    if missing or unexpected:
        raise UnsupportedError(
            f"the weights do not match the net of their config.json: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}")

    def convert(path, abstract):
        name = names[tuple(_key(e) for e in path)]
        value = _from_torch_layout(np.asarray(state_dict[name], np.float32), abstract.ndim,
                                   name)
        if value.shape != abstract.shape:
            raise UnsupportedError(f"{name}: shape {state_dict[name].shape} does not fit the "
                                   f"net of config.json (expected {abstract.shape} in ddpm-jax)")
        if not np.isfinite(value).all():
            raise UnsupportedError(f"{name}: {int((~np.isfinite(value)).sum())} of its "
                                   f"{value.size} values are NaN or infinite; the weights are "
                                   "damaged or diverged and would only sample noise")
        return value

    return jax.tree_util.tree_map_with_path(convert, network.abstract_params(config))
