"""Model FLOPs of a train step, and the devices' peaks: the TFLOP/s and MFU the loop logs.

The count is XLA's cost analysis of the step's program before optimisation, lowered for
the host's CPU: the program as written (every convolution and matmul as its multiply-adds),
the whole global batch before it is split over devices, and the same on every backend.
The compiled program is not: on a GPU its convolutions become cuDNN calls that the
analysis leaves out, and GPU and TPU backends give no count before optimisation.
Model-FLOP utilisation (MFU) divides the achieved FLOP/s per device by the device's dense
bfloat16 peak (the convention of MaxText and MaxDiffusion), whatever the compute dtype.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

# (pattern of `jax.Device.device_kind`, the vendor's dense bfloat16 peak per JAX device in
# units of 1e12 FLOP/s, without sparsity); the first match wins, so specific names come
# before general ones. TPU v2 and v3 show each of a chip's two cores as a device, so theirs
# is half the chip's. The sources are listed in docs/training.md.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bG?H200\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"^TPU v2\b", 22.5),
    (r"^TPU v3\b", 61.5),
    (r"^TPU v4\b", 275.0),
    (r"^TPU v5 lite\b", 197.0),  # v5e
    (r"^TPU v5p?$", 459.0),  # v5p
    (r"^TPU v6 lite\b", 918.0),  # v6e (Trillium)
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """A device's dense bfloat16 peak in FLOP/s: `override_tflops` (config
    `peak_tflops_per_device`) when set, else `PEAK_BF16_TFLOPS`; None for a device kind the
    table lacks (a CPU, say)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind):
            return tflops * 1e12
    return None


def _unplaced(tree: Any) -> Any:
    """Shapes and dtypes of `tree`'s leaves, without devices or shardings."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


def step_flops(step_fn: Callable[..., Any], state: Any, batch: Any) -> float:
    """FLOPs of one call `step_fn(state, batch)` over the global batch, from XLA's cost
    analysis of its program before optimisation, lowered for the host's CPU.

    `state` and `batch` may be arrays or `jax.ShapeDtypeStruct`s, placed anywhere; nothing
    is compiled or run. A loop's body is counted once, so `step_fn` should be one step
    without micro-batches.
    """
    with jax.default_device(jax.devices("cpu")[0]):
        lowered = jax.jit(step_fn).lower(*_unplaced((state, batch)))
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list):  # older jaxlibs: one dict per program
        analysis = analysis[0]
    return float(analysis["flops"])


def tflops_per_device(flops_per_step: float, steps_per_second: float,
                      device_count: int) -> float:
    """Model TFLOP/s each device achieves: the step's FLOPs, shared by `device_count`."""
    return flops_per_step * steps_per_second / device_count / 1e12
