"""Normalisation layers. Statistics are always computed in float32, whatever the compute dtype:
bfloat16 has too few mantissa bits for a mean of squares over thousands of features."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * scale (+ bias)`` over the last axis (GPT-2)."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (features,), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (features,), self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (LLaMA); no centring, no bias."""

    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jnp.reciprocal(jnp.sqrt(ms + self.epsilon)) * scale.astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(kind: str, *, epsilon: float, use_bias: bool, dtype, param_dtype,
              name: str) -> nn.Module:
    """``kind`` is ``"layernorm"`` (bias follows ``use_bias``) or ``"rmsnorm"``."""
    if kind == "layernorm":
        return LayerNorm(epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'")
