"""What every flash-attention lowering shares: the static spec, the score transform and tile math.

The score transform is written once in jnp so that the reference and every Pallas kernel body
(which also traces jnp on tiles) apply exactly the same masking, soft-capping and ALiBi; the tile
helpers below are plain jnp too, so each backend (Triton, Mosaic GPU, Mosaic TPU) traces them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._pallas_util import Refs

LOG2E = math.log2(math.e)

# Large finite negative instead of -inf so that fully masked rows never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class RelativeBuckets:
    """T5's bucketing of ``key_position - query_position`` (Raffel et al. 2020, section 2.1).

    Bidirectional: half the buckets for keys after the query, half for keys at or before it.
    Unidirectional (causal): keys after the query share bucket 0. Within a direction, distances
    below half its buckets get one bucket each; larger ones share logarithmically wider buckets
    up to ``max_distance``, beyond which all share the last.
    """

    num_buckets: int
    bidirectional: bool
    max_distance: int

    def __post_init__(self):
        half = self.num_buckets // 2 if self.bidirectional else self.num_buckets
        if half < 2 or self.max_distance <= half // 2:
            raise ValueError(
                f"relative buckets need num_buckets >= {4 if self.bidirectional else 2} and "
                f"max_distance > the exact buckets ({half // 2}); got num_buckets="
                f"{self.num_buckets}, max_distance={self.max_distance}")

    def bucket(self, relative_position):
        """int32 bucket of each ``key_position - query_position`` (any shape; jnp, so the
        reference, the model layer and the kernel bodies trace the same code)."""
        rel = relative_position.astype(jnp.int32)
        if self.bidirectional:
            offset = (rel > 0).astype(jnp.int32) * (self.num_buckets // 2)
            distance = jnp.abs(rel)
        else:
            offset, distance = 0, jnp.maximum(-rel, 0)
        bucket = jnp.minimum(distance, _log_thresholds(self)[0])
        for threshold in _log_thresholds(self)[1:]:
            bucket = bucket + (distance >= threshold).astype(jnp.int32)
        return offset + bucket


@functools.lru_cache(maxsize=None)
def _log_thresholds(rb: RelativeBuckets) -> tuple[int, ...]:
    """``(max_exact, d_1, d_2, ...)``: the bucket of a distance ``d >= max_exact`` is
    ``max_exact + #{i: d >= d_i}``.

    T5 defines the wide buckets as ``max_exact + int(log(d / max_exact) / log(max_distance /
    max_exact) * (n - max_exact))`` (capped at ``n - 1``) with the logarithm in float32, as Mesh
    TensorFlow and HuggingFace compute it so that bucket edges agree with their checkpoints. Its
    edges are found here once, in numpy float32, so a kernel compares integers instead of taking
    a logarithm whose last bit could differ between XLA and Triton.
    """
    n = rb.num_buckets // 2 if rb.bidirectional else rb.num_buckets
    max_exact = n // 2
    d = np.arange(max_exact, rb.max_distance + 1, dtype=np.int64)
    scaled = (np.log(d.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(rb.max_distance / max_exact))
              * np.float32(n - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int32), n - 1)  # non-decreasing in d
    edges = np.searchsorted(large, np.arange(max_exact + 1, n), side="left")
    return (max_exact, *(int(d[0] + e) for e in edges))


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static (hashable) description of one attention call; part of every kernel's cache key.

    Query row i sits at absolute position ``q_offset + i``; key j at position j. With ``causal`` the
    query sees keys ``j <= q_offset + i``; with ``sliding_window=w`` additionally
    ``j > q_offset + i - w``. Logits are ``x = scale * q.k - slope_h * |pos_q - pos_k|`` (the ALiBi term
    only with slopes), then ``cap * tanh(x / cap)`` when ``logits_soft_cap`` is set; capping last
    makes its derivative a function of the final logit alone (see ``soft_cap_grad``). With
    ``relative`` the logits also get ``table[relative.bucket(kv_pos - q_pos), h]`` (T5's bias,
    from per-row positions given with the call) next to the ALiBi term.
    """

    causal: bool = False
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    scale: float = 1.0
    q_offset: int = 0
    has_segment_ids: bool = False
    has_alibi: bool = False
    relative: RelativeBuckets | None = None

    @property
    def has_relative_bias(self) -> bool:
        return self.relative is not None


@dataclasses.dataclass(frozen=True)
class Call:
    """The static shape of one call: what a lowering's ``supports`` and ``default_tiles`` see."""

    q_shape: tuple[int, ...]  # (batch, q_len, heads, head_dim)
    k_shape: tuple[int, ...]  # (batch, kv_len, kv_heads, head_dim)
    dtype: jnp.dtype
    spec: AttentionSpec
    return_lse: bool = False

    @property
    def head_dim(self) -> int:
        return self.q_shape[-1]


# The fixed inputs of every lowering's backward kernels, in the order they are passed.
BWD_INPUTS = ("q", "k", "v", "do", "lse", "delta")


def kernel_refs(refs, inputs, has_seg: bool, has_alibi: bool, rest, has_rel: bool = False,
                has_spans: bool = False) -> Refs:
    """Names a kernel's refs: the ``inputs``, then ``q_seg``, ``kv_seg``, ``slopes``, the
    relative bias's ``q_rpos``, ``kv_rpos``, ``table`` and the ``document_spans`` (None when the
    call has no segment ids / ALiBi slopes / relative bias / spans), then ``rest`` (outputs and
    scratch)."""
    optional = [("q_seg", has_seg), ("kv_seg", has_seg), ("slopes", has_alibi),
                ("q_rpos", has_rel), ("kv_rpos", has_rel), ("table", has_rel),
                ("spans", has_spans)]
    return Refs(refs, [(n, True) for n in inputs] + optional + [(n, True) for n in rest])


def transform_scores(s, q_pos, k_pos, spec: AttentionSpec, *, q_seg=None, k_seg=None, slope=None,
                     bias=None):
    """Turn raw ``q.k`` dot products into masked logits.

    Args:
      s: float32 raw dot products, shape ``(..., tq, tk)`` (not yet scaled).
      q_pos: int32 absolute query positions broadcastable to ``(..., tq, 1)``.
      k_pos: int32 key positions broadcastable to ``(..., 1, tk)``.
      q_seg, k_seg: segment ids broadcastable like the positions, or None.
      slope: ALiBi slope broadcastable against ``s``, or None.
      bias: float32 additive bias broadcastable against ``s`` (the relative bias, gathered in
        the spec's units), or None.

    Returns:
      ``(logits, visible)``: logits with invisible entries set to ``MASK_VALUE``, and the boolean
      visibility mask (or None when everything is visible) which the backward pass reuses.
    """
    s = s * spec.scale
    if bias is not None:
        s = s + bias
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
                k_seg=None, slope=None, bias=None):
    """``transform_scores`` on one kernel tile, plus masking of keys at ``k_pos >= kv_len``.

    ``masked=False`` marks a tile inside the causal / window band with no padded key: only
    segment ids apply there (``kv_len`` is ignored). Elementwise, so it serves (q, k) tiles and
    transposed (k, q) tiles alike. Returns ``(logits, visible)`` as ``transform_scores`` does.
    """
    if not masked:
        spec, kv_len = interior(spec), None
    logits, visible = transform_scores(
        s, q_pos, k_pos, spec, q_seg=q_seg, k_seg=k_seg, slope=slope, bias=bias
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


# ----------------------------------------------------------------------------- visited blocks
# Which key blocks a block of query rows visits, and which query blocks a block of keys is seen
# by, under causal / sliding-window masks and a query offset; written once for every lowering.
# Positions and block indices may be traced int32 scalars (program ids) or static Python ints;
# all-static inputs give static results, so a lowering can skip an empty or full range at trace
# time. Segment ids never shrink a range (they are masked per element).


def _static(*xs) -> bool:
    return all(isinstance(x, int) for x in xs)


def _div(x, d: int):
    """Floor division of a non-negative position by a static block size."""
    return x // d if _static(x) else lax.div(x, jnp.int32(d))


def _max0(x):
    return max(x, 0) if _static(x) else jnp.maximum(x, 0)


def _min(a, b):
    return min(a, b) if _static(a, b) else jnp.minimum(a, b)


def _clip(x, lo, hi):
    return min(max(x, lo), hi) if _static(x, lo, hi) else jnp.minimum(jnp.maximum(x, lo), hi)


def key_blocks(q_first, rows: int, block_k: int, num_k_blocks: int, spec: AttentionSpec,
               kv_len: int | None = None):
    """Key blocks that query rows at absolute positions ``[q_first, q_first + rows)`` see.

    Returns ``(lo, full_lo, full_hi, hi)``: blocks ``[lo, hi)`` hold a key that some row sees;
    within them ``[full_lo, full_hi)`` are seen whole by every row (no causal, window or padding
    mask needed). ``kv_len`` is given when the last block runs past the keys (padding): the block
    holding padded keys is then never full.
    """
    bk, nk = block_k, num_k_blocks
    q_last = q_first + rows - 1
    lo, full_lo, full_hi, hi = 0, 0, nk, nk
    if spec.causal:
        hi = _min(_div(q_last, bk) + 1, nk)
        full_hi = _div(q_first + 1, bk)
        if spec.sliding_window is not None:
            w = spec.sliding_window
            lo = _div(_max0(q_first - w + 1), bk)
            full_lo = _div(_max0(q_last - w + 1) + bk - 1, bk)
    if kv_len is not None:
        full_hi = _min(full_hi, kv_len // bk)
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


# The Pallas GPU kernels narrow each program's block loop to its packed documents
# (``document_spans``). On an H200, 8 documents per 4k row: Mosaic GPU 3.4x faster fwd+bwd (4.0x
# fwd) than walking every block, Triton 4.4x (BENCHMARKS.md, 2026-11-29). Off, as a fallback and
# for comparison, rows walk every block; read when a kernel is traced.
SKIP_DOCUMENTS = True


def kernel_spans(q_seg, kv_seg, spec: AttentionSpec, ctas: int, rows: int, block: int,
                 num_blocks: int) -> list:
    """``[document_spans(...)]`` as a kernel's extra input where they apply, else ``[]``: with
    ``SKIP_DOCUMENTS``, self-attention with segment ids (one length, no query offset), where a
    query's and a key's position index the same ids."""
    if (not SKIP_DOCUMENTS or q_seg is None or spec.q_offset != 0
            or q_seg.shape[1] != kv_seg.shape[1]):
        return []
    return [document_spans(q_seg, kv_seg, ctas, rows, block, num_blocks)]


def document_spans(q_seg, kv_seg, ctas: int, rows: int, block: int, num_blocks: int):
    """For each batch row and each CTA of ``rows`` consecutive positions (``ctas`` of them, past
    the end clamped to the last position), the blocks of ``block`` positions on the other side
    that hold the documents of its positions, and those of them lying wholly inside the one
    document of all its positions: ``(batch, ctas, 4)`` int32, ``(lo, hi, inner_lo, inner_hi)``.

    Packed documents are runs of one id, so a CTA's rows see only keys (a CTA's keys are seen only
    by queries) between the start of its first row's run and the end of its last row's. That
    holds when each id of a row is one run and the two sides' ids are equal; a row where either
    fails gets ``[0, num_blocks)`` and no inner blocks, as does a CTA over two documents. Inner
    blocks need no segment mask (``segment_masked``): with one document per row, the common
    case of a training batch, no block does but a row's last. Computed in XLA (a few passes over
    the ids), so that a kernel skips the blocks of other documents as it skips those past the
    causal diagonal."""
    batch, length = q_seg.shape
    pos = jnp.arange(length, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones((batch, 1), bool), q_seg[:, 1:] != q_seg[:, :-1]], 1)
    last = jnp.concatenate([first[:, 1:], jnp.ones((batch, 1), bool)], 1)
    start = lax.cummax(jnp.where(first, pos, 0), axis=1)
    end = lax.cummin(jnp.where(last, pos + 1, length), axis=1, reverse=True)
    ordered = jnp.sort(q_seg, axis=1)
    distinct = 1 + jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)
    runs_ok = (jnp.sum(first, axis=1) == distinct) & jnp.all(q_seg == kv_seg, axis=1)
    row0 = jnp.minimum(jnp.arange(ctas, dtype=jnp.int32) * rows, length - 1)
    row1 = jnp.minimum(row0 + rows, length) - 1
    first_start, last_end = start[:, row0], end[:, row1]
    lo = jnp.where(runs_ok[:, None], first_start // block, 0)
    hi = jnp.where(runs_ok[:, None], (last_end + block - 1) // block, num_blocks)
    one = runs_ok[:, None] & (start[:, row1] == first_start)
    inner_lo = jnp.where(one, (first_start + block - 1) // block, 0)
    inner_hi = jnp.where(one, last_end // block, 0)
    return jnp.stack([lo, hi, inner_lo, inner_hi], axis=-1).astype(jnp.int32)


def clip_blocks(parts, spans):
    """``parts`` (``key_blocks`` / ``query_blocks``'s four bounds) narrowed to a CTA's
    ``document_spans`` (its four scalars): the walk to ``[lo, hi)``, the unmasked interior also
    to ``[inner_lo, inner_hi)`` (the blocks it leaves go to the masked edges)."""
    lo, hi, inner_lo, inner_hi = spans
    p_lo, f_lo, f_hi, p_hi = parts
    p_lo = jnp.maximum(p_lo, lo)
    p_hi = jnp.maximum(jnp.minimum(p_hi, hi), p_lo)
    f_lo = _clip(jnp.maximum(f_lo, inner_lo), p_lo, p_hi)
    return p_lo, f_lo, _clip(jnp.minimum(f_hi, inner_hi), f_lo, p_hi), p_hi


def segment_masked(masked: bool, has_spans: bool) -> bool:
    """Whether a tile of a kernel with segment ids applies them: every tile without
    ``document_spans``; with them only the masked edges, since ``clip_blocks`` keeps the unmasked
    interior inside the one document of the CTA's every row and column."""
    return masked or not has_spans


def query_blocks(k_first, keys: int, block_q: int, num_q_blocks: int, spec: AttentionSpec,
                 kv_len: int | None = None):
    """Query blocks (row ``r`` at position ``q_offset + r``) that see a key of ``[k_first,
    k_first + keys)``; the convention of ``key_blocks`` (a block of keys holding padding, which
    ``kv_len`` announces, is masked whole)."""
    bq, nq, off = block_q, num_q_blocks, spec.q_offset
    k_last = k_first + keys - 1
    lo, full_lo, full_hi, hi = 0, 0, nq, nq
    if spec.causal:
        lo = _div(_max0(k_first - off), bq)
        full_lo = _div(_max0(k_last - off) + bq - 1, bq)
        if spec.sliding_window is not None:
            w = spec.sliding_window
            hi = _min(_div(_max0(k_last + w - off) + bq - 1, bq), nq)
            full_hi = _div(_max0(k_first + w - off), bq)
    if kv_len is not None:
        # Arithmetic, not a select: the Triton lowering mistypes a scalar select between two
        # constants.
        edge = k_first + keys > kv_len
        edge = int(edge) if isinstance(edge, bool) else edge.astype(jnp.int32)
        full_hi = full_hi - edge * (full_hi - full_lo)
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def pad_to(x, axis: int, size: int, value=0):
    """``x`` padded with ``value`` at the end of ``axis`` to ``size``."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)
