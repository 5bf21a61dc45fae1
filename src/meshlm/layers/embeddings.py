"""Token embeddings (with the tied output projection), learned absolute positions and RoPE."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
    """A ``(vocab, embed)`` table: ``__call__`` looks tokens up, ``attend`` is the tied LM head.

    Out-of-range ids give NaN rows (``jnp.take``'s fill mode) rather than a silently clamped row.
    """

    num_embeddings: int
    features: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype,
        )

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0, mode="fill").astype(self.dtype)

    def attend(self, x):
        """Logits ``x @ embedding.T`` in ``dtype`` with float32 accumulation and float32 output."""
        return jnp.einsum(
            "...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


class LearnedPositions(nn.Module):
    """GPT-2's absolute position table ``(max_len, embed)``; positions >= max_len give NaN."""

    max_len: int
    features: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions):
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (None, "embed")),
            (self.max_len, self.features), self.param_dtype,
        )
        return jnp.take(table, positions, axis=0, mode="fill").astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout (GPT-NeoX / HF LLaMA).

    Feature ``i < D/2`` is paired with feature ``i + D/2`` and the pair is rotated by the angle
    ``position * theta ** (-2i / D)``. Computed in float32 (angles of positions in the thousands
    lose all precision in bfloat16), returned in ``x.dtype``.

    Args:
      x: ``(batch, length, heads, head_dim)`` with an even ``head_dim``.
      positions: ``(batch, length)`` integer positions.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (batch, length, half)
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
