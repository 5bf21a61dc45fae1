"""Flash attention through cuDNN's fused attention (JAX's cuDNN custom call), forward and backward.

Not a Pallas kernel, so it has no interpret mode and no tiles, and ``"auto"`` never picks it
(which calls it supports depends on the installed cuDNN, found out only when it compiles; the
Pallas kernels need no such guess). Its masks, cheapest first:

- No segment ids: the built-in causal mask (``q_offset = 0`` and equal lengths) and sliding
  window, else the explicit mask below.
- Packed rows (segment ids on both sides, equal lengths, ``q_offset = 0``, no sliding window, a
  Hopper or newer GPU and cuDNN >= 9.6; ``PACKED_ROWS``, on by default): cuDNN's
  packed ("THD", ragged) layout. Each row's
  segments, the contiguous runs of one id, become lengths and offsets (``packed_layout``) and
  cuDNN applies its built-in causal (or padding only) mask within each, so no ``(L, L)`` mask
  exists. The number of segments per row must be static: ``MAX_SEGMENTS`` (read when the call
  is traced). A call that does not fit, because some row holds more runs or two runs of one id
  (which the reference lets see each other), or query and key ids differ, takes the explicit
  mask instead, chosen on the device by ``lax.cond``; that branch is rematerialised in the
  backward pass, so the packed branch keeps no ``(L, L)`` residual. Results are exact either way.
- Otherwise (``q_offset != 0``, ``q_len != kv_len``, a sliding window with segment ids, an older
  GPU or cuDNN): an explicit boolean mask ``(batch, 1, q_len, kv_len)``, which cuDNN turns into
  an additive bias (slower and O(L^2) memory, but exact).

The packed layout is reachable only through JAX's private ``fused_attention_stablehlo`` module
(``jax.nn.dot_product_attention`` takes sequence lengths but no segment offsets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

from pallas_kernels._api import gpu_arch
from pallas_kernels.flash_attention.common import AttentionSpec, Call

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Segments per row of the packed layout. cuDNN's softmax statistics (a residual of the backward
# pass) take ``MAX_SEGMENTS`` times those of one sequence per row, so this stays modest; a call
# with a row of more segments runs exactly on the explicit mask instead.
MAX_SEGMENTS = 16
# Packed rows on cuDNN's packed layout: its GPU check (tests/test_flash_attention_cudnn.py's Hopper
# cases) passes on an H200, at 5.2x (4.4x causal) the explicit mask's fwd+bwd with 8 documents per
# 4k row (BENCHMARKS.md, session 19). Off (``bench_attention.py``'s "cudnn_masked"), packed rows
# take the explicit mask.
PACKED_ROWS = True
PACKED_MIN_CUDNN = 90600  # cuDNN 9.6: the first that JAX's packed layout is tested with
PACKED_MIN_ARCH = 9.0  # JAX refuses the packed layout below Hopper


def supports(call: Call, tiles: None) -> str | None:
    """None when cuDNN's fused attention takes the call, as far as it can be told before it
    compiles, else the reason. (Which mask it uses is its own choice; see the module doc.)"""
    del tiles
    spec = call.spec
    if jnp.dtype(call.dtype) not in _DTYPES:
        return f"dtype must be bfloat16 or float16, got {jnp.dtype(call.dtype)}"
    max_head_dim = 256 if _arch() >= PACKED_MIN_ARCH else 128
    if call.head_dim % 8 or call.head_dim > max_head_dim:
        return f"head_dim must be a multiple of 8 and <= {max_head_dim}, got {call.head_dim}"
    if spec.has_alibi:
        return "cuDNN takes no ALiBi slopes"
    if spec.has_relative_bias:
        return "cuDNN takes no relative position bias here (the Triton lowering has it)"
    if spec.logits_soft_cap is not None:
        return "cuDNN has no logit soft-capping"
    if call.return_lse:
        return "jax.nn.dot_product_attention returns no log-sum-exp (return_lse)"
    return None


def attention(q, k, v, q_seg, kv_seg, spec: AttentionSpec):
    """``out`` like ``q``; differentiable by JAX (cuDNN's backward kernel). A query that sees no
    key gets zeros (and zero gradients), as from the other implementations."""
    if not packed_applies(q.shape, k.shape, q_seg is not None, spec):
        return _masked(q, k, v, q_seg, kv_seg, spec)
    seqlens, offsets, fits = packed_layout(q_seg, min(MAX_SEGMENTS, q.shape[1]))
    fits = jnp.all(fits) & jnp.all(q_seg == kv_seg)

    def packed(q, k, v, q_seg, kv_seg):
        del q_seg, kv_seg
        mask_type = cudnn_fmha.MaskType.PADDING_CAUSAL if spec.causal else (
            cudnn_fmha.MaskType.PADDING)
        return cudnn_fmha.dot_product_attention(
            q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets,
            kv_offsets=offsets, scale=spec.scale, mask_type=mask_type, qkv_layout="BTNH")

    # Recomputed in the backward pass: a branch's residuals are outputs of the whole cond, so
    # the (L, L) bias saved by the masked call would otherwise be materialised (as zeros) by the
    # packed branch too.
    masked = jax.checkpoint(lambda q, k, v, q_seg, kv_seg: _masked(q, k, v, q_seg, kv_seg, spec))
    return jax.lax.cond(fits, packed, masked, q, k, v, q_seg, kv_seg)


def packed_applies(q_shape, k_shape, has_segment_ids: bool, spec: AttentionSpec) -> bool:
    """Whether the call takes the packed layout (when its rows fit): static."""
    q_len = q_shape[1]
    return (PACKED_ROWS and has_segment_ids and q_len == k_shape[1] and q_len >= 2
            and spec.q_offset == 0 and spec.sliding_window is None and _arch() >= PACKED_MIN_ARCH
            and _cudnn_version() >= PACKED_MIN_CUDNN)


def packed_layout(segment_ids, max_segments: int):
    """cuDNN's packed layout of rows of ``segment_ids`` ``(batch, length)``: every contiguous run
    of one id is a segment (padding included: it attends to itself, as in the reference).

    Returns ``(seqlens, offsets, fits)``: int32 ``(batch, max_segments)`` lengths of each row's
    segments and ``(batch, max_segments + 1)`` their first positions, ``-1`` past the row's last
    segment (the format of ``fused_attention_stablehlo.dot_product_attention``), and a bool
    ``(batch,)``: the row holds at most ``max_segments`` runs and no id in two of them, so that
    its segments are exactly the reference's same-id blocks.
    """
    batch = segment_ids.shape[0]
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # each token's segment
    runs = run[:, -1] + 1
    slot = jnp.arange(max_segments, dtype=jnp.int32)
    lengths = jnp.sum(run[:, :, None] == slot, axis=1, dtype=jnp.int32)
    used = slot < runs[:, None]
    seqlens = jnp.where(used, lengths, -1)
    offsets = jnp.where(used, jnp.cumsum(lengths, axis=1) - lengths, -1)
    offsets = jnp.pad(offsets, ((0, 0), (0, 1)), constant_values=-1)
    ids = jnp.sort(segment_ids, axis=1)
    distinct = 1 + jnp.sum(ids[:, 1:] != ids[:, :-1], axis=1)
    return seqlens, offsets, (runs <= max_segments) & (runs == distinct)


def _masked(q, k, v, q_seg, kv_seg, spec: AttentionSpec):
    """``jax.nn.dot_product_attention``'s cuDNN call: its built-in causal mask and window where
    they apply, else an explicit mask."""
    q_len, kv_len = q.shape[1], k.shape[1]
    built_in = spec.causal and spec.q_offset == 0 and q_len == kv_len
    mask = None
    if q_seg is not None:
        mask = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
    window = spec.sliding_window
    if spec.causal and (not built_in or (mask is not None and window is not None)):
        q_pos = spec.q_offset + jnp.arange(q_len)[:, None]
        k_pos = jnp.arange(kv_len)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        mask = visible[None, None] if mask is None else mask & visible
        window = None
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=spec.scale, is_causal=built_in,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn",
    )
    if mask is None:  # every query sees at least itself
        return out
    if built_in:  # the keys a query sees are also under the built-in causal mask
        mask = mask & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])
    sees_a_key = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # (batch, q_len, 1, 1)
    return jnp.where(sees_a_key, out, jnp.zeros_like(out))


def _arch() -> float:
    arch = gpu_arch() or ""
    return float(arch) if arch[:1].isdigit() else 0.0


def _cudnn_version() -> int:
    """The installed cuDNN's version (``90600`` for 9.6), or 0 without one."""
    try:
        return cudnn_fmha.check_cudnn_version()
    except RuntimeError:
        return 0
