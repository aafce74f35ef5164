"""Backend-specific speed code, chosen per config and handed to the net and the train step.

Nothing here changes what is computed, only how (results agree to float rounding):
  * `layer_ops`: the net's convolution, GroupNorm, upsampling and attention
    (`models.LayerOps`): Winograd 3x3 convolutions and the phase upsample (`winograd.py`),
    convolution gradients in XLA:CPU's fast layout (`conv.py`), a GroupNorm with
    channel-row statistics (`group_norm.py`) and single-head attention with its projections
    folded (`attention.py`);
  * `compiler_options`: XLA options for the programs ddpm-jax jits (`xla.py`);
  * `compute_chunks`, `steps_per_dispatch`: how a step's work is cut (`dispatch.py`).
Measurements behind each default: docs/benchmarks.md and docs/performance-notes.md.
"""

from __future__ import annotations

import jax
import ml_collections

from ddpm_jax.core.registry import check_choice
from ddpm_jax.models.layers import LayerOps, upsample_then_conv
from ddpm_jax.ops import conv, dispatch, group_norm, winograd, xla
from ddpm_jax.ops.attention import FoldedAttention
from ddpm_jax.ops.dispatch import compute_chunks, steps_per_dispatch
from ddpm_jax.ops.xla import compiler_options

CONV_ALGORITHMS = ("auto", "direct", "winograd")


def conv_algorithm(config: ml_collections.ConfigDict) -> str:
    """`config.conv_algorithm` with "auto" resolved: Winograd on the CPU backend, XLA's
    convolutions ("direct") elsewhere (cuDNN and the TPU compiler choose their own)."""
    choice = config.get("conv_algorithm", "auto")
    if choice == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "direct"
    return choice


def layer_ops(config: ml_collections.ConfigDict) -> LayerOps:
    """The layer implementations for `config` on this process's backend."""
    if conv_algorithm(config) == "winograd":
        return LayerOps(conv_general_dilated=winograd.conv_general_dilated,
                        group_norm=group_norm.GroupNorm, upsample_conv=winograd.upsample_conv,
                        attention=FoldedAttention)
    return LayerOps(conv_general_dilated=conv.conv_general_dilated,
                    group_norm=group_norm.GroupNorm, upsample_conv=upsample_then_conv,
                    attention=FoldedAttention)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for a speed setting that cannot work."""
    check_choice("conv_algorithm", config.get("conv_algorithm", "auto"), CONV_ALGORITHMS)
    check_choice("cpu_conv_library", config.get("cpu_conv_library", "eigen"),
                 xla.CPU_CONV_LIBRARIES)
    dispatch.check_config(config)


__all__ = ["CONV_ALGORITHMS", "check_config", "compiler_options", "compute_chunks",
           "conv_algorithm", "layer_ops", "steps_per_dispatch"]
