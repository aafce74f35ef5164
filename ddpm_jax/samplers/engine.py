"""The sampling engine: a reverse-diffusion run of any registered sampler as one loop.

`reverse_plan` fixes a run on the host (the network calls with their timesteps or noise
levels, the sampler's per-call coefficients, where snapshots go); `reverse_init`,
`reverse_steps` and `reverse_result` run it, in one call (`sample`) or a chunk of calls at a
time (a caller that must answer a stop request), with the same result. Every iteration
calls the network once through `denoise_fn` and then the sampler's `step` (`base.Sampler`):
a timestep sampler gets the raw output, a sigma sampler the denoiser D(x; sigma) the model's
preconditioning makes of it (`core/edm.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import edm, schedules
from ddpm_jax.core.diffusion import DenoiseFn, Schedule, split_output
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice
from ddpm_jax.samplers import spacing as spacings
from ddpm_jax.samplers.base import SAMPLERS, Sampler
from ddpm_jax.samplers.settings import SamplerSettings
from ddpm_jax.samplers.spacing import SPACINGS


def alphas_cumprod(schedule: Schedule) -> np.ndarray:
    """The schedule's cumulative alphas in float64, from its betas."""
    return schedules.alphas_cumprod(np.asarray(schedule.betas))


def sampling_timesteps(schedule: Schedule, sampler: str, num_steps: int | None,
                       spacing: str | None = "auto",
                       spacing_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Descending timesteps sampler `sampler` visits with `num_steps` (None or 0: its default)
    by `spacing` ("auto": the sampler's default)."""
    return SAMPLERS.get(sampler).timesteps(alphas_cumprod(schedule), num_steps or 0, spacing,
                                           spacing_options)


def sampling_sigmas(preconditioning: edm.Preconditioning, settings: SamplerSettings
                    ) -> np.ndarray:
    """The descending noise levels (all above 0) the grid of `settings` visits on a model
    with `preconditioning`: the sigmas of its timesteps for a discrete model, else the
    continuous spacing's."""
    chosen = settings.sampler
    spacing = chosen.resolve_spacing(settings.spacing)
    if isinstance(preconditioning, edm.DiscretePreconditioning):
        abar = preconditioning.alphas_cumprod
        steps = chosen.timesteps(abar, settings.num_steps, spacing, settings.spacing_options)
        return preconditioning.sigmas[steps]
    calls = settings.num_steps or chosen.default_steps
    if not calls:
        raise UserError(f"{settings.name} has no default number of steps on a continuous-sigma "
                        "model; set num_steps")
    return spacings.sigmas(spacing, *preconditioning.sigma_range, chosen.grid_size(calls),
                           settings.spacing_options)


def check_section(section: Mapping[str, Any], prefix: str,
                  preconditioning: edm.Preconditioning) -> int:
    """The network calls of the sampler a config section chooses, on a model with
    `preconditioning`; UserError naming `prefix`.* when it cannot run."""
    check_choice(f"{prefix}.sampler", section.sampler, SAMPLERS.names())
    chosen = SAMPLERS.get(section.sampler)
    for key, choices in chosen.option_choices.items():
        check_choice(f"{prefix}.{key}", section.get(key, chosen.options[key]), choices)
    settings = SamplerSettings.from_config(section)
    spacing = settings.sampler.resolve_spacing(settings.spacing)
    check_choice(f"{prefix}.spacing", spacing, SPACINGS.names())
    _check_guidance(preconditioning, settings, f"{prefix}.guidance_interval")
    try:
        if settings.sampler.space == "sigma":
            return len(sigma_calls(preconditioning, settings)[0])
        if preconditioning.continuous:
            _refuse_timestep_sampler(settings.name)
        return len(settings.sampler.timesteps(preconditioning.alphas_cumprod,
                                              settings.num_steps, spacing,
                                              settings.spacing_options))
    except ValueError as error:
        raise UserError(f"{prefix}.*: {error}") from error


def sigma_calls(preconditioning: edm.Preconditioning, settings: SamplerSettings
                ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """A sigma sampler's network calls on its grid (`Sampler.plan_calls`): the sigma of each
    call's input, its per-call arrays, and the std of x at the start."""
    chosen = settings.sampler
    grid = sampling_sigmas(preconditioning, settings)
    calls = settings.num_steps or chosen.default_steps or len(grid)
    return chosen.plan_calls(grid, calls, preconditioning.round, **settings.options)


def _check_guidance(preconditioning: edm.Preconditioning, settings: SamplerSettings,
                    field: str = "guidance_interval") -> None:
    """Refuses a guidance interval (in timesteps) for a model with continuous noise levels."""
    if preconditioning.continuous and settings.guidance.interval:
        raise UserError(f"{field} is in timesteps of the discrete schedule; a model trained "
                        "with diffusion.formulation='edm' has none: leave it ()")


def _refuse_timestep_sampler(name: str) -> None:
    sigma_samplers = [n for n in SAMPLERS.names() if SAMPLERS.get(n).space == "sigma"]
    raise UserError(f"the {name} sampler steps between the timesteps of a discrete schedule; "
                    "this model was trained with continuous noise levels "
                    f"(diffusion.formulation='edm'): use one of {', '.join(sigma_samplers)}")


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
    """A reverse-diffusion run fixed on the host: sampler, its network calls and settings.

    `reverse_init`, `reverse_steps` and `reverse_result` run it; `sample` runs it in one go,
    a caller that must stay responsive (a stop request) runs it a chunk of steps at a time,
    with the same result.
    """

    sampler: Sampler
    options: dict[str, Any]  # the sampler's knobs, resolved (`SamplerSettings.options`)
    # [S]: the net's time input at each call: descending int32 timesteps, or for a sigma
    # sampler the model's c_noise (a discrete model's timesteps, an EDM model's float32)
    steps: np.ndarray
    prev_steps: np.ndarray  # int32 [S], -1 after the last (timestep samplers)
    slots: np.ndarray  # int32 [S], snapshot slot written after step i (-1: none)
    # pytree of [S, ...] arrays: the sampler's `prepare`, or None; for a sigma sampler its
    # per-call arrays and the preconditioning (c_skip, c_out, c_in)
    coefficients: Any
    shape: tuple[int, ...]
    prediction: str
    variance: str
    clip_x0: bool
    num_snapshots: int
    initial_scale: float = 1.0  # x starts as N(0, initial_scale^2)
    sampling_variance: str | None = None  # the steps' rule, if not the model's `variance`

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
    preconditioning: edm.Preconditioning | None = None,
) -> ReversePlan:
    """The plan of a run of the sampler `settings` chooses, with a concrete `schedule`, for a
    model whose noise levels `preconditioning` gives (None: the discrete `schedule`
    predicting `prediction`)."""
    chosen = settings.sampler
    if preconditioning is None:
        preconditioning = edm.DiscretePreconditioning(alphas_cumprod(schedule), prediction)
    _check_guidance(preconditioning, settings)
    if chosen.space == "sigma":
        return _sigma_plan(preconditioning, shape, settings, prediction=prediction,
                           variance=variance, clip_x0=clip_x0, num_snapshots=num_snapshots)
    if preconditioning.continuous:
        _refuse_timestep_sampler(settings.name)
    steps = sampling_timesteps(schedule, settings.name, settings.num_steps, settings.spacing,
                               settings.spacing_options).astype(np.int32)
    prev_steps = np.append(steps[1:], -1).astype(np.int32)
    # Per-step arrays the sampler computes on the host; row i reaches step i.
    coefficients = chosen.prepare(schedule, steps, prev_steps) if chosen.prepare else None
    options = dict(settings.options)
    named = options.pop("variance", None)
    rule = (None if named is None
            else sampling_variance(named, variance, len(steps), schedule.num_timesteps))
    return ReversePlan(chosen, options, steps, prev_steps,
                       snapshot_slots(len(steps), num_snapshots).astype(np.int32), coefficients,
                       tuple(shape), prediction, variance, clip_x0, num_snapshots,
                       sampling_variance=rule)


def sampling_variance(named: str, model_variance: str, num_steps: int, num_timesteps: int
                      ) -> str:
    """The variance rule of ancestral steps: `named`, or for "auto" the model's own
    (`model_variance`) over every timestep or when it is learned, and the posterior's
    (fixed_small) on a chain respaced to fewer steps: Nichol & Dhariwal (2021, section 4)
    find that a respaced chain of a model trained with a fixed variance wants it."""
    if named != "auto":
        return named
    if model_variance == "learned_range" or num_steps >= num_timesteps:
        return model_variance
    return "fixed_small"


def _sigma_plan(preconditioning: edm.Preconditioning, shape: tuple[int, ...],
                settings: SamplerSettings, *, prediction: str, variance: str, clip_x0: bool,
                num_snapshots: int) -> ReversePlan:
    """The plan of a sigma sampler: its calls on the grid, and at each the model's
    preconditioning (c_skip, c_out, c_in and the net's time input c_noise)."""
    call_sigmas, rows, initial_scale = sigma_calls(preconditioning, settings)
    preconditioned = preconditioning.coefficients(call_sigmas)
    labels = preconditioned.pop("c_noise")
    # x after each call, as x_t of a variance-preserving chain, for snapshots
    rows["snapshot_scale"] = 1.0 / np.sqrt(1.0 + np.asarray(rows["sigma_after"]) ** 2)
    coefficients = {key: np.asarray(value, np.float32)
                    for key, value in {**rows, **preconditioned, "sigma": call_sigmas}.items()}
    count = len(call_sigmas)
    return ReversePlan(settings.sampler, settings.options,
                       labels.astype(np.int32 if not preconditioning.continuous else np.float32),
                       -np.ones(count, np.int32),
                       snapshot_slots(count, num_snapshots).astype(np.int32), coefficients,
                       tuple(shape), prediction, variance, clip_x0, num_snapshots,
                       float(initial_scale))


def reverse_init(plan: ReversePlan, rng: jax.Array,
                 initial_noise_sharding: jax.sharding.Sharding | None = None) -> tuple:
    """The carry before the first step: (x_T, sampler state, snapshots, per-step keys)."""
    init_rng, loop_rng = jax.random.split(rng)
    x = jax.random.normal(init_rng, plan.shape, jnp.float32)
    if plan.initial_scale != 1.0:
        x = x * jnp.float32(plan.initial_scale)
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

    def timestep_step(i, x, state, noise):
        t, t_prev = steps[i], prev_steps[i]
        t_batch = jnp.full((shape[0],), t, jnp.int32)
        model_output, values = split_output(denoise_fn(x, t_batch).astype(jnp.float32),
                                            plan.variance)
        extra = ({"coefficients": jax.tree.map(lambda a: a[i], coefficients)}
                 if chosen.prepare else {})
        rule = plan.sampling_variance or plan.variance  # a fixed rule, or the learned values
        x, state = chosen.step(schedule, model_output, x, t_batch, jnp.full_like(t_batch, t_prev),
                               noise, state, prediction=plan.prediction,
                               variance=values if rule == "learned_range" else rule,
                               clip_x0=plan.clip_x0, **plan.options, **extra)
        return x, state, x

    def sigma_step(i, x, state, noise):
        row = jax.tree.map(lambda a: a[i], coefficients)
        label = jnp.full((shape[0],), steps[i], steps.dtype)
        output, _ = split_output(denoise_fn(row["c_in"] * x, label).astype(jnp.float32),
                                 plan.variance)  # a learned variance plays no part
        denoised = row["c_skip"] * x + row["c_out"] * output  # D(x; sigma), EDM eq. (7)
        if plan.clip_x0:
            denoised = jnp.clip(denoised, -1.0, 1.0)
        x, state = chosen.step(denoised, x, noise, state, coefficients=row, **plan.options)
        # A snapshot shows x as x_t of a variance-preserving chain (x at sigma 0 as is).
        return x, state, x * row["snapshot_scale"]

    one_step = sigma_step if chosen.space == "sigma" else timestep_step

    def body(i, carry):
        x, state, snapshots, step_rngs = carry
        noise = jax.random.normal(step_rngs[i], shape, jnp.float32)
        x, state, snapshot = one_step(i, x, state, noise)
        if plan.num_snapshots > 0:
            slot = slots[i]
            snapshots = jax.lax.cond(
                slot >= 0, lambda s: s.at[slot].set(snapshot), lambda s: s, snapshots
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
