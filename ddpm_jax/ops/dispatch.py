"""How a train step's work is cut: chunks per device batch, and steps per compiled call.

Neither changes results: every example draws its own timestep, noise and dropout masks
(`train.step.train_step`), so a batch gives the same gradient in one pass or in chunks, and
several steps in one call are the same steps. Measurements behind the CPU defaults are in
docs/performance-notes.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections

from ddpm_jax.core.errors import UserError

CPU_CHUNK_SIZE = 16  # compute_chunk_size=0 on the CPU backend
CPU_STEPS_PER_DISPATCH = 4  # steps_per_dispatch=0 on the CPU backend, where it divides the intervals


def compute_chunks(config: ml_collections.ConfigDict, per_device_batch: int) -> int:
    """Sequential chunks each device's (micro-)batch is split into (1: none).

    `config.compute_chunk_size` caps the examples one forward/backward pass runs on; 0 means
    `CPU_CHUNK_SIZE` on the CPU backend, where XLA:CPU loses speed on larger batches, and no
    cap elsewhere; -1 never splits.
    """
    limit = config.get("compute_chunk_size", 0)
    if limit == 0:
        limit = CPU_CHUNK_SIZE if jax.default_backend() == "cpu" else -1
    if limit < 0 or per_device_batch <= limit:
        return 1
    return next(k for k in range(2, per_device_batch + 1)
                if per_device_batch % k == 0 and per_device_batch // k <= limit)


def steps_per_dispatch(config: ml_collections.ConfigDict, intervals: Sequence[int]) -> int:
    """Train steps each compiled call runs, `config.steps_per_dispatch` with 0 resolved.

    0 means, on the CPU backend, the largest of `CPU_STEPS_PER_DISPATCH`, 2 and 1 that divides
    every event interval in `intervals` (so that one program serves the whole run): XLA:CPU
    maps a call's temporary buffers afresh on every call. 1 elsewhere.
    """
    chosen = config.get("steps_per_dispatch", 1)
    if chosen:
        return chosen
    if jax.default_backend() != "cpu":
        return 1
    return next(k for k in (CPU_STEPS_PER_DISPATCH, 2, 1)
                if all(interval % k == 0 for interval in intervals))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for a `compute_chunk_size` or `steps_per_dispatch` that cannot work."""
    chunk = config.get("compute_chunk_size", 0)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < -1:
        raise UserError("compute_chunk_size must be a positive integer, 0 (automatic) or -1 "
                         f"(never split), got {chunk!r}")
    per_call = config.get("steps_per_dispatch", 0)
    if not isinstance(per_call, int) or isinstance(per_call, bool) or per_call < 0:
        raise UserError("steps_per_dispatch must be a positive integer or 0 (automatic), got "
                         f"{per_call!r}")
