"""LayerNorm / RMSNorm in plain JAX: the ``"xla"`` implementation and the kernels' test oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def layer_norm(x, scale, bias, *, subtract_mean: bool, epsilon: float, dtype):
    """Float32 statistics over the last axis (the variance as the mean of squared deviations,
    as ``flax.linen.LayerNorm(use_fast_variance=False)``), cast to ``dtype``."""
    h = x.astype(f32)
    if subtract_mean:
        h = h - jnp.mean(h, axis=-1, keepdims=True)
    out = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + epsilon)
    out = out * scale.astype(f32)
    if bias is not None:
        out = out + bias.astype(f32)
    return out.astype(dtype)
