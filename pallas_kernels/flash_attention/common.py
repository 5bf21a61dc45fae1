"""What every flash-attention lowering shares: the static spec, the score transform and tile math.

The score transform is written once in jnp so that the reference and every Pallas kernel body
(which also traces jnp on tiles) apply exactly the same masking, soft-capping and ALiBi; the tile
helpers below are plain jnp too, so each backend (Triton, Mosaic GPU, Mosaic TPU) traces them.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels._pallas_util import Refs

LOG2E = math.log2(math.e)

# Large finite negative instead of -inf so that fully masked rows never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static (hashable) description of one attention call; part of every kernel's cache key.

    Query row i sits at absolute position ``q_offset + i``; key j at position j. With ``causal`` the
    query sees keys ``j <= q_offset + i``; with ``sliding_window=w`` additionally
    ``j > q_offset + i - w``. Logits are ``x = scale * q.k - slope_h * |pos_q - pos_k|`` (the ALiBi term
    only with slopes), then ``cap * tanh(x / cap)`` when ``logits_soft_cap`` is set; capping last
    makes its derivative a function of the final logit alone (see ``soft_cap_grad``).
    """

    causal: bool = False
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    scale: float = 1.0
    q_offset: int = 0
    has_segment_ids: bool = False
    has_alibi: bool = False


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; ``None`` fields take the lowering's tuned default for the device."""

    block_q: int | None = None
    block_k: int | None = None
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None


# The fixed inputs of every lowering's backward kernels, in the order they are passed.
BWD_INPUTS = ("q", "k", "v", "do", "lse", "delta")


def kernel_refs(refs, inputs, has_seg: bool, has_alibi: bool, rest) -> Refs:
    """Names a kernel's refs: the ``inputs``, then ``q_seg``, ``kv_seg`` and ``slopes`` (None when
    the call has no segment ids / ALiBi slopes), then ``rest`` (outputs and scratch)."""
    optional = [("q_seg", has_seg), ("kv_seg", has_seg), ("slopes", has_alibi)]
    return Refs(refs, [(n, True) for n in inputs] + optional + [(n, True) for n in rest])


def transform_scores(s, q_pos, k_pos, spec: AttentionSpec, *, q_seg=None, k_seg=None, slope=None):
    """Turn raw ``q.k`` dot products into masked logits.

    Args:
      s: float32 raw dot products, shape ``(..., tq, tk)`` (not yet scaled).
      q_pos: int32 absolute query positions broadcastable to ``(..., tq, 1)``.
      k_pos: int32 key positions broadcastable to ``(..., 1, tk)``.
      q_seg, k_seg: segment ids broadcastable like the positions, or None.
      slope: ALiBi slope broadcastable against ``s``, or None.

    Returns:
      ``(logits, visible)``: logits with invisible entries set to ``MASK_VALUE``, and the boolean
      visibility mask (or None when everything is visible) which the backward pass reuses.
    """
    s = s * spec.scale
    if slope is not None:
        s = s - slope * jnp.abs(q_pos - k_pos).astype(jnp.float32)
    if spec.logits_soft_cap is not None:
        s = spec.logits_soft_cap * jnp.tanh(s / spec.logits_soft_cap)
    visible = None

    def both(a, b):
        return b if a is None else a & b

    if spec.causal:
        visible = both(visible, k_pos <= q_pos)
        if spec.sliding_window is not None:
            visible = both(visible, k_pos > q_pos - spec.sliding_window)
    if q_seg is not None:
        visible = both(visible, q_seg == k_seg)
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    return s, visible


def soft_cap_grad(logits_capped, spec: AttentionSpec):
    """d(logit)/d(pre-cap value) = 1 - tanh^2, from the (unmasked) final logit alone."""
    t = logits_capped / spec.logits_soft_cap
    return 1.0 - t * t


def base2(spec: AttentionSpec) -> AttentionSpec:
    """The spec whose logits are in log2 units, for kernels that use ``exp2``."""
    cap = spec.logits_soft_cap
    return dataclasses.replace(
        spec, scale=spec.scale * LOG2E, logits_soft_cap=None if cap is None else cap * LOG2E
    )


def interior(spec: AttentionSpec) -> AttentionSpec:
    """The spec for blocks inside the causal / window band (segment ids still apply)."""
    return dataclasses.replace(spec, causal=False, sliding_window=None)


def tile_logits(s, q_pos, k_pos, spec: AttentionSpec, *, masked=True, kv_len=None, q_seg=None,
                k_seg=None, slope=None):
    """``transform_scores`` on one kernel tile, plus masking of keys at ``k_pos >= kv_len``.

    ``masked=False`` marks a tile inside the causal / window band with no padded key: only
    segment ids apply there (``kv_len`` is ignored). Elementwise, so it serves (q, k) tiles and
    transposed (k, q) tiles alike. Returns ``(logits, visible)`` as ``transform_scores`` does.
    """
    if not masked:
        spec, kv_len = interior(spec), None
    logits, visible = transform_scores(
        s, q_pos, k_pos, spec, q_seg=q_seg, k_seg=k_seg, slope=slope
    )
    if kv_len is not None:
        in_range = k_pos < kv_len
        logits = jnp.where(in_range, logits, MASK_VALUE)
        visible = in_range if visible is None else visible & in_range
    return logits, visible


def score_grad(p, dp, delta, logits, visible, spec: AttentionSpec):
    """dL/d(pre-cap logit) = P * (dP - delta) [* cap'], the cap' taken from unmasked logits."""
    ds = p * (dp - delta)
    if spec.logits_soft_cap is not None:
        # Masked entries hold MASK_VALUE, whose square overflows; their P is 0 anyway.
        unmasked = logits if visible is None else jnp.where(visible, logits, 0.0)
        ds = ds * soft_cap_grad(unmasked, spec)
    return ds


def pad_to(x, axis: int, size: int, value=0):
    """``x`` padded with ``value`` at the end of ``axis`` to ``size``."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)
