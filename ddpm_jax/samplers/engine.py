"""The sampling engine: a reverse-diffusion run of any registered sampler as one loop.

`reverse_plan` fixes a run on the host (the visited timesteps, the sampler's per-step
coefficients, where snapshots go); `reverse_init`, `reverse_steps` and `reverse_result` run
it, in one call (`sample`) or a chunk of steps at a time (a caller that must answer a stop
request), with the same result. Every step calls the network once through `denoise_fn` and
the sampler's `step` (`base.Sampler`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import schedules
from ddpm_jax.core.diffusion import DenoiseFn, Schedule, split_output
from ddpm_jax.core.errors import UserError
from ddpm_jax.samplers.base import SAMPLERS, Sampler
from ddpm_jax.samplers.settings import SamplerSettings


def sampling_timesteps(schedule: Schedule, sampler: str, num_steps: int | None,
                       spacing: str | None = "auto") -> np.ndarray:
    """Descending timesteps sampler `sampler` visits with `num_steps` (None or 0: its default)
    by `spacing` ("auto": the sampler's default)."""
    abar = np.exp(schedules.log_alphas_cumprod(np.asarray(schedule.betas)))
    return SAMPLERS.get(sampler).timesteps(abar, num_steps or 0, spacing)


def snapshot_slots(num_steps: int, num_snapshots: int) -> np.ndarray:
    """For each sampler step, the snapshot slot its output fills, or -1.

    Snapshots are spread evenly along the chain and the last one is the final sample.
    """
    slots = -np.ones(num_steps, dtype=np.int32)
    if num_snapshots > 0:
        picks = np.round(np.linspace(num_steps - 1, 0, num_snapshots)[::-1]).astype(int)
        if len(set(picks.tolist())) != num_snapshots:
            raise UserError(f"cannot take {num_snapshots} snapshots from {num_steps} steps")
        slots[picks] = np.arange(num_snapshots)
    return slots


class ReversePlan(NamedTuple):
    """A reverse-diffusion run fixed on the host: sampler, visited timesteps and settings.

    `reverse_init`, `reverse_steps` and `reverse_result` run it; `sample` runs it in one go,
    a caller that must stay responsive (a stop request) runs it a chunk of steps at a time,
    with the same result.
    """

    sampler: Sampler
    options: dict[str, Any]  # the sampler's knobs, resolved (`SamplerSettings.options`)
    steps: np.ndarray  # int32 [S], descending
    prev_steps: np.ndarray  # int32 [S], -1 after the last
    slots: np.ndarray  # int32 [S], snapshot slot written after step i (-1: none)
    coefficients: Any  # pytree of [S, ...] arrays (the sampler's `prepare`), or None
    shape: tuple[int, ...]
    prediction: str
    variance: str
    clip_x0: bool
    num_snapshots: int

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def reverse_plan(
    schedule: Schedule,
    shape: tuple[int, ...],
    settings: SamplerSettings,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
    num_snapshots: int = 0,
) -> ReversePlan:
    """The plan of a run of the sampler `settings` chooses, with a concrete `schedule`."""
    chosen = settings.sampler
    steps = sampling_timesteps(schedule, settings.name, settings.num_steps,
                               settings.spacing).astype(np.int32)
    prev_steps = np.append(steps[1:], -1).astype(np.int32)
    # Per-step arrays the sampler computes on the host; row i reaches step i.
    coefficients = chosen.prepare(schedule, steps, prev_steps) if chosen.prepare else None
    return ReversePlan(chosen, settings.options, steps, prev_steps,
                       snapshot_slots(len(steps), num_snapshots).astype(np.int32), coefficients,
                       tuple(shape), prediction, variance, clip_x0, num_snapshots)


def reverse_init(plan: ReversePlan, rng: jax.Array,
                 initial_noise_sharding: jax.sharding.Sharding | None = None) -> tuple:
    """The carry before the first step: (x_T, sampler state, snapshots, per-step keys)."""
    init_rng, loop_rng = jax.random.split(rng)
    x = jax.random.normal(init_rng, plan.shape, jnp.float32)
    if initial_noise_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, initial_noise_sharding)
    snapshots = jnp.zeros((max(plan.num_snapshots, 1),) + plan.shape, jnp.float32)
    return x, plan.sampler.init_state(x), snapshots, jax.random.split(loop_rng, plan.num_steps)


def reverse_steps(plan: ReversePlan, denoise_fn: DenoiseFn, schedule: Schedule, carry: tuple,
                  start: int | jax.Array, stop: int | jax.Array) -> tuple:
    """Runs steps `start` to `stop - 1` of the plan on `carry` (bounds may be traced)."""
    chosen, shape = plan.sampler, plan.shape
    steps, prev_steps, slots = map(jnp.asarray, (plan.steps, plan.prev_steps, plan.slots))
    coefficients = jax.tree.map(jnp.asarray, plan.coefficients)

    def body(i, carry):
        x, state, snapshots, step_rngs = carry
        t, t_prev, slot = steps[i], prev_steps[i], slots[i]
        t_batch = jnp.full((shape[0],), t, jnp.int32)
        model_output, values = split_output(denoise_fn(x, t_batch).astype(jnp.float32),
                                            plan.variance)
        noise = jax.random.normal(step_rngs[i], shape, jnp.float32)
        extra = ({"coefficients": jax.tree.map(lambda a: a[i], coefficients)}
                 if chosen.prepare else {})
        x, state = chosen.step(schedule, model_output, x, t_batch, jnp.full_like(t_batch, t_prev),
                               noise, state, prediction=plan.prediction,
                               variance=plan.variance if values is None else values,
                               clip_x0=plan.clip_x0, **plan.options, **extra)
        if plan.num_snapshots > 0:
            snapshots = jax.lax.cond(
                slot >= 0, lambda s: s.at[slot].set(x), lambda s: s, snapshots
            )
        return x, state, snapshots, step_rngs

    return jax.lax.fori_loop(start, stop, body, carry)


def reverse_result(plan: ReversePlan, carry: tuple) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The final samples, and with snapshots also [num_snapshots, *shape] of x_t."""
    x, _, snapshots, _ = carry
    return (x, snapshots) if plan.num_snapshots > 0 else x


def sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    spacing: str | None = "auto",
    eta: float | None = None,
    options: Mapping[str, Any] | None = None,
    initial_noise_sharding: jax.sharding.Sharding | None = None,
    **process: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """A whole reverse-diffusion run as one loop (one compiled program when jitted).

    `denoise_fn(x_t, t)` returns the network output for a batch `x_t` and per-example
    timesteps `t` (int32, shape [B]). `sampler` names a registered sampler, `num_steps` its
    network calls (0 or None: its default) and `spacing` which timesteps it visits ("auto":
    its default); `eta` and `options` set its knobs (those it does not have are ignored);
    `process` are `reverse_plan`'s `prediction`, `variance`, `clip_x0` (as the network was
    trained) and `num_snapshots`. Returns the final samples, and with `num_snapshots > 0`
    also an array [num_snapshots, *shape] of intermediate x_t (the last snapshot is the
    final sample). Call it under `jax.jit`, with a concrete `schedule`.
    """
    given = {**({"eta": eta} if eta is not None else {}), **(options or {})}
    settings = SamplerSettings(sampler, num_steps or 0, given, spacing or "auto")
    plan = reverse_plan(schedule, shape, settings, **process)
    carry = reverse_init(plan, rng, initial_noise_sharding)
    return reverse_result(plan, reverse_steps(plan, denoise_fn, schedule, carry, 0,
                                              plan.num_steps))
