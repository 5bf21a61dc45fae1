"""The specification of flash attention: plain JAX, float32 throughout, no tiling.

This is the ``"xla"`` implementation. It materialises the full ``(q_len, kv_len)`` score matrix,
so it is meant for tests, small shapes and as the fallback where no kernel applies; its autodiff
is its backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.common import AttentionSpec, transform_scores


def attention(q, k, v, q_seg=None, kv_seg=None, alibi_slopes=None, relative_bias=None, *,
              spec: AttentionSpec):
    """Attention with the lowerings' forward signature; returns ``(out, lse)``.

    Args:
      q: ``(batch, q_len, heads, head_dim)``.
      k, v: ``(batch, kv_len, kv_heads, head_dim)``; ``heads`` is a multiple of ``kv_heads`` and
        query head ``h`` reads kv head ``h // (heads // kv_heads)``.
      q_seg, kv_seg: int32 ``(batch, q_len)`` / ``(batch, kv_len)`` segment ids, or None.
      alibi_slopes: float32 ``(heads,)`` or None.
      relative_bias: ``(table, q_positions, kv_positions)``: float ``(num_buckets, heads)`` and
        int32 ``(batch, q_len)`` / ``(batch, kv_len)``, bucketed by ``spec.relative``; or None.
      spec: the static masking / scaling description (see ``AttentionSpec``).

    Returns:
      ``out`` like ``q`` and ``lse`` float32 ``(batch, heads, q_len)``; a query row that sees no
      key gets ``out = 0`` and ``lse = -inf``.
    """
    batch, q_len, heads, head_dim = q.shape
    f32 = jnp.float32
    logits, visible = _logits(q, k, q_seg, kv_seg, alibi_slopes, spec, relative_bias)

    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - m)
    if visible is not None:
        # A row with no visible key has m = MASK_VALUE and would otherwise weigh every key by 1.
        p = jnp.where(visible, p, 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    dead = l == 0.0
    l_safe = jnp.where(dead, 1.0, l)
    o = jnp.einsum("bhgqk,bkhd->bhgqd", p, v.astype(f32), precision=_HI) / l_safe
    lse = jnp.where(dead, -jnp.inf, m + jnp.log(l_safe))[..., 0]

    out = o.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    return out, lse.reshape(batch, heads, q_len)


def backward(q, k, v, q_seg, kv_seg, alibi_slopes, out, lse, dout, *, spec: AttentionSpec):
    """``(dq, dk, dv)`` with the lowerings' backward signature: the softmax probabilities are
    ``exp(logits - lse)`` for the given ``lse`` and ``delta = rowsum(dout * out)`` for the given
    ``out``, which may belong to a softmax over more keys than ``k`` holds (ring attention).
    With ``(out, lse)`` of these keys alone it is the gradient of ``attention``."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    f32 = jnp.float32

    def per_group(x):  # (batch, q_len, heads) -> (batch, kv_heads, group, q_len, 1)
        return x.reshape(batch, q_len, kv_heads, group).transpose(0, 2, 3, 1)[..., None]

    delta = per_group(jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1))
    lse = per_group(jnp.swapaxes(lse.astype(f32), 1, 2))
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # a query that saw no key: p = 0
    do = dout.astype(f32).reshape(batch, q_len, kv_heads, group, head_dim)

    def objective(q, k, v):
        """Its gradient: dv = p^T do, and d(logits) = p * (do v^T - delta)."""
        logits, visible = _logits(q, k, q_seg, kv_seg, alibi_slopes, spec)
        p = jnp.exp(logits - lse)
        if visible is not None:
            p = jnp.where(visible, p, 0.0)
        pv = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, precision=_HI)
        return jnp.sum(pv * do) - jnp.sum(p * delta)

    grads = jax.grad(objective, argnums=(0, 1, 2))(q.astype(f32), k.astype(f32), v.astype(f32))
    return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))


_HI = jax.lax.Precision.HIGHEST


def _logits(q, k, q_seg, kv_seg, alibi_slopes, spec: AttentionSpec, relative_bias=None):
    """Scaled, masked logits ``(batch, kv_heads, group, q_len, kv_len)`` and the visibility
    mask (None: all visible)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    f32 = jnp.float32
    # Query heads as (kv_heads, group) so each group reads its kv head by broadcasting.
    qg = q.astype(f32).reshape(batch, q_len, kv_heads, group, head_dim)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(f32), precision=_HI)

    q_pos = spec.q_offset + jnp.arange(q_len, dtype=jnp.int32)[:, None]
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    q_s = k_s = slope = bias = None
    if q_seg is not None:
        q_s = q_seg[:, None, None, :, None]
        k_s = kv_seg[:, None, None, None, :]
    if alibi_slopes is not None:
        slope = alibi_slopes.astype(f32).reshape(kv_heads, group)[None, :, :, None, None]
    if relative_bias is not None:
        table, q_rpos, kv_rpos = relative_bias
        buckets = spec.relative.bucket(kv_rpos[:, None, :] - q_rpos[:, :, None])  # (B, Lq, Lk)
        bias = jnp.take(table.astype(f32), buckets, axis=0)  # (B, Lq, Lk, H)
        bias = bias.transpose(0, 3, 1, 2).reshape(batch, kv_heads, group, q_len, kv_len)
    return transform_scores(s, q_pos, k_pos, spec, q_seg=q_s, k_seg=k_s, slope=slope, bias=bias)
