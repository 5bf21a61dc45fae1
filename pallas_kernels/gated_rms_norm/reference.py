"""The gated RMSNorm in plain JAX: the ``"xla"`` implementation and the kernels' test oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def gated_rms_norm(y, z, scale, *, groups: int, epsilon: float, dtype):
    """``scale * rmsnorm(y * silu(z))`` over ``groups`` groups of the last axis, float32
    statistics, cast to ``dtype``."""
    features = y.shape[-1]
    h = y.astype(f32) * jax.nn.silu(z.astype(f32))
    g = h.reshape(h.shape[:-1] + (groups, features // groups))
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + epsilon)
    return (g.reshape(h.shape) * scale.astype(f32)).astype(dtype)
