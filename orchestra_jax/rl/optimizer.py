"""optax AdamW with a learning-rate schedule and global-norm gradient clipping."""

from __future__ import annotations

import optax

from orchestra_jax.config import OptimizerConfig


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """'constant', 'warmup-constant' (linear warmup from 0) or 'cosine' (warmup, then cosine decay to 0)."""
    warmup = max(config.warmup_steps, 0)
    if config.schedule == "constant":
        return optax.constant_schedule(config.lr)
    if config.schedule == "warmup-constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.lr, max(warmup, 1)), optax.constant_schedule(config.lr)], [warmup]
        )
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total_steps, warmup + 1), 0.0)
    raise ValueError(f"optimizer.schedule: unknown schedule {config.schedule!r}")


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW (decoupled weight decay) on the schedule above."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(make_schedule(config, total_steps), b1=config.b1, b2=config.b2, weight_decay=config.weight_decay),
    )
