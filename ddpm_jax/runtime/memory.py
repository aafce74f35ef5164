"""Whether the compiled train step fits in memory, checked before training starts.

XLA's memory analysis of the compiled step gives what one device holds while it runs
(arguments, outputs not aliased to them, temporaries, code). On an accelerator that is
compared with the device's memory limit. On the CPU the devices are the host, so the whole
process is counted: what it holds now (libraries, compiled programs), the step on every
local device, what the host holds besides the step (batches read ahead and stacked for a
call, the host copy a checkpoint save makes of the state) and headroom for later compiles
(sampler, FID) and the allocator; that is compared with the host memory available now plus
what the process already holds. `benchmarks/memory_estimate.py` measures real peaks against
it. A run that cannot fit is refused with the settings that shrink it, instead of growing
until the out-of-memory killer ends it.
"""

from __future__ import annotations

import jax
from absl import logging

from ddpm_jax.core.errors import UserError


class MemoryCheckError(UserError):
    """The train step needs more memory than the devices have."""


def step_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Peak bytes one device holds while running `compiled` (None where XLA does not say)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes
               + stats.generated_code_size_in_bytes)


# Headroom on the CPU for what comes after the check (the sampler's and FID's compiles,
# allocator slack): a fraction of the estimate, and at least a floor.
HEADROOM_FRACTION = 0.15
HEADROOM_MIN_BYTES = 384 * 2**20


def proc_bytes(path: str, field: str) -> int | None:
    """A "Field: N kB" line of a /proc file (Linux) in bytes, else None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """The process's resident memory now (VmRSS), else None."""
    return proc_bytes("/proc/self/status", "VmRSS")


def peak_resident_bytes() -> int | None:
    """The process's peak resident memory so far (VmHWM), else None. Unlike a parent's
    `ru_maxrss` of it, this counts nothing from before the program was started."""
    return proc_bytes("/proc/self/status", "VmHWM")


def _host_available_bytes() -> int | None:
    """The host memory available now (MemAvailable), else None."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


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


_SHRINK = ("Lower batch_size (or raise grad_accum_steps), lower data.image_size, or set "
           "model.remat=True; or set check_memory=False if you know better")


def host_estimate(step: int, host: dict[str, int]) -> dict[str, int] | None:
    """The CPU process's peak, by part: `now` (resident), `step` (every local device's),
    the `host` parts, `headroom` and `total`; None where the resident size is unknown."""
    now = resident_bytes()
    if now is None:
        return None
    parts = {"now": now, "step": step * jax.local_device_count(), **host}
    subtotal = sum(parts.values())
    parts["headroom"] = max(HEADROOM_MIN_BYTES, int(HEADROOM_FRACTION * subtotal))
    parts["total"] = subtotal + parts["headroom"]
    return parts


def check_step_fits(compiled: jax.stages.Compiled, what: str = "the train step",
                    host: dict[str, int] | None = None) -> None:
    """Logs the step's memory and raises MemoryCheckError when it exceeds the devices'; on
    the CPU, when the process's estimated peak (`host_estimate`, with the `host` parts the
    caller holds besides the step) exceeds the host memory it can have."""
    needed = step_bytes(compiled)
    available, where = available_bytes()
    if needed is None:
        logging.warning("XLA gives no memory analysis of %s on this backend: not checked", what)
        return
    logging.info("%s needs %s (XLA's memory analysis)", what, describe(needed, available, where))
    if available is not None and needed > available:
        raise MemoryCheckError(
            f"{what} needs {human_bytes(needed)} per device, more than the {human_bytes(available)} of "
            f"{where}. {_SHRINK}")
    if jax.local_devices()[0].platform != "cpu":
        return
    parts, free = host_estimate(needed, host or {}), _host_available_bytes()
    if parts is None or free is None:
        return
    can_have = free + parts["now"]
    summary = ", ".join(f"{name} {human_bytes(value)}" for name, value in parts.items()
                        if name != "total")
    logging.info("the process will peak at about %s of host memory (%s; it can have %s)",
                 human_bytes(parts["total"]), summary, human_bytes(can_have))
    if parts["total"] > can_have:
        raise MemoryCheckError(
            f"the run would peak at about {human_bytes(parts['total'])} of host memory ({summary}), "
            f"more than the {human_bytes(can_have)} it can have. {_SHRINK}")
