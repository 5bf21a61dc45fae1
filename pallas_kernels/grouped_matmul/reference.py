"""The specification of a grouped matmul, in plain JAX with float32 products: one dense matmul
per group over that group's rows (the others masked to zero), summed. ``g`` times the work of
``jax.lax.ragged_dot``, and obviously right; the tests' oracle."""

from __future__ import annotations

import jax.numpy as jnp


def row_groups(group_sizes, m: int):
    """The group of every row ``(m,)`` int32; ``len(group_sizes)`` for rows past their sum."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=None):
    """``out[r] = lhs[r] @ rhs[group of r]``, zero for rows past ``sum(group_sizes)``; float32
    products, the result in ``preferred_element_type`` (default lhs's dtype)."""
    groups = row_groups(group_sizes, lhs.shape[0])
    one_hot = groups[None, :] == jnp.arange(rhs.shape[0], dtype=jnp.int32)[:, None]  # (g, m)
    masked = jnp.where(one_hot[:, :, None], lhs.astype(jnp.float32)[None], 0.0)
    out = jnp.einsum("gmk,gkn->mn", masked, rhs.astype(jnp.float32),
                     precision="highest")
    return out.astype(preferred_element_type or lhs.dtype)
