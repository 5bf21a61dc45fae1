"""AdamW with a warmup-cosine schedule, global-norm clipping and a weight-decay mask.

Decay is decoupled (AdamW) and skipped for norm scales and biases: shrinking a norm's gain or a
bias toward zero is a constraint on the function, not on its complexity, and hurts training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from meshlm.config import Config, ConfigError

log = logging.getLogger(__name__)

# Leaf names that are never decayed, and path components that mark a normalization layer (its
# every parameter is exempt). Matching by name, not by rank, keeps the rule right when nn.scan
# stacks layers and turns a (d,) bias into a (layers, d) one.
NO_DECAY_NAMES = frozenset({"bias", "scale"})


def schedule_length(cfg: Config) -> int:
    """The update count at which the learning rate reaches its floor."""
    return cfg.optimizer.decay_steps if cfg.optimizer.decay_steps is not None else cfg.train.steps


def _schedule_shape(cfg: Config) -> tuple[float, float, int, int]:
    """``(peak, floor, warmup, total)`` of ``cfg``'s schedule. A warmup that is not shorter
    than the schedule is clamped to one update short of it, so that a short trial run
    (``train.steps`` below the config's warmup) trains instead of stopping."""
    opt = cfg.optimizer
    total = schedule_length(cfg)
    if opt.lr <= 0 or not 0 <= opt.min_lr_ratio <= 1:
        raise ConfigError(
            f"optimizer.lr must be > 0 and optimizer.min_lr_ratio in [0, 1]; got lr={opt.lr}, "
            f"min_lr_ratio={opt.min_lr_ratio}"
        )
    if opt.warmup_steps < 0 or total < 1:
        raise ConfigError(
            f"optimizer.warmup_steps={opt.warmup_steps} must be >= 0 and the schedule length "
            f"{total} (optimizer.decay_steps, or train.steps when that is null) >= 1"
        )
    return opt.lr, opt.lr * opt.min_lr_ratio, min(opt.warmup_steps, total - 1), total


def _warmup_cosine(peak: float, floor: float, warmup: int, total: int) -> optax.Schedule:
    """Linear warmup to ``peak`` over ``warmup`` updates, then cosine to ``floor`` at ``total``.

    Not ``optax.warmup_cosine_decay_schedule``: that one is indexed by the updates already made
    (its first update uses ``init_value``, 0 by default, a wasted step), this one by the update
    being made, so update 1 uses ``peak / warmup`` and update ``total`` exactly ``floor`` for
    every ``warmup`` including 0, which optax's cannot express (it needs ``warmup_steps >= 1``
    for a non-zero first rate).
    """
    def schedule(count):
        t = jnp.asarray(count, jnp.float32) + 1.0  # 1-based index of the update being made
        warm = peak * t / max(warmup, 1)
        frac = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(t <= warmup, warm, cosine)

    return schedule


def make_schedule(cfg: Config) -> optax.Schedule:
    """Learning rate of update ``count`` (0-based): linear warmup reaching ``lr`` on update
    ``warmup_steps``, then a half cosine reaching ``min_lr_ratio * lr`` on update
    ``schedule_length`` and staying there.

    Warmup starts at ``lr / warmup_steps`` rather than 0 so that no update is wasted. A warmup
    at least as long as the schedule is shortened to fit, with a one-line note.
    """
    shape = _schedule_shape(cfg)
    warmup = shape[2]
    if warmup < cfg.optimizer.warmup_steps:
        log.warning(
            "optimizer.warmup_steps=%d is not shorter than the %d-step schedule "
            "(optimizer.decay_steps, or train.steps when that is null): warming up over %d "
            "steps instead; set optimizer.warmup_steps to choose",
            cfg.optimizer.warmup_steps, shape[3], warmup,
        )
    return _warmup_cosine(*shape)


def schedule_change_note(saved: Config, cfg: Config, step: int) -> str | None:
    """One line when resuming ``saved``'s run at ``step`` with ``cfg`` changes the learning-rate
    schedule because ``train.steps`` changed and ``optimizer.decay_steps`` is unset (the cosine
    is stretched or squeezed to the new length, so the rate jumps); None otherwise."""
    old_total, new_total = schedule_length(saved), schedule_length(cfg)
    if cfg.optimizer.decay_steps is not None or old_total == new_total:
        return None
    old = float(_warmup_cosine(*_schedule_shape(saved))(step))
    new = float(_warmup_cosine(*_schedule_shape(cfg))(step))
    return (
        f"the learning-rate schedule now decays over {new_total} steps instead of {old_total} "
        f"(train.steps changed and optimizer.decay_steps is unset): at step {step} the rate "
        f"goes from {old:.3g} to {new:.3g}; set optimizer.decay_steps={old_total} to keep the "
        "old schedule"
    )


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
