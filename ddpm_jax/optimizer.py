"""The optimizer: AdamW with warmup and constant or cosine learning rate, global-norm clipping."""

from __future__ import annotations

import math

import jax
import ml_collections
import optax

from ddpm_jax.registry import check_choice

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


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when the optimizer settings cannot train."""
    if config.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    # inf or nan would train to all-NaN weights and end "successfully"
    if not 0 < config.learning_rate < math.inf:
        raise ValueError(f"learning_rate must be a positive finite number, got {config.learning_rate}")
    for field, low, high in (("adam_b1", 0, 1), ("adam_b2", 0, 1)):
        if not low <= config[field] < high:
            raise ValueError(f"{field} must be in [{low}, {high}), got {config[field]}")
    for field in ("adam_eps", "weight_decay", "grad_clip_norm"):
        if not 0 <= config[field] < math.inf:
            raise ValueError(f"{field} must be a finite number >= 0, got {config[field]}")
    check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
