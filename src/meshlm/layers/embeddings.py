"""Token embeddings (with the tied output projection), learned absolute positions and RoPE."""

from __future__ import annotations

import functools
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
        return logits_matmul(x.astype(self.dtype), self.embedding.astype(self.dtype), True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def logits_matmul(x: jax.Array, table: jax.Array, vocab_major: bool) -> jax.Array:
    """The LM head: ``x (..., d)`` times ``table`` (``(vocab, d)`` if ``vocab_major`` else
    ``(d, vocab)``), both in the compute dtype, accumulated and returned in float32.

    Plain autodiff would contract the float32 logits cotangent with the compute-dtype operands,
    i.e. two float32 matmuls of the model's largest shape (tokens x vocab x d). The backward here
    rounds the cotangent to the operands' dtype first (as mixed-precision training does for every
    other layer), so both gradient matmuls run at the compute dtype's rate with float32
    accumulation. With float32 compute it is exactly autodiff's gradient.
    """
    spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
    return jnp.einsum(spec, x, table, preferred_element_type=jnp.float32)


def _logits_matmul_fwd(x, table, vocab_major):
    return logits_matmul(x, table, vocab_major), (x, table)


def _logits_matmul_bwd(vocab_major, residuals, g):
    x, table = residuals
    g = g.astype(x.dtype)
    w_spec = "vd" if vocab_major else "dv"
    dx = jnp.einsum(f"...v,{w_spec}->...d", g, table, preferred_element_type=jnp.float32)
    dtable = jnp.einsum(f"...v,...d->{w_spec}", g, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dtable.astype(table.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


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
