"""The optimizer: AdamW with warmup and constant or cosine learning rate, global-norm clipping."""

from __future__ import annotations

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
    if not config.learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {config.learning_rate}")
    check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
