"""Model registry: ``build_model(cfg.model)`` by ``cfg.model.family``, FLOP counts, KV caches."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.config import ModelConfig

_REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {}


def register(name: str):
    """Class decorator: ``build_model`` constructs ``cls(config=cfg)`` for ``family == name``."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"model family {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return wrap


def build_model(cfg: ModelConfig) -> nn.Module:
    """The (stateless) Flax module for ``cfg``; parameters come from ``model.init``."""
    cfg.validate()
    if cfg.family not in _REGISTRY:
        raise ValueError(
            f"unknown model.family {cfg.family!r}; registered: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[cfg.family](config=cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, for MFU (PaLM appendix B convention).

    ``6 * N`` for the matmul parameters N (attention q/k/v/out and MLP kernels of every layer,
    plus the ``d_model * vocab`` LM head, counted even when tied because the product is
    computed), plus attention scores and the weighted sum: ``2 * 2 * seq_len * n_heads *
    head_dim`` forward per layer, times 3 for the backward, halved because causal attention
    needs only the lower triangle: ``6 * n_layers * seq_len * n_heads * head_dim``. Embedding
    lookups, norms, biases and activations are not counted (not matmuls).
    """
    if cfg.family != "gpt":
        raise ValueError(f"flops_per_token knows family 'gpt' only, got {cfg.family!r}")
    d, hd = cfg.d_model, cfg.dim_per_head
    attention = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    mlp = d * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    matmul_params = cfg.n_layers * (attention + mlp) + d * cfg.vocab_size
    return 6.0 * matmul_params + 6.0 * cfg.n_layers * seq_len * cfg.n_heads * hd


def init_cache(model: nn.Module, batch_size: int, max_len: int):
    """Zeros for ``model``'s ``"cache"`` collection holding up to ``max_len`` tokens per row.

    Shapes come from ``jax.eval_shape`` of ``model.init(..., decode=True)`` (nothing is
    computed); leaves stay boxed with their logical axes so callers can shard the cache.
    A cache longer than a learned position table fails there, in the model's own length check.
    """
    tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
    shapes = jax.eval_shape(
        lambda t: model.init(jax.random.key(0), t, decode=True), tokens
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


from meshlm.models import gpt  # noqa: E402,F401  (registers "gpt")

__all__ = ["build_model", "flops_per_token", "init_cache", "register"]
