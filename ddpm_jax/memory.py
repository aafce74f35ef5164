"""Whether the compiled train step fits in memory, checked before training starts.

XLA's memory analysis of the compiled step gives what one device holds while it runs
(arguments, outputs not aliased to them, temporaries, code). That is compared with what
the device has: the accelerator's memory limit, or on CPU the host memory available now
(all local CPU devices share it). A step that cannot fit is refused with the settings that
shrink it, instead of growing until the out-of-memory killer ends the run.
"""

from __future__ import annotations

import jax
from absl import logging


class MemoryCheckError(ValueError):
    """The train step needs more memory than the devices have."""


def step_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Peak bytes one device holds while running `compiled` (None where XLA does not say)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes
               + stats.generated_code_size_in_bytes)


def _host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes() -> tuple[int | None, str]:
    """(bytes one device may use, what that is), None where it cannot be told."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        available = _host_available_bytes()
        count = jax.local_device_count()
        if available is None:
            return None, "host memory"
        return available // count, (f"available host memory / {count} CPU devices"
                                    if count > 1 else "available host memory")
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return (int(limit), f"{device.device_kind} memory") if limit else (None, "device memory")


def human_bytes(value: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def describe(needed: int, available: int | None, where: str) -> str:
    """`N per device (where: M)`, as the logs and `--dry_run` print it."""
    return (f"{human_bytes(needed)} per device ({where}: "
            f"{human_bytes(available) if available else 'unknown'})")


def check_step_fits(compiled: jax.stages.Compiled, what: str = "the train step") -> None:
    """Logs the step's memory and raises MemoryCheckError when it exceeds the devices'."""
    needed = step_bytes(compiled)
    available, where = available_bytes()
    if needed is None:
        logging.warning("XLA gives no memory analysis of %s on this backend: not checked", what)
        return
    summary = describe(needed, available, where)
    logging.info("%s needs %s (XLA's memory analysis)", what, summary)
    if available is not None and needed > available:
        raise MemoryCheckError(
            f"{what} needs {human_bytes(needed)} per device, more than the {human_bytes(available)} of "
            f"{where}. Lower batch_size (or raise grad_accum_steps), lower data.image_size, "
            "or set model.remat=True; or set check_memory=False if you know better")
