"""Per-backend XLA compile options for the programs ddpm-jax jits.

On the CPU backend, XLA hands convolutions, dots and reductions to the YNNPACK library by
default. Its convolution gradients and batched matrix products are slower than XLA's own
kernels for this net (docs/performance-notes.md), so ddpm-jax keeps YNNPACK for reductions
only. Switch it off with ``config.cpu_conv_library = "default"``. Other backends get no
options.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
from absl import logging

CPU_CONV_LIBRARIES = ("eigen", "default")
_CPU_OPTIONS = (
    ("xla_cpu_experimental_ynn_fusion_type",
     "LIBRARY_FUSION_TYPE_REDUCE"),
)


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib knows the options (they are experimental and may be renamed)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
        return True
    except Exception as error:  # an unknown option or enum value
        logging.warning("XLA does not accept %s (%s); compiling with its defaults", options, error)
        return False


def compiler_options(config: ml_collections.ConfigDict | None = None) -> dict[str, str] | None:
    """Options for `jax.jit(..., compiler_options=...)` on this process's backend, or None."""
    library = config.get("cpu_conv_library", "eigen") if config is not None else "eigen"
    if jax.default_backend() != "cpu" or library != "eigen" or not _accepted(_CPU_OPTIONS):
        return None
    return dict(_CPU_OPTIONS)
