"""AdamW with a warmup-cosine schedule, global-norm clipping and a weight-decay mask.

Decay is decoupled (AdamW) and skipped for norm scales and biases: shrinking a norm's gain or a
bias toward zero is a constraint on the function, not on its complexity, and hurts training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from meshlm.config import Config, ConfigError

# Leaf names that are never decayed, and path components that mark a normalization layer (its
# every parameter is exempt). Matching by name, not by rank, keeps the rule right when nn.scan
# stacks layers and turns a (d,) bias into a (layers, d) one.
NO_DECAY_NAMES = frozenset({"bias", "scale"})


def schedule_length(cfg: Config) -> int:
    """The update count at which the learning rate reaches its floor."""
    return cfg.optimizer.decay_steps if cfg.optimizer.decay_steps is not None else cfg.train.steps


def make_schedule(cfg: Config) -> optax.Schedule:
    """Learning rate of update ``count`` (0-based): linear warmup reaching ``lr`` on update
    ``warmup_steps``, then a half cosine reaching ``min_lr_ratio * lr`` on update
    ``schedule_length`` and staying there.

    Warmup starts at ``lr / warmup_steps`` rather than 0 so that no update is wasted.
    """
    opt = cfg.optimizer
    total = schedule_length(cfg)
    if opt.lr <= 0 or not 0 <= opt.min_lr_ratio <= 1:
        raise ConfigError(
            f"optimizer.lr must be > 0 and optimizer.min_lr_ratio in [0, 1]; got lr={opt.lr}, "
            f"min_lr_ratio={opt.min_lr_ratio}"
        )
    if opt.warmup_steps < 0 or opt.warmup_steps >= total:
        raise ConfigError(
            f"optimizer.warmup_steps={opt.warmup_steps} must be >= 0 and smaller than the schedule "
            f"length {total} (optimizer.decay_steps, or train.steps when that is null)"
        )
    peak, floor, warmup = opt.lr, opt.lr * opt.min_lr_ratio, opt.warmup_steps

    def schedule(count):
        t = jnp.asarray(count, jnp.float32) + 1.0  # 1-based index of the update being made
        warm = peak * t / max(warmup, 1)
        frac = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(t <= warmup, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """Pytree of bools: True where weight decay applies (kernels and embeddings)."""

    def decays(path, _) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
        if names and names[-1] in NO_DECAY_NAMES:
            return False
        return not any("norm" in n or n.startswith("ln") for n in names[:-1])

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, schedule)``: clip by global norm (if ``grad_clip > 0``), then masked AdamW."""
    opt = cfg.optimizer
    if opt.grad_clip < 0 or opt.weight_decay < 0:
        raise ConfigError(
            f"optimizer.grad_clip and optimizer.weight_decay must be >= 0; got "
            f"{opt.grad_clip}, {opt.weight_decay}"
        )
    schedule = make_schedule(cfg)
    adamw = optax.adamw(
        schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
        mask=decay_mask,
    )
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw) if opt.grad_clip else adamw
    return tx, schedule
