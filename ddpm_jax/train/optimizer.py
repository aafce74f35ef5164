"""The optimizer: AdamW with warmup and constant or cosine learning rate, global-norm clipping."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import ml_collections
import optax

from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice

LR_SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then constant or cosine decay to 0 at the last step."""
    warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
    if config.lr_schedule == "constant":
        after = optax.constant_schedule(config.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            config.learning_rate, max(config.num_train_steps - config.warmup_steps, 1)
        )
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only on kernels (ndim > 1)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask,
    )
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optimizer a train state holds: its settings, compared by value (two states built
    apart with the same settings have equal optimizers), and the optax transformation
    they make (`make_optimizer`)."""

    learning_rate: float
    warmup_steps: int
    lr_schedule: str
    num_train_steps: int
    adam_b1: float
    adam_b2: float
    adam_eps: float
    weight_decay: float
    grad_clip_norm: float

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Optimizer:
        return cls(**{field.name: config[field.name] for field in dataclasses.fields(cls)})

    @functools.cached_property
    def transformation(self) -> optax.GradientTransformation:
        return make_optimizer(ml_collections.ConfigDict(dataclasses.asdict(self)))

    def init(self, params: Any) -> Any:
        return self.transformation.init(params)

    def update(self, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        return self.transformation.update(grads, state, params)

    def learning_rate_at(self, step: jax.Array) -> jax.Array:
        return learning_rate_schedule(ml_collections.ConfigDict(dataclasses.asdict(self)))(step)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the field when the optimizer settings cannot train."""
    if config.warmup_steps < 0:
        raise UserError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    # inf or nan would train to all-NaN weights and end "successfully"
    if not 0 < config.learning_rate < math.inf:
        raise UserError(f"learning_rate must be a positive finite number, got {config.learning_rate}")
    for field, low, high in (("adam_b1", 0, 1), ("adam_b2", 0, 1)):
        if not low <= config[field] < high:
            raise UserError(f"{field} must be in [{low}, {high}), got {config[field]}")
    for field in ("adam_eps", "weight_decay", "grad_clip_norm"):
        if not 0 <= config[field] < math.inf:
            raise UserError(f"{field} must be a finite number >= 0, got {config[field]}")
    check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
