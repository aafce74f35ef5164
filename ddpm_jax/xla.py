"""Per-backend XLA compile options for the programs ddpm-jax jits.

On the CPU backend, XLA hands convolutions, dots and reductions to the YNNPACK library by
default. YNNPACK's convolution gradients are slow here (140-300 GFLOP/s on the DDPM UNet's
layers, against 380-430 for XLA's own Eigen kernels, forward included), and so are its batched
matrix products (Winograd's per-frequency products: 160-270 GFLOP/s against 260-290), so
ddpm-jax keeps YNNPACK for reductions only and gives convolutions and dots to XLA's own
kernels. Measured in `docs/benchmarks.md`; switch it off with
``config.cpu_conv_library = "default"``. Other backends get no options.
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
