"""The DDPM math as pure functions: arrays in, arrays out, no hidden state.

Everything here is independent of the network and of the training loop. A noise
schedule is a pytree of per-timestep arrays (`Schedule`); every other function
takes it as its first argument, so it can be passed through `jax.jit` like any
other array. Beta schedules (`schedules.py`) and samplers (`samplers/`) are chosen
by name from registries.

Conventions:
  * Timesteps are integers in ``[0, T)``; ``t = 0`` is the least noisy step.
  * ``x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps``.
  * A network output is interpreted by its *prediction target*: ``eps`` (the noise,
    as in Ho et al. 2020), ``x0`` (the clean image) or ``v``
    (``sqrt(abar) * eps - sqrt(1 - abar) * x0``, Salimans & Ho 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.registry import check_choice
from ddpm_jax.schedules import BETA_SCHEDULES

PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("mse", "l1", "huber")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSS_WEIGHTINGS = ("none", "min_snr")


class Schedule(NamedTuple):
    """Per-timestep coefficients of the forward and reverse processes, each shape [T]."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_betas(
    kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Beta schedule `kind` (registered in `schedules.BETA_SCHEDULES`) in float64.

    Raises ValueError for an unknown kind, T < 1, or betas outside (0, 1).
    """
    schedule = BETA_SCHEDULES.get(kind)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    betas = np.asarray(schedule(num_timesteps, beta_start, beta_end), np.float64)
    if betas.shape != (num_timesteps,) or not np.all((betas > 0) & (betas < 1)):
        raise ValueError(
            f"the {kind} schedule with beta_start={beta_start}, beta_end={beta_end} gives betas "
            f"in [{betas.min():.3g}, {betas.max():.3g}]; every beta must lie in (0, 1)")
    return betas


def make_schedule(
    kind: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    dtype: jnp.dtype = jnp.float32,
) -> Schedule:
    """Builds every per-timestep coefficient in float64, then casts to `dtype`."""
    betas = make_betas(kind, num_timesteps, beta_start, beta_end)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] is 0; clip its log like the reference implementation.
    posterior_log_variance_clipped = np.log(
        np.append(posterior_variance[1] if num_timesteps > 1 else betas[0], posterior_variance[1:])
    )
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=dtype) for k, v in arrays.items()})


def schedule_from_config(config: ml_collections.ConfigDict) -> Schedule:
    """The schedule of `config.diffusion`."""
    d = config.diffusion
    return make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def extract(coefficients: jax.Array, t: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
    """Gathers `coefficients[t]` and reshapes it to broadcast against an [B, ...] array."""
    values = jnp.take(coefficients, jnp.asarray(t), axis=0)
    return values.reshape(values.shape + (1,) * (len(x_shape) - values.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0) with the given standard-normal `noise`."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def _signal_and_noise_scales(
    schedule: Schedule, t: jax.Array, x_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_shape),
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_shape),
    )


def prediction_target(
    schedule: Schedule, prediction: str, x0: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """What the network is trained to output for target `prediction`."""
    check_choice("prediction target", prediction, PREDICTIONS)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    signal, sigma = _signal_and_noise_scales(schedule, t, x0.shape)
    return signal * noise - sigma * x0


def model_output_to_x0_eps(
    schedule: Schedule, prediction: str, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Turns a network output into the implied (x0, eps) pair for x_t at step t."""
    check_choice("prediction target", prediction, PREDICTIONS)
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t.shape)
    if prediction == "eps":
        eps = model_output
        return (x_t - sigma * eps) / signal, eps
    if prediction == "x0":
        x0 = model_output
        return x0, (x_t - signal * x0) / sigma
    x0 = signal * x_t - sigma * model_output
    eps = sigma * x_t + signal * model_output
    return x0, eps


def regression_loss(prediction: jax.Array, target: jax.Array, loss_type: str = "mse") -> jax.Array:
    """Per-example loss, averaged over every non-batch axis."""
    check_choice("loss", loss_type, LOSSES)
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    if loss_type == "mse":
        elementwise = jnp.square(diff)
    elif loss_type == "l1":
        elementwise = jnp.abs(diff)
    else:  # Huber with delta 1, as torch.nn.functional.smooth_l1_loss.
        elementwise = jnp.where(jnp.abs(diff) < 1.0, 0.5 * jnp.square(diff), jnp.abs(diff) - 0.5)
    return jnp.mean(elementwise, axis=tuple(range(1, diff.ndim)))


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
    """Uniform training timesteps in [0, T)."""
    return jax.random.randint(rng, (batch_size,), 0, num_timesteps)


def q_posterior_mean_variance(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def split_output(network_output: jax.Array, variance: str) -> tuple[jax.Array, jax.Array | None]:
    """(prediction, variance values): with "learned_range" the network's channels are the
    prediction then as many variance values v in [-1, 1]; otherwise all prediction."""
    if variance != "learned_range":
        return network_output, None
    prediction, values = jnp.split(network_output, 2, axis=-1)
    return prediction, values


def learned_log_variance(min_log: jax.Array, max_log: jax.Array,
                         values: jax.Array) -> jax.Array:
    """Nichol & Dhariwal's learned range: log variance frac * max_log + (1 - frac) * min_log
    with frac = (v + 1) / 2, between the posterior's (min) and beta's (max)."""
    fraction = (values + 1.0) / 2.0
    return fraction * max_log + (1.0 - fraction) * min_log


def _reverse_log_variance(schedule: Schedule, variance: str) -> jax.Array:
    """Per-step log-variance of p(x_{t-1} | x_t) for a fixed variance rule."""
    check_choice("sampling variance", variance, VARIANCES[:2])
    if variance == "fixed_small":
        return schedule.posterior_log_variance_clipped
    # "fixed large": beta_t, except at t = 0 where the posterior's value is used
    # (it is never added, since the last step is noise-free).
    return jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))


def reverse_log_variance(schedule: Schedule, variance: str | jax.Array, t: jax.Array,
                         x_shape: tuple[int, ...]) -> jax.Array:
    """log variance of p(x_{t-1} | x_t): `variance` names a fixed rule, or is the network's
    variance values (learned range, between the clipped posterior's and log beta_t)."""
    if isinstance(variance, str):
        return extract(_reverse_log_variance(schedule, variance), t, x_shape)
    return learned_log_variance(extract(schedule.posterior_log_variance_clipped, t, x_shape),
                                extract(jnp.log(schedule.betas), t, x_shape), variance)


def reverse_mean_log_variance(
    schedule: Schedule, network_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
    prediction: str, variance: str, clip_x0: bool,
) -> tuple[jax.Array, jax.Array]:
    """Mean and log variance of the model's p(x_{t-1} | x_t) from the raw network output."""
    model_output, values = split_output(network_output, variance)
    x0, _ = model_output_to_x0_eps(schedule, prediction, model_output, x_t, t)
    mean, _, _ = q_posterior_mean_variance(schedule, _maybe_clip(x0, clip_x0), x_t, t)
    log_variance = reverse_log_variance(schedule, variance if values is None else values, t,
                                        x_t.shape)
    return mean, jnp.broadcast_to(log_variance, x_t.shape)


def _maybe_clip(x0: jax.Array, clip_x0: bool) -> jax.Array:
    return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    prediction: str = "eps",
    variance: str | jax.Array = "fixed_small",
    clip_x0: bool = True,
) -> jax.Array:
    """One ancestral step x_t -> x_{t-1} of Ho et al. (2020); noise-free at t = 0.

    `variance` names a fixed rule, or is the network's variance values (learned range).
    """
    x0, _ = model_output_to_x0_eps(schedule, prediction, model_output, x_t, t)
    mean, _, _ = q_posterior_mean_variance(schedule, _maybe_clip(x0, clip_x0), x_t, t)
    log_variance = reverse_log_variance(schedule, variance, t, x_t.shape)
    nonzero = (jnp.asarray(t) > 0).astype(x_t.dtype)
    nonzero = nonzero.reshape(nonzero.shape + (1,) * (x_t.ndim - nonzero.ndim))
    return mean + nonzero * jnp.exp(0.5 * log_variance) * noise


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    noise: jax.Array,
    eta: float = 0.0,
    *,
    prediction: str = "eps",
    clip_x0: bool = True,
) -> jax.Array:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); `t_prev < 0` means x_0.

    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is DDPM posterior sampling.
    eps is recomputed from the (possibly clipped) x0 so that this identity holds
    with clipping too.
    """
    x0, _ = model_output_to_x0_eps(schedule, prediction, model_output, x_t, t)
    x0 = _maybe_clip(x0, clip_x0)
    abar_t = extract(schedule.alphas_cumprod, t, x_t.shape)
    t_prev = jnp.asarray(t_prev)
    abar_prev = jnp.where(
        t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], jnp.ones((), x_t.dtype)
    )
    abar_prev = abar_prev.reshape(abar_prev.shape + (1,) * (x_t.ndim - abar_prev.ndim))
    eps = (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(abar_prev) * x0 + direction + sigma * noise


def log_alphas_cumprod(schedule: Schedule) -> np.ndarray:
    """log(abar_t) in float64 on the host, from the schedule's betas: for coefficients a
    sampler computes once (a difference of two close abar loses its digits in float32)."""
    return np.cumsum(np.log1p(-np.asarray(schedule.betas, np.float64)))


def sampling_timesteps(schedule: Schedule, sampler: str, num_steps: int | None,
                       spacing: str | None = "auto") -> np.ndarray:
    """Descending timesteps sampler `sampler` visits with `num_steps` (None or 0: its default)
    by `spacing` ("auto": the sampler's default)."""
    from ddpm_jax.samplers import SAMPLERS  # the samplers' files import this module

    abar = np.exp(log_alphas_cumprod(schedule))
    return SAMPLERS.get(sampler).timesteps(abar, num_steps or 0, spacing)


def snapshot_slots(num_steps: int, num_snapshots: int) -> np.ndarray:
    """For each sampler step, the snapshot slot its output fills, or -1.

    Snapshots are spread evenly along the chain and the last one is the final sample.
    """
    slots = -np.ones(num_steps, dtype=np.int32)
    if num_snapshots > 0:
        picks = np.round(np.linspace(num_steps - 1, 0, num_snapshots)[::-1]).astype(int)
        if len(set(picks.tolist())) != num_snapshots:
            raise ValueError(f"cannot take {num_snapshots} snapshots from {num_steps} steps")
        slots[picks] = np.arange(num_snapshots)
    return slots


DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def optimal_gaussian_eps(schedule: Schedule, mean: float, std: float) -> DenoiseFn:
    """The exact E[eps | x_t] for data ~ N(mean, std^2) in every dimension: a perfect
    "network" for that data, so samplers can be checked without training one."""

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        abar = extract(schedule.alphas_cumprod, t, x.shape)
        variance_t = abar * std**2 + (1 - abar)
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mean) / variance_t

    return denoise


class ReversePlan(NamedTuple):
    """A reverse-diffusion run fixed on the host: sampler, visited timesteps and settings.

    `reverse_init`, `reverse_steps` and `reverse_result` run it; `sample` runs it in one go,
    a caller that must stay responsive (a stop request) runs it a chunk of steps at a time,
    with the same result.
    """

    sampler: Any  # the registered `samplers.Sampler`
    knobs: dict[str, Any]
    steps: np.ndarray  # int32 [S], descending
    prev_steps: np.ndarray  # int32 [S], -1 after the last
    slots: np.ndarray  # int32 [S], snapshot slot written after step i (-1: none)
    step_data: Any  # pytree of [S, ...] arrays, or None
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
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
    num_snapshots: int = 0,
    options: Mapping[str, Any] | None = None,
    spacing: str | None = "auto",
) -> ReversePlan:
    """The plan of a run (arguments as `sample`), with a concrete `schedule`."""
    from ddpm_jax.samplers import SAMPLERS  # the samplers' files import this module

    chosen = SAMPLERS.get(sampler)
    steps = sampling_timesteps(schedule, sampler, num_steps, spacing).astype(np.int32)
    prev_steps = np.append(steps[1:], -1).astype(np.int32)
    # Per-step arrays the sampler computes on the host; row i reaches step i.
    step_data = chosen.prepare(schedule, steps, prev_steps) if chosen.prepare else None
    return ReversePlan(chosen, chosen.resolve_options({"eta": eta, **(options or {})}), steps,
                       prev_steps, snapshot_slots(len(steps), num_snapshots).astype(np.int32),
                       step_data, tuple(shape), prediction, variance, clip_x0, num_snapshots)


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
    step_data = jax.tree.map(jnp.asarray, plan.step_data)

    def body(i, carry):
        x, state, snapshots, step_rngs = carry
        t, t_prev, slot = steps[i], prev_steps[i], slots[i]
        t_batch = jnp.full((shape[0],), t, jnp.int32)
        model_output, values = split_output(denoise_fn(x, t_batch).astype(jnp.float32),
                                            plan.variance)
        noise = jax.random.normal(step_rngs[i], shape, jnp.float32)
        extra = ({"step_data": jax.tree.map(lambda a: a[i], step_data)}
                 if chosen.prepare else {})
        x, state = chosen.step(schedule, model_output, x, t_batch, jnp.full_like(t_batch, t_prev),
                               noise, state, prediction=plan.prediction,
                               variance=plan.variance if values is None else values,
                               clip_x0=plan.clip_x0, **plan.knobs, **extra)
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
    initial_noise_sharding: jax.sharding.Sharding | None = None,
    **settings: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """A whole reverse-diffusion run as one loop (one compiled program when jitted).

    `denoise_fn(x_t, t)` returns the network output for a batch `x_t` and per-example
    timesteps `t` (int32, shape [B]). `settings` are `reverse_plan`'s: `sampler` names a
    registered sampler, `num_steps` its network calls (0 or None: its default) and `spacing`
    which timesteps it visits ("auto": its default); `eta` and `options` set its knobs
    (those it does not have are ignored); `prediction`, `variance`, `clip_x0` as the
    network was trained. Returns the final samples, and with `num_snapshots > 0` also an
    array [num_snapshots, *shape] of intermediate x_t (the last snapshot is the final
    sample). Call it under `jax.jit`, with a concrete `schedule`.
    """
    plan = reverse_plan(schedule, shape, **settings)
    carry = reverse_init(plan, rng, initial_noise_sharding)
    return reverse_result(plan, reverse_steps(plan, denoise_fn, schedule, carry, 0,
                                              plan.num_steps))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when `config.diffusion` cannot train or sample."""
    d = config.diffusion
    for field, value, choices in (("prediction", d.prediction, PREDICTIONS),
                                  ("loss", d.loss, LOSSES), ("variance", d.variance, VARIANCES),
                                  ("loss_weighting", d.loss_weighting, LOSS_WEIGHTINGS)):
        check_choice(f"diffusion.{field}", value, choices)
    if not d.min_snr_gamma > 0:
        raise ValueError(f"diffusion.min_snr_gamma must be positive, got {d.min_snr_gamma}")
    if not d.vlb_weight >= 0:
        raise ValueError(f"diffusion.vlb_weight must be >= 0, got {d.vlb_weight}")
    if not 0 < d.beta_start <= d.beta_end < 1:
        raise ValueError(
            f"diffusion.beta_start={d.beta_start} and diffusion.beta_end={d.beta_end} must "
            "satisfy 0 < beta_start <= beta_end < 1 (noise grows along the chain; Ho et al.: "
            "1e-4 and 0.02)")
    try:
        make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    except ValueError as error:
        raise ValueError(f"diffusion.*: {error}") from error
