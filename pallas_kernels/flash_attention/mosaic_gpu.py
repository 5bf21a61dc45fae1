"""Flash attention as Pallas kernels lowered through Mosaic GPU (NVIDIA Hopper, sm_90a).

Every kernel is warp specialised: a CTA runs three warpgroups, two consumers that issue ``wgmma``
and do the softmax arithmetic, and one producer that only issues TMA copies into a ring of
``stages`` shared-memory slots. Each slot has a "filled" barrier (completed by the TMA
transaction count) and a "consumed" barrier (one arrival per consumer warpgroup), so up to
``stages`` tiles are in flight ahead of the tensor cores.

- Forward: a CTA owns ``2 * block_q`` query rows of one (batch, head), one ``block_q`` slab per
  consumer, and streams K/V tiles with an online softmax in float32 (FlashAttention-3). The two
  consumers take turns on the tensor cores through a shared "schedule" barrier, so one
  warpgroup's softmax overlaps the other's matrix products.
- Backward, with ``delta = rowsum(dO * O)`` computed in XLA and P recomputed from the saved
  log-sum-exp: a dK/dV kernel whose CTA owns ``2 * block_k_bwd`` keys of one kv head and streams
  (Q, dO, lse, delta) tiles of every query head of its GQA group, so grouped heads need no
  reduction afterwards. It also adds each streamed tile's dQ = dS @ K into a float32 sum by TMA
  reductions (``DQ_IN_DKV``; FlashAttention-3's scheme), which a small kernel then casts; or,
  with that off, a dQ kernel shaped like the forward recomputes P and dP. When the two float32
  accumulators of dK and dV do not fit a consumer's registers (head_dim 256: 2 x 128 per
  thread), the dK/dV kernel runs twice, once for dV (no dP product) and once for dK, recomputing
  P: 5 tile products per block instead of 4, but a register file that holds one accumulator.

Both consumers of a CTA walk the same key (or query) block range, the union of what their rows
need: that keeps the producer, the consumed barriers and the schedule barrier in lock step. With
packed documents (self-attention with segment ids; with ``common.SKIP_DOCUMENTS``) that range
is narrowed to the blocks of the CTA's documents (``common.document_spans``, four scalars per CTA
computed in XLA), so a row of short documents costs about what its documents do, not the whole
row's square. Each walk is split into [masked edge | unmasked interior | masked edge]; the
interior pays for no causal/window/padding ``where`` (ALiBi's ``-slope * |pos_q - pos_k|`` is
computed from the tile's positions in every block, so it never changes which blocks are
skipped), and with the spans no segment one either: it is narrowed to blocks inside the one
document of all the CTA's rows, so a training row of one document masks only its edges. Scores
go through ``common.transform_scores`` on register tiles, in base 2 (scale, soft cap and ALiBi
slopes multiplied by log2(e)) so the exponentials are bare ``exp2``.
Lengths that are not a multiple of the tiles are padded here: padded keys are masked, padded
queries are sliced away (in the backward they carry ``dO = 0`` and ``lse = +inf``, hence P = 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._api import device_default
from pallas_kernels.flash_attention import common as fa_common
from pallas_kernels.flash_attention.common import (
    BWD_INPUTS,
    LOG2E,
    MASK_VALUE,
    Call,
    base2,
    clip_blocks,
    kernel_refs,
    kernel_spans,
    key_blocks,
    pad_to,
    query_blocks,
    score_grad,
    segment_masked,
    tile_logits,
)

_HEAD_DIMS = (64, 128, 256)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SMEM_BYTES = 227 * 1024  # Hopper's per-block shared-memory limit.
_CONSUMERS = 2
_WG = "wg"
# The 64K registers of an SM split between the warpgroups (128 threads each): the producer only
# issues copies, the consumers hold the accumulators. 2 * 232 + 40 <= 512 registers per lane.
_CONSUMER_REGS, _PRODUCER_REGS = 232, 40
# dQ accumulated by the dK/dV kernel (FlashAttention-3's backward: 5 tile products per block
# instead of the 7 of a dK/dV kernel and a dQ kernel), when that kernel runs in one pass; off, or
# at head_dim 256, a dQ kernel shaped like the forward recomputes P and dP for it. Where the
# consumers split dQ's columns (head_dim 128, ``_dq_split``) they run in lock step, which costs
# more than it saves on short rows (H200, fwd+bwd: 16k rows 6-7% faster, 2k causal 5% slower,
# GPT 1.3B's step 1.4% slower; BENCHMARKS.md, session 21): there it needs keys at least
# ``SPLIT_DQ_MIN_LEN`` long. At head_dim 64 it measured 3-16% faster at 1k and 2k. The CTAs'
# additions land in no fixed order, so dQ's float32 rounding varies from run to run (as with
# cuDNN's backward): set ``DQ_IN_DKV = False`` for bitwise-reproducible gradients.
DQ_IN_DKV = True
SPLIT_DQ_MIN_LEN = 16384
# Of a consumer's 232, the float32 wgmma accumulators (owned rows x head_dim / 128 threads each)
# may take this many; the rest holds the float32 score tiles, their low-precision copies and
# addresses. A dK/dV kernel whose two accumulators exceed it runs as a dV pass and a dK pass.
_ACC_REGS = 128


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """One kernel's tiles: rows owned per consumer warpgroup, rows streamed per step, ring depth."""

    owned: int
    streamed: int
    stages: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The tiles of the forward, dK/dV and dQ kernels (rows: multiples of 64, at most 256).
    Forward/dQ own query rows and stream keys; dK/dV owns keys and streams query rows."""

    fwd: KernelTiles
    dkv: KernelTiles
    dq: KernelTiles


def _tiles(fwd, dkv, dq) -> Tiles:
    return Tiles(KernelTiles(*fwd), KernelTiles(*dkv), KernelTiles(*dq))


# Defaults per head_dim, each kernel's (owned, streamed, stages); "" is every Hopper GPU (the only
# target). The forward follows FlashAttention-3's Hopper tiles (a 128-row CTA, 128-key tiles);
# the backward tiles keep each consumer's live float32 tiles (two 64xD accumulators plus 64-wide
# score tiles) inside its 232 registers. At head_dim 256 a 64-row tile of K or V is 32 KiB: the
# smallest tiles (64 rows) with a two-slot ring (forward) or one slot (the backward kernels own
# two 64 x 256 tiles per consumer, 128 KiB) fill 196 of the 227 KiB, and one float32 64 x 256
# accumulator is 128 registers per thread (dK/dV in two passes, see above). Not yet swept on a
# device.
DEFAULT_TILES: dict[str, dict[int, Tiles]] = {
    "": {
        64: _tiles((64, 128, 3), (64, 64, 2), (64, 128, 2)),
        128: _tiles((64, 128, 2), (64, 64, 2), (64, 64, 3)),
        256: _tiles((64, 64, 2), (64, 64, 1), (64, 64, 1)),
    },
}


def default_tiles(call: Call) -> Tiles:
    """The target device's tiles for the smallest tabled head_dim >= the call's."""
    table = device_default(DEFAULT_TILES)
    return table[next((d for d in sorted(table) if d >= call.head_dim), max(table))]


def _smem_bytes(t: KernelTiles, head_dim: int, owned_tiles: int, streamed_tiles: int) -> int:
    """Shared memory of a kernel: owned tiles per consumer plus the streamed ring (+ row vectors)."""
    owned = _CONSUMERS * owned_tiles * t.owned * head_dim * 2
    ring = t.stages * streamed_tiles * t.streamed * head_dim * 2
    return owned + ring + 4 * 4 * (t.stages * t.streamed + _CONSUMERS * t.owned)


def _dq_split(head_dim: int) -> tuple[bool, int]:
    """``(split, columns)``: whether the dK/dV kernel's consumers split dQ's columns between
    them (each half a whole 128-byte swizzled row of bf16, which a wgmma operand can be sliced
    to), and how many columns each computes."""
    split = head_dim // _CONSUMERS >= 64
    return split, head_dim // _CONSUMERS if split else head_dim


def _dq_smem_bytes(t: KernelTiles, head_dim: int) -> int:
    """What dQ adds to the dK/dV kernel's shared memory: the dS^T tiles (two slots of both
    consumers' when split) and each consumer's float32 dQ tile."""
    split, cols = _dq_split(head_dim)
    slots = 2 if split else 1
    return _CONSUMERS * (slots * t.owned * t.streamed * 2 + t.streamed * cols * 4)


def _acc_regs(t: KernelTiles, head_dim: int) -> int:
    """Registers per consumer thread of one float32 accumulator of ``t.owned x head_dim``."""
    return t.owned * head_dim // 128


def _dkv_passes(t: KernelTiles, head_dim: int) -> tuple[tuple[str, ...], ...]:
    """The gradients each dK/dV kernel launch accumulates: both at once when their two
    accumulators fit ``_ACC_REGS``, else a dV pass and a dK pass."""
    if 2 * _acc_regs(t, head_dim) <= _ACC_REGS:
        return (("dk", "dv"),)
    return (("dv",), ("dk",))


def supports(call: Call, tiles: Tiles) -> str | None:
    """None when these kernels handle the call, else the one-line reason."""
    head_dim = call.head_dim
    if head_dim not in _HEAD_DIMS:
        return f"head_dim must be one of {_HEAD_DIMS}, got {head_dim}"
    if jnp.dtype(call.dtype) not in _DTYPES:
        return f"dtype must be bfloat16 or float16 (wgmma operands), got {jnp.dtype(call.dtype)}"
    if call.spec.has_relative_bias:
        return ("no relative position bias in the Mosaic GPU kernels: looking each score's "
                "bucket up in the table needs a gather, which Mosaic GPU does not lower (the "
                "Triton lowering has it)")
    for kernel in ("fwd", "dkv", "dq"):
        for field in ("owned", "streamed"):
            size = getattr(getattr(tiles, kernel), field)
            if size % 64 or size > 256:
                return f"tiles.{kernel}.{field} must be a multiple of 64 and <= 256, got {size}"
    fwd, dkv, dq = tiles.fwd, tiles.dkv, tiles.dq
    for name, t, owned, streamed in (("forward", fwd, 1, 2), ("dK/dV", dkv, 2, 2),
                                     ("dQ", dq, 2, 2)):
        fused = name == "dK/dV" and _dq_in_dkv(t, head_dim, call.k_shape[1])
        extra = _dq_smem_bytes(t, head_dim) if fused else 0
        if _smem_bytes(t, head_dim, owned, streamed) + extra > _SMEM_BYTES:
            return (f"{name} tiles ({t.owned} owned x {t.streamed} streamed rows, head_dim "
                    f"{head_dim}) exceed the {_SMEM_BYTES // 1024} KiB of shared memory")
    for kernel in ("fwd", "dkv", "dq"):
        t = getattr(tiles, kernel)
        if _acc_regs(t, head_dim) > _ACC_REGS:
            return (f"tiles.{kernel}.owned = {t.owned} at head_dim {head_dim}: a float32 "
                    f"accumulator of {_acc_regs(t, head_dim)} registers per thread, over the "
                    f"{_ACC_REGS} a consumer warpgroup has for it")
    return None


class _Heads(NamedTuple):
    """Where a kernel finds each head in its GMEM arrays: ``heads`` query and ``kv_heads`` key /
    value heads, query head ``h`` at index ``q + stride * h`` of ``q``'s head axis, kv head ``g``
    at ``k + stride * g`` of ``k``'s and ``v + stride * g`` of ``v``'s (``at``). Separate arrays:
    offsets 0, stride 1. Packed (``forward_packed``): q, k and v are one ``(batch, len,
    heads * 3, head_dim)`` array, head ``h``'s q, k, v at ``3h, 3h + 1, 3h + 2`` (offsets 0, 1,
    2, stride 3), and the dK/dV kernel writes both gradients into one such array."""

    heads: int
    kv_heads: int
    q: int = 0
    k: int = 0
    v: int = 0
    stride: int = 1

    @property
    def packed(self) -> bool:
        return self.stride != 1

    def at(self, part: str, head):
        """The index of head ``head`` of ``part`` ("q", "k" or "v") in its array's head axis."""
        return getattr(self, part) + self.stride * head


# ----------------------------------------------------------------------------- shared pieces


def _div(x, d: int):
    return lax.div(x, jnp.int32(d))


def _tile_smem(shape, dtype):
    """Shared memory for a wgmma operand: 8x64 tiles with the 128-byte swizzle."""
    return plgpu.SMEM(
        shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _vec(vec_ref, dim: int):
    """A vector from shared memory, laid out to run along ``dim`` of a wgmma-layout tile."""
    return plgpu.load(vec_ref, layout=plgpu.Layout.WGMMA.reduce(1 - dim))


def _bcast(vec, dim: int, shape):
    """Broadcast a ``_vec`` to the whole tile; done per step so no full tile lives across loops."""
    return lax.broadcast_in_dim(vec, shape, [dim])


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _mma(a, b_ref, shape, interpret: bool, *, trans_a: bool = False, trans_b: bool = False,
         meanwhile=None, plus=()):
    """``a @ b`` (or with ``a.T`` / ``b.T``) into a fresh float32 accumulator; ``a`` in registers
    or smem (transposed: smem only, as wgmma reads a transposed A). ``plus``: more ``(a, b)``
    pairs whose products (transposed alike) the tensor cores add into the same accumulator.

    ``meanwhile()`` runs after the wgmmas are issued and before their result is awaited.

    The interpreter runs wgmma only with both operands in shared memory, so interpret mode takes
    the product of the loaded tiles instead (everything around it, barriers and copies included,
    is interpreted as on the device).
    """
    if interpret:
        dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
        out = sum(lax.dot_general(x if isinstance(x, jax.Array) else x[...], y[...], dims,
                                  preferred_element_type=jnp.float32)
                  for x, y in ((a, b_ref), *plus))
        if meanwhile is not None:
            meanwhile()
        return out

    def body(acc_ref):
        for x, y in ((a, b_ref), *plus):
            plgpu.wgmma(acc_ref, x.transpose((1, 0)) if trans_a else x,
                        y.transpose((1, 0)) if trans_b else y)
        if meanwhile is not None:
            meanwhile()
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mma_pair(first, second, shape, interpret: bool, meanwhile):
    """Two fresh ``a @ b.T`` products of ``shape`` (``first``, ``second``: ``(a, b)`` pairs)
    issued together: ``meanwhile(x)`` gets the first's result while the tensor cores still run
    the second. Returns ``(meanwhile(x), y)``."""
    if interpret:
        x = _mma(*first, shape, interpret, trans_b=True)
        out = meanwhile(x)
        return out, _mma(*second, shape, interpret, trans_b=True)

    def body(acc_x, acc_y):
        for acc, (a, b) in ((acc_x, first), (acc_y, second)):
            plgpu.wgmma(acc, a, b.transpose((1, 0)))
        out = meanwhile(plgpu.wgmma_accumulator_load(acc_x, wait_n=1))
        return out, acc_y[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _mma_acc(acc, a, b_ref, interpret: bool):
    """``acc + a @ b``, accumulating in place on the tensor cores."""
    if interpret:
        return acc + _mma(a, b_ref, acc.shape, interpret)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)

    return pl.run_state(body)(plgpu.ACC.init(acc))


def _tile_segments(own, bars, smem, slot, masked: bool, has_spans: bool):
    """``(own, streamed)`` segment-id vectors for one tile: the consumer's own (None without
    segment ids) and the streamed tile's (ring slot ``slot`` of ``smem``, once ``bars`` has its
    copy), or Nones where the tile needs no segment mask (``common.segment_masked``). The
    barrier is waited on whenever the call has segment ids, to keep the ring's phases."""
    if own is None:
        return None, None
    plgpu.barrier_wait(bars.at[slot])
    if not segment_masked(masked, has_spans):
        return None, None
    return own, _vec(smem.at[slot], 1)


def _logits(s, spec2, masked, *, q_dim, q_first, k_first, kv_len, q_seg, k_seg, slope):
    """``transform_scores`` on a register tile whose queries run along ``q_dim``.

    ``q_first``/``k_first`` are the positions of the tile's first query and key; ``q_seg`` and
    ``k_seg`` are segment-id vectors or None; ``kv_len`` (padded keys exist) masks the pad;
    ``slope`` is the head's base-2 ALiBi slope (a scalar) or None. Positions are only built for
    masked tiles and for ALiBi: the interior needs none otherwise.
    """
    k_dim = 1 - q_dim
    q_pos = k_pos = None
    if masked or slope is not None:
        q_pos = _iota(s.shape, q_dim) + q_first
        k_pos = _iota(s.shape, k_dim) + k_first
    if q_seg is not None:
        q_seg, k_seg = _bcast(q_seg, q_dim, s.shape), _bcast(k_seg, k_dim, s.shape)
    return tile_logits(
        s, q_pos, k_pos, spec2, masked=masked, kv_len=kv_len, q_seg=q_seg, k_seg=k_seg,
        slope=slope,
    )


def _base2_slopes(alibi_slopes):
    """The kernels' extra input for ALiBi: float32 slopes in log2 units (none without ALiBi)."""
    return [] if alibi_slopes is None else [alibi_slopes.astype(jnp.float32) * LOG2E]


def _produce(n_steps, stages, loads):
    """The producer warpgroup: fill the ring, then refill each slot once its consumers are done.

    ``loads`` is a list of ``(issue, consumed)``: ``issue(step, slot)`` starts the copies of one
    stream for ``step``; ``consumed`` is that stream's per-slot barrier array.
    """
    plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
    for slot in range(stages):

        @pl.when(slot < n_steps)
        def _():
            for issue, _ in loads:
                issue(jnp.int32(slot), slot)

    @pl.loop(jnp.int32(stages), jnp.maximum(n_steps, stages))
    def _(step):
        slot = lax.rem(step, jnp.int32(stages))
        for issue, consumed in loads:
            plgpu.barrier_wait(consumed.at[slot])
            issue(step, slot)

    # Observe the last uses too, so that no barrier phase is left unseen when the CTA exits.
    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _(step):
        slot = lax.rem(step, jnp.int32(stages))
        for _, consumed in loads:
            plgpu.barrier_wait(consumed.at[slot])


def _query_cta(spec2, t, group, nk, kv_len, spans_ref, ctas):
    """Where a forward or dQ CTA stands: ``(batch, head, kv_head, cta_row, parts, n_steps,
    padded_kv)``. Its ``_CONSUMERS`` query tiles start at row ``cta_row`` and see the key blocks
    ``parts`` (``key_blocks``, narrowed to the rows' documents by ``spans_ref`` when given; the
    grid has ``ctas`` CTAs along the queries), ``n_steps`` of them; ``padded_kv`` is ``kv_len``
    when the last key block runs past the keys, else None."""
    bq, bk = t.owned, t.streamed
    batch, head, cta = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
    if spec2.causal:  # the last rows, which see the most keys, start first: a shorter tail
        cta = ctas - 1 - cta
    cta_row = cta * (_CONSUMERS * bq)
    padded_kv = None if nk * bk == kv_len else kv_len
    parts = key_blocks(spec2.q_offset + cta_row, _CONSUMERS * bq, bk, nk, spec2, padded_kv)
    if spans_ref is not None:
        parts = _within_documents(parts, spans_ref, batch, cta, ctas)
    n_steps = jnp.maximum(parts[3] - parts[0], 0)
    return batch, head, _div(head, group), cta_row, parts, n_steps, padded_kv


def _within_documents(parts, spans_ref, batch, cta, ctas):
    """``parts`` clipped to this CTA's ``document_spans`` (four scalars read from GMEM)."""
    at = (batch * ctas + cta) * 4
    return clip_blocks(parts, [spans_ref[at + i] for i in range(4)])


def _spans(*args):
    """``common.kernel_spans(*args)``, flat (the kernels read four scalars at a computed
    index)."""
    return [spans.reshape(-1) for spans in kernel_spans(*args)]


def _stream_kv(refs, smem, bars, *, batch, kv_head, lay, first, bk, n_steps, stages):
    """The producer of the forward and dQ kernels: key blocks ``first, first + 1, ...`` (with
    their segment ids when ``ks_ref`` is given) and value blocks through the ring; ``kv_head``'s
    index in each array per the ``_Heads`` layout ``lay``.

    ``refs = (k_ref, v_ref, ks_ref)`` in GMEM, ``smem`` their ring buffers, ``bars = (k_bar,
    v_bar, ks_bar, k_free, v_free)``: the copies' arrival barriers, then the per-slot barriers
    by which the consumers free the key and the value slot.
    """
    k_ref, v_ref, ks_ref = refs
    k_smem, v_smem, ks_smem = smem
    k_bar, v_bar, ks_bar, k_free, v_free = bars

    def load_k(step, slot):
        keys = pl.ds((first + step) * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, lay.at("k", kv_head)], k_smem.at[slot],
                                k_bar.at[slot])
        if ks_ref is not None:
            plgpu.copy_gmem_to_smem(ks_ref.at[batch, keys], ks_smem.at[slot], ks_bar.at[slot])

    def load_v(step, slot):
        keys = pl.ds((first + step) * bk, bk)
        plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, lay.at("v", kv_head)], v_smem.at[slot],
                                v_bar.at[slot])

    _produce(n_steps, stages, [(load_k, k_free), (load_v, v_free)])


def _fused_range(parts, body, carry):
    """Run ``body(masked)(block, step, carry)`` over ``[lo|full_lo|full_hi|hi)`` blocks."""
    lo, full_lo, full_hi, hi = parts

    def loop(a, b, masked, carry):
        return lax.fori_loop(a, b, lambda i, c: body(masked)(i, i - lo, c), carry)

    carry = loop(lo, full_lo, True, carry)
    carry = loop(full_lo, full_hi, False, carry)
    return loop(full_hi, hi, True, carry)


def _compiler_params():
    return plgpu.CompilerParams(approx_math=True)


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    _warn_if_callback_threads_are_few()
    return plgpu.InterpretGPUParams()


@functools.cache
def _warn_if_callback_threads_are_few():
    """The interpreter runs a CTA's ``_CONSUMERS + 1`` warpgroups as host callbacks that wait on
    one another's barriers, on the XLA CPU client's thread pool: one thread per core, or ``NPROC``
    (read when JAX starts its CPU backend). With fewer threads than warpgroups, a kernel whose
    warpgroups must all be running at once (a causal call with segment ids) waits forever."""
    try:
        threads = int(os.environ["NPROC"])
    except (KeyError, ValueError):
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    if threads < _CONSUMERS + 1:
        warnings.warn(
            f"Mosaic GPU interpret mode needs {_CONSUMERS + 1} host-callback threads (one per "
            f"warpgroup) and XLA's CPU client has {threads}: a kernel can hang. Set the "
            f"environment variable NPROC={_CONSUMERS + 2} before JAX starts.", RuntimeWarning,
            stacklevel=4)


# ``forward`` and ``backward`` are jitted: a model calls attention once per layer with the same
# shapes, and un-jitted every call site traced, lowered and built its own Mosaic kernels (their
# modules differ by source locations, so the compiled-kernel cache missed too). Jitted, identical
# calls share one trace, one lowering and one kernel build: lowering gpt2_125m's 12-layer gradient
# for an H100 went from 22 s and 36 kernel modules to 3.4 s and 3 (on a CPU host).
def _once_per_shape(fn):
    """``fn`` jitted with its settings static, and the module switches (``common.SKIP_DOCUMENTS``,
    ``DQ_IN_DKV``, ``SPLIT_DQ_MIN_LEN``) in the cache key: they are read while the kernels are
    traced, so a trace made before one changed is not reused."""

    @functools.partial(jax.jit, static_argnames=("spec", "tiles", "interpret", "switches"))
    def traced(*args, switches, **settings):
        del switches  # only a key: the kernels read the switches themselves
        return fn(*args, **settings)

    @functools.wraps(fn)
    def call(*args, **settings):
        switches = (fa_common.SKIP_DOCUMENTS, DQ_IN_DKV, SPLIT_DQ_MIN_LEN)
        return traced(*args, switches=switches, **settings)

    return call


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, spec2, t, lay, nk, kv_len, has_seg, has_alibi, has_spans, ctas,
                interpret):
    r = kernel_refs(refs, ("q", "k", "v"), has_seg, has_alibi, ("o", "lse", "smem", "bars"),
                    has_spans=has_spans)
    q_smem, k_smem, v_smem, vec_smem, qs_smem, ks_smem = r.smem
    q_bar, k_bar, v_bar, ks_bar, k_free, v_free, sched = r.bars
    bq, bk = t.owned, t.streamed
    head_dim = r.q.shape[-1]
    wg = lax.axis_index(_WG)
    batch, head, kv_head, cta_row, parts, n_steps, padded_kv = _query_cta(
        spec2, t, lay.heads // lay.kv_heads, nk, kv_len, r.spans, ctas
    )

    def schedule():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < _CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGS, action="increase")
        row = cta_row + wg * bq
        my_q = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(r.q.at[batch, pl.ds(row, bq), lay.at("q", head)], my_q,
                                q_bar.at[wg])
        q_seg = None
        if has_seg:
            plgpu.copy_gmem_to_smem(r.q_seg.at[batch, pl.ds(row, bq)], qs_smem.at[wg],
                                    q_bar.at[_CONSUMERS + wg])
            plgpu.barrier_wait(q_bar.at[_CONSUMERS + wg])
            q_seg = _vec(qs_smem.at[wg], 0)
        slope = r.slopes[head] if has_alibi else None
        plgpu.barrier_wait(q_bar.at[wg])

        def body(masked):
            def step(block, i, carry):
                acc, m, l = carry
                slot = lax.rem(i, jnp.int32(t.stages))
                plgpu.barrier_wait(k_bar.at[slot])
                # The other consumer's turn starts while this QK^T runs.
                s = _mma(my_q, k_smem.at[slot], (bq, bk), interpret, trans_b=True,
                         meanwhile=schedule)
                q_seg_, k_seg = _tile_segments(q_seg, ks_bar, ks_smem, slot, masked, has_spans)
                plgpu.barrier_arrive(k_free.at[slot])
                s, _ = _logits(s, spec2, masked, q_dim=0, q_first=spec2.q_offset + row,
                               k_first=block * bk, kv_len=padded_kv, q_seg=q_seg_, k_seg=k_seg,
                               slope=slope)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p = p.astype(r.q.dtype)
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)
                acc = _mma_acc(acc, p, v_smem.at[slot], interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            return step

        # m starts at MASK_VALUE: a row whose keys so far are all masked keeps m = MASK_VALUE (its
        # masked terms are wiped by alpha = 0 once a visible key arrives), so m spots dead rows.
        carry = (
            plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        )
        # The consumers take turns on the tensor cores: consumer 1 starts one phase behind.
        pl.when(wg == 1)(schedule)
        acc, m, l = _fused_range(parts, body, carry)
        pl.when(wg == 0)(schedule)

        dead = m <= 0.5 * MASK_VALUE
        inv = 1.0 / jnp.where(dead, 1.0, l)
        inv = jnp.where(dead, 0.0, inv)
        my_q[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(r.q.dtype)
        lse_vec = vec_smem.at[wg]
        lse_vec[...] = jnp.where(dead, -jnp.inf, (m + jnp.log2(jnp.where(dead, 1.0, l))) / LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, r.o.at[batch, pl.ds(row, bq), head])
        plgpu.copy_smem_to_gmem(lse_vec, r.lse.at[batch, head, pl.ds(row, bq)])
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == _CONSUMERS)(lambda: _stream_kv(  # the producer warpgroup
        (r.k, r.v, r.kv_seg), (k_smem, v_smem, ks_smem), (k_bar, v_bar, ks_bar, k_free, v_free),
        batch=batch, kv_head=kv_head, lay=lay, first=parts[0], bk=bk, n_steps=n_steps,
        stages=t.stages))


@_once_per_shape
def forward(q, k, v, q_seg, kv_seg, alibi_slopes, *, spec, tiles, interpret):
    """``(out, lse)`` per the lowering contract (see ``supports`` for what is handled)."""
    lay = _Heads(q.shape[2], k.shape[2])
    return _forward(q, k, v, q_seg, kv_seg, alibi_slopes, lay, spec, tiles, interpret)


@_once_per_shape
def forward_packed(qkv, seg, alibi_slopes, *, spec, tiles, interpret):
    """Self-attention of ``qkv (batch, len, heads, 3, head_dim)`` (the q, k, v projections in one
    array): ``(out, lse)`` as ``forward``'s, the kernels reading the heads where they lie, so the
    array is not sliced into three copies first."""
    flat, lay = _flat(qkv)
    return _forward(flat, flat, flat, seg, seg, alibi_slopes, lay, spec, tiles, interpret)


def _flat(qkv):
    """``qkv`` as one ``(batch, len, heads * 3, head_dim)`` array (a free reshape) and its
    ``_Heads``."""
    batch, length, heads, _, head_dim = qkv.shape
    return qkv.reshape(batch, length, heads * 3, head_dim), _Heads(heads, heads, 0, 1, 2, 3)


def _padded_qkv(q, k, v, lay, q_pad, kv_pad):
    """``[q, k, v]`` padded along the length; packed (``lay``), the one array they are, padded
    once (``q_pad == kv_pad`` then)."""
    if lay.packed:
        return [pad_to(q, 1, q_pad)] * 3
    return [pad_to(q, 1, q_pad), pad_to(k, 1, kv_pad), pad_to(v, 1, kv_pad)]


def _forward(q, k, v, q_seg, kv_seg, alibi_slopes, lay, spec, tiles, interpret):
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    heads = lay.heads
    t = tiles.fwd
    bq, bk = t.owned, t.streamed
    nq, nk = pl.cdiv(q_len, _CONSUMERS * bq), pl.cdiv(kv_len, bk)
    q_pad, kv_pad = nq * _CONSUMERS * bq, nk * bk
    if lay.packed:  # one array: padded for both of its uses
        q_pad = kv_pad = max(q_pad, kv_pad)
    has_seg = q_seg is not None
    args = _padded_qkv(q, k, v, lay, q_pad, kv_pad)
    if has_seg:
        args += [pad_to(q_seg, 1, q_pad), pad_to(kv_seg, 1, kv_pad)]
    args += _base2_slopes(alibi_slopes)
    spans = _spans(q_seg, kv_seg, spec, nq, _CONSUMERS * bq, bk, nk)

    dtype = q.dtype
    smem = (
        _tile_smem((_CONSUMERS, bq, head_dim), dtype),
        _tile_smem((t.stages, bk, head_dim), dtype),
        _tile_smem((t.stages, bk, head_dim), dtype),
        plgpu.SMEM((_CONSUMERS, bq), jnp.float32),
        plgpu.SMEM((_CONSUMERS, bq), jnp.int32) if has_seg else None,
        plgpu.SMEM((t.stages, bk), jnp.int32) if has_seg else None,
    )
    bars = (
        plgpu.Barrier(num_barriers=2 * _CONSUMERS),
        plgpu.Barrier(num_barriers=t.stages),
        plgpu.Barrier(num_barriers=t.stages),
        plgpu.Barrier(num_barriers=t.stages) if has_seg else None,
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=t.stages),
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=t.stages),
        plgpu.Barrier(num_arrivals=_CONSUMERS),
    )
    kernel = functools.partial(
        _fwd_kernel, spec2=base2(spec), t=t, lay=lay, nk=nk, kv_len=kv_len,
        has_seg=has_seg, has_alibi=alibi_slopes is not None, has_spans=bool(spans), ctas=nq,
        interpret=interpret,
    )
    out, lse = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct((batch, q_pad, heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32),
        ],
        scratch_types=[smem, bars],
        grid=(heads, nq, batch),
        grid_names=("heads", "q", "batch"),
        kernel_name="flash_attention_fwd",
        num_threads=_CONSUMERS + 1,
        thread_name=_WG,
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(*args, *spans)
    return out[:, :q_len], lse[:, :, :q_len]


# ----------------------------------------------------------------------------- backward


def _reduce_add(stage, value, dest, bar, interpret: bool):
    """``dest += value`` (float32, GMEM) through the smem tile ``stage``: a TMA reduction, issued
    without waiting for it. The interpreter has no TMA reductions, and runs a kernel's CTAs one
    at a time, so there a read, an add and a write of ``dest`` make the same sum."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last reduction has read ``stage``
    if interpret:
        plgpu.copy_gmem_to_smem(dest, stage, bar)
        plgpu.barrier_wait(bar)
        value = value + stage[...]
    stage[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stage, dest, reduction_op=None if interpret else "add")
    if interpret:
        plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(*refs, spec2, t, lay, nq, kv_len, padded, has_seg, has_alibi, grads, with_dq,
                has_spans, ctas, interpret):
    """Accumulates ``grads`` (``("dk", "dv")``, or one of them in a two-pass backward): a dV
    pass needs neither V nor delta nor the dP product. Packed (``lay``), both go to one output
    array, at the heads of k and v.

    ``with_dq`` (one pass): each step also adds the streamed query tile's dQ = dS @ K over the
    CTA's keys into the float32 ``dq_acc``. When half of head_dim is a whole swizzled tile
    (``_dq_split``), the consumers hand their dS^T tiles over through shared memory (two slots,
    by step parity, so neither overwrites a tile the other still reads) and each computes half
    of dQ's columns from both: a CTA adds one tile per step. At head_dim 64 each consumer adds
    its own keys' share.
    """
    want_dk, want_dv = "dk" in grads, "dv" in grads
    outputs = ("dkv",) if lay.packed else grads
    r = kernel_refs(refs, BWD_INPUTS, has_seg, has_alibi,
                    (*(("dq_acc",) if with_dq else ()), *outputs, "smem", "bars"),
                    has_spans=has_spans)
    group = lay.heads // lay.kv_heads
    k_smem, v_smem, ks_smem, q_smem, do_smem, lse_smem, delta_smem, qs_smem, ds_smem, dq_stage = (
        r.smem)
    own_bar, q_bar, do_bar, lse_bar, delta_bar, qs_bar, free, ds_bar, dq_bar = r.bars
    bk, bq = t.owned, t.streamed
    head_dim = r.q.shape[-1]
    dtype = r.q.dtype
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index(_WG)
    cta = lax.axis_index("k")
    cta_key = cta * (_CONSUMERS * bk)
    parts = query_blocks(cta_key, _CONSUMERS * bk, bq, nq, spec2, kv_len if padded else None)
    if r.spans is not None:
        parts = _within_documents(parts, r.spans, batch, cta, ctas)
    lo, hi = parts[0], parts[3]
    per_head = jnp.maximum(hi - lo, 0)
    n_steps = group * per_head

    @pl.when(wg < _CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGS, action="increase")
        key = cta_key + wg * bk
        my_k = k_smem.at[wg]
        keys = (batch, pl.ds(key, bk))
        plgpu.copy_gmem_to_smem(r.k.at[(*keys, lay.at("k", kv_head))], my_k, own_bar.at[wg])
        if want_dk:
            plgpu.copy_gmem_to_smem(r.v.at[(*keys, lay.at("v", kv_head))], v_smem.at[wg],
                                    own_bar.at[_CONSUMERS + wg])
        k_seg = None
        if has_seg:
            plgpu.copy_gmem_to_smem(r.kv_seg.at[batch, pl.ds(key, bk)], ks_smem.at[wg],
                                    own_bar.at[2 * _CONSUMERS + wg])
            plgpu.barrier_wait(own_bar.at[2 * _CONSUMERS + wg])
            k_seg = _vec(ks_smem.at[wg], 0)
        plgpu.barrier_wait(own_bar.at[wg])
        if want_dk:
            plgpu.barrier_wait(own_bar.at[_CONSUMERS + wg])
        padded_kv = kv_len if padded else None
        split, dq_cols = _dq_split(head_dim)

        def add_dq(ds, step, block, q_head):
            """dQ of query block ``block`` of ``q_head`` into ``dq_acc``, from this consumer's
            dS^T tile, written to shared memory (wgmma reads it transposed). Split: once both
            consumers' tiles are there, dS @ K over the CTA's keys for this consumer's half of
            the columns; else this consumer's keys' share of every column."""
            rows = pl.ds(block * bq, bq)
            if not split:
                ds_smem.at[0, wg][...] = ds
                plgpu.commit_smem()
                dq = _mma(ds_smem.at[0, wg], my_k, (bq, head_dim), interpret, trans_a=True)
                add = functools.partial(_reduce_add, dq_stage.at[wg], dq,
                                        r.dq_acc.at[batch, rows, q_head], dq_bar.at[wg], interpret)
                if not interpret:
                    add()
                    return
                # The interpreter's read-add-write is not atomic: the consumers take turns.
                for c in range(_CONSUMERS):
                    pl.when(wg == c)(add)
                    plgpu.barrier_arrive(ds_bar)
                    plgpu.barrier_wait(ds_bar)
                return
            parity = lax.rem(step, 2)
            ds_smem.at[parity, wg][...] = ds
            plgpu.commit_smem()
            plgpu.barrier_arrive(ds_bar)
            plgpu.barrier_wait(ds_bar)
            for c in range(_CONSUMERS):  # static column slices

                @pl.when(wg == c)
                def _():
                    cols = pl.ds(c * dq_cols, dq_cols)
                    tiles = [(ds_smem.at[parity, j], k_smem.at[j, :, cols])
                             for j in range(_CONSUMERS)]
                    dq = _mma(*tiles[0], (bq, dq_cols), interpret, trans_a=True, plus=tiles[1:])
                    _reduce_add(dq_stage.at[c], dq, r.dq_acc.at[batch, rows, q_head, cols],
                                dq_bar.at[c], interpret)

        def head(g, carry):
            slope = r.slopes[kv_head * group + g] if has_alibi else None

            def body(masked):
                def step(block, i, carry):
                    acc = dict(zip(grads, carry))
                    slot = lax.rem(g * per_head + i, jnp.int32(t.stages))
                    plgpu.barrier_wait(q_bar.at[slot])

                    def probs(s):
                        k_seg_, q_seg = _tile_segments(k_seg, qs_bar, qs_smem, slot, masked,
                                                       has_spans)
                        s, visible = _logits(
                            s, spec2, masked, q_dim=1, q_first=spec2.q_offset + block * bq,
                            k_first=key, kv_len=padded_kv, q_seg=q_seg, k_seg=k_seg_,
                            slope=slope)
                        plgpu.barrier_wait(lse_bar.at[slot])
                        p = jnp.exp2(s - _bcast(_vec(lse_smem.at[slot], 1), 1, s.shape))
                        return p, s, visible

                    # The tiles are transposed (keys x queries) so dK and dV need no transposes.
                    # Without dQ here, P's exponentials run while the tensor cores take dP (with
                    # it, that measured 2-6% slower: more live registers).
                    kq = (my_k, q_smem.at[slot])
                    vdo = (v_smem.at[wg], do_smem.at[slot]) if want_dk else None
                    paired = want_dk and not with_dq
                    if paired:
                        plgpu.barrier_wait(do_bar.at[slot])
                        (p, s, visible), dp = _mma_pair(kq, vdo, (bk, bq), interpret, probs)
                    else:
                        p, s, visible = probs(_mma(*kq, (bk, bq), interpret, trans_b=True))
                        plgpu.barrier_wait(do_bar.at[slot])
                    if want_dv:
                        acc["dv"] = _mma_acc(acc["dv"], p.astype(dtype), do_smem.at[slot],
                                             interpret)
                    if want_dk:
                        if not paired:
                            dp = _mma(*vdo, (bk, bq), interpret, trans_b=True)
                        plgpu.barrier_wait(delta_bar.at[slot])
                        delta = _bcast(_vec(delta_smem.at[slot], 1), 1, s.shape)
                        ds = score_grad(p, dp, delta, s, visible, spec2).astype(dtype)
                        acc["dk"] = _mma_acc(acc["dk"], ds, q_smem.at[slot], interpret)
                    plgpu.barrier_arrive(free.at[slot])
                    if with_dq:
                        add_dq(ds, g * per_head + i, block, kv_head * group + g)
                    return tuple(acc[name] for name in grads)

                return step

            return _fused_range(parts, body, carry)

        zeros = plgpu.layout_cast(jnp.zeros((bk, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        acc = dict(zip(grads, lax.fori_loop(0, group, head, (zeros,) * len(grads))))
        if with_dq and split:  # the other consumer's last dQ product has read this K tile
            plgpu.barrier_arrive(ds_bar)
            plgpu.barrier_wait(ds_bar)
        # Each gradient leaves through the smem of an owned tile that the loop no longer reads.
        outs = {"dk": (my_k, acc.get("dk"), spec2.scale / LOG2E),
                "dv": (v_smem.at[wg] if want_dk else my_k, acc.get("dv"), 1.0)}
        for name in grads:
            buf, grad, factor = outs[name]
            buf[...] = (grad * factor).astype(dtype)
        plgpu.commit_smem()
        for name in grads:
            dest = (r.dkv.at[(*keys, lay.at(name.removeprefix("d"), kv_head))] if lay.packed
                    else getattr(r, name).at[(*keys, kv_head)])
            plgpu.copy_smem_to_gmem(outs[name][0], dest, commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _CONSUMERS)
    def _producer():
        def load(step, slot):
            g = lax.div(step, per_head)
            q_head = kv_head * group + g
            row = (lo + step - g * per_head) * bq
            rows = (batch, pl.ds(row, bq), q_head)
            plgpu.copy_gmem_to_smem(r.q.at[batch, pl.ds(row, bq), lay.at("q", q_head)],
                                    q_smem.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(r.lse.at[batch, q_head, pl.ds(row, bq)],
                                    lse_smem.at[slot], lse_bar.at[slot])
            plgpu.copy_gmem_to_smem(r.do.at[rows], do_smem.at[slot], do_bar.at[slot])
            if want_dk:
                plgpu.copy_gmem_to_smem(r.delta.at[batch, q_head, pl.ds(row, bq)],
                                        delta_smem.at[slot], delta_bar.at[slot])
            if has_seg:
                plgpu.copy_gmem_to_smem(r.q_seg.at[batch, pl.ds(row, bq)], qs_smem.at[slot],
                                        qs_bar.at[slot])

        _produce(n_steps, t.stages, [(load, free)])


def _dq_kernel(*refs, spec2, t, lay, nk, kv_len, has_seg, has_alibi, has_spans, ctas,
               interpret):
    r = kernel_refs(refs, BWD_INPUTS, has_seg, has_alibi, ("dq", "smem", "bars"),
                    has_spans=has_spans)
    q_smem, do_smem, lse_smem, delta_smem, qs_smem, k_smem, v_smem, ks_smem = r.smem
    own_bar, k_bar, v_bar, ks_bar, k_free, v_free = r.bars
    bq, bk = t.owned, t.streamed
    head_dim = r.q.shape[-1]
    dtype = r.q.dtype
    wg = lax.axis_index(_WG)
    batch, head, kv_head, cta_row, parts, n_steps, padded_kv = _query_cta(
        spec2, t, lay.heads // lay.kv_heads, nk, kv_len, r.spans, ctas
    )

    @pl.when(wg < _CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGS, action="increase")
        row = cta_row + wg * bq
        my_q, my_do = q_smem.at[wg], do_smem.at[wg]
        rows = (batch, pl.ds(row, bq), head)
        vec = (batch, head, pl.ds(row, bq))
        n_own = 5 if has_seg else 4
        plgpu.copy_gmem_to_smem(r.q.at[batch, pl.ds(row, bq), lay.at("q", head)], my_q,
                                own_bar.at[wg * n_own])
        plgpu.copy_gmem_to_smem(r.do.at[rows], my_do, own_bar.at[wg * n_own + 1])
        plgpu.copy_gmem_to_smem(r.lse.at[vec], lse_smem.at[wg], own_bar.at[wg * n_own + 2])
        plgpu.copy_gmem_to_smem(r.delta.at[vec], delta_smem.at[wg], own_bar.at[wg * n_own + 3])
        if has_seg:
            plgpu.copy_gmem_to_smem(r.q_seg.at[batch, pl.ds(row, bq)], qs_smem.at[wg],
                                    own_bar.at[wg * n_own + 4])
        for i in range(n_own):
            plgpu.barrier_wait(own_bar.at[wg * n_own + i])
        lse = _vec(lse_smem.at[wg], 0)
        delta = _vec(delta_smem.at[wg], 0)
        q_seg = _vec(qs_smem.at[wg], 0) if has_seg else None
        slope = r.slopes[head] if has_alibi else None

        def body(masked):
            def step(block, i, dq):
                slot = lax.rem(i, jnp.int32(t.stages))
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])

                def probs(s):
                    q_seg_, k_seg = _tile_segments(q_seg, ks_bar, ks_smem, slot, masked,
                                                   has_spans)
                    s, visible = _logits(s, spec2, masked, q_dim=0, q_first=spec2.q_offset + row,
                                         k_first=block * bk, kv_len=padded_kv, q_seg=q_seg_,
                                         k_seg=k_seg, slope=slope)
                    return jnp.exp2(s - _bcast(lse, 0, s.shape)), s, visible

                # P's exponentials run while the tensor cores take dP.
                (p, s, visible), dp = _mma_pair((my_q, k_smem.at[slot]),
                                                (my_do, v_smem.at[slot]), (bq, bk), interpret,
                                                probs)
                plgpu.barrier_arrive(v_free.at[slot])
                ds = score_grad(p, dp, _bcast(delta, 0, s.shape), s, visible, spec2)
                dq = _mma_acc(dq, ds.astype(dtype), k_smem.at[slot], interpret)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            return step

        dq = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        dq = _fused_range(parts, body, dq)
        my_q[...] = (dq * (spec2.scale / LOG2E)).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, r.dq.at[batch, pl.ds(row, bq), lay.at("q", head)])
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == _CONSUMERS)(lambda: _stream_kv(  # the producer warpgroup
        (r.k, r.v, r.kv_seg), (k_smem, v_smem, ks_smem), (k_bar, v_bar, ks_bar, k_free, v_free),
        batch=batch, kv_head=kv_head, lay=lay, first=parts[0], bk=bk, n_steps=n_steps,
        stages=t.stages))


@_once_per_shape
def backward(q, k, v, q_seg, kv_seg, alibi_slopes, out, lse, dout, *, spec, tiles, interpret):
    """``(dq, dk, dv)`` per the lowering contract."""
    lay = _Heads(q.shape[2], k.shape[2])
    (dq, dk, dv), _ = _backward(q, k, v, q_seg, kv_seg, alibi_slopes, out, lse, dout, lay, spec,
                                tiles, interpret)
    return dq, dk, dv


@_once_per_shape
def backward_packed(qkv, seg, alibi_slopes, out, lse, dout, *, spec, tiles, interpret):
    """The gradient of ``forward_packed``'s output w.r.t. ``qkv``, in its layout: the dK/dV
    kernel writes one packed array and the dQ kernel writes the query heads' gradient into it
    in place, where separate gradients would be concatenated (a full copy of all three)."""
    flat, lay = _flat(qkv)
    _, dqkv = _backward(flat, flat, flat, seg, seg, alibi_slopes, out, lse, dout, lay, spec,
                        tiles, interpret)
    return dqkv.reshape(*dqkv.shape[:2], *qkv.shape[2:])[:, :qkv.shape[1]]


def supports_packed(call: Call, tiles: Tiles) -> str | None:
    """Why ``forward_packed`` cannot run the call (None if it can): what ``supports`` says, and
    the dK/dV kernel in one pass (a second pass would have to add to the first's output)."""
    if (why := supports(call, tiles)) is not None:
        return why
    if len(_dkv_passes(tiles.dkv, call.head_dim)) > 1:
        return (f"head_dim {call.head_dim} runs dK and dV as two passes, which one packed "
                "output does not take")
    return None


def _backward(q, k, v, q_seg, kv_seg, alibi_slopes, out, lse, dout, lay, spec, tiles,
              interpret):
    """``((dq, dk, dv), None)``; packed (``lay``): ``(None, dqkv)`` with dqkv the ``(batch,
    padded len, heads * 3, head_dim)`` array the dK/dV kernel writes and the dQ kernel (or, with
    dQ summed by the dK/dV kernel, the kernel that casts that sum) then completes in place (a
    mutable ref, which Pallas passes as an aliased output: no copy)."""
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    heads, kv_heads = lay.heads, lay.kv_heads
    dkv_t, dq_t = tiles.dkv, tiles.dq
    # One padding serves both kernels: queries to a multiple of every query tile, keys likewise.
    q_mult = math.lcm(dkv_t.streamed, _CONSUMERS * dq_t.owned)
    kv_mult = math.lcm(_CONSUMERS * dkv_t.owned, dq_t.streamed)
    q_pad, kv_pad = pl.cdiv(q_len, q_mult) * q_mult, pl.cdiv(kv_len, kv_mult) * kv_mult
    if lay.packed:  # one array: padded for both of its uses
        q_pad = kv_pad = max(q_pad, kv_pad)
    spec2 = base2(spec)
    has_seg = q_seg is not None
    dtype = q.dtype
    f32 = jnp.float32

    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(f32), dout.astype(f32))
    # Rows that saw no key (lse = -inf) get lse = +inf, hence P = 0 and zero gradients.
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
    args = [
        *_padded_qkv(q, k, v, lay, q_pad, kv_pad),
        pad_to(dout, 1, q_pad), pad_to(lse2, 2, q_pad, jnp.inf), pad_to(delta, 2, q_pad),
    ]
    if has_seg:
        args += [pad_to(q_seg, 1, q_pad), pad_to(kv_seg, 1, kv_pad)]
    has_alibi = alibi_slopes is not None
    args += _base2_slopes(alibi_slopes)

    # dK, dV: a CTA owns 2 * bk keys of one kv head and streams the query tiles of its group.
    bk, bq, st = dkv_t.owned, dkv_t.streamed, dkv_t.stages
    key_ctas = kv_pad // (_CONSUMERS * bk)
    spans = _spans(q_seg, kv_seg, spec, key_ctas, _CONSUMERS * bk, bq, q_pad // bq)
    seg = lambda shape: plgpu.SMEM(shape, jnp.int32) if has_seg else None  # noqa: E731
    passes = _dkv_passes(dkv_t, head_dim)
    with_dq = _dq_in_dkv(dkv_t, head_dim, kv_len)
    split, dq_cols = _dq_split(head_dim)
    # dQ's float32 sum over the key CTAs, added to by TMA reductions (a mutable ref: aliased).
    dq_acc = jax.new_ref(jnp.zeros((batch, q_pad, heads, head_dim), f32)) if with_dq else None
    grad_kv = {}
    for grads in passes:
        with_dk = "dk" in grads  # a dV pass needs no V tiles and no delta
        maybe = lambda x: x if with_dk else None  # noqa: E731
        if_dq = lambda x: x if with_dq else None  # noqa: E731
        outs = plgpu.kernel(
            functools.partial(
                _dkv_kernel, spec2=spec2, t=dkv_t, lay=lay, nq=q_pad // bq, kv_len=kv_len,
                padded=kv_pad != kv_len, has_seg=has_seg, has_alibi=has_alibi, grads=grads,
                with_dq=with_dq, has_spans=bool(spans), ctas=key_ctas, interpret=interpret,
            ),
            out_type=[jax.ShapeDtypeStruct((batch, kv_pad, heads * 3, head_dim), dtype)]
            if lay.packed else [jax.ShapeDtypeStruct((batch, kv_pad, kv_heads, head_dim), dtype)
                                for _ in grads],
            scratch_types=[
                (
                    _tile_smem((_CONSUMERS, bk, head_dim), dtype),
                    maybe(_tile_smem((_CONSUMERS, bk, head_dim), dtype)),
                    seg((_CONSUMERS, bk)),
                    _tile_smem((st, bq, head_dim), dtype),
                    _tile_smem((st, bq, head_dim), dtype),
                    plgpu.SMEM((st, bq), f32),
                    maybe(plgpu.SMEM((st, bq), f32)),
                    seg((st, bq)),
                    if_dq(_tile_smem((2 if split else 1, _CONSUMERS, bk, bq), dtype)),
                    if_dq(_f32_tile_smem((_CONSUMERS, bq, dq_cols))),
                ),
                (
                    _bar(3 * _CONSUMERS), _bar(st), _bar(st), _bar(st), maybe(_bar(st)),
                    _bar(st) if has_seg else None, _bar(st, _CONSUMERS),
                    if_dq(_bar(1, _CONSUMERS)) if split or interpret else None,
                    if_dq(_bar(_CONSUMERS)),
                ),
            ],
            grid=(kv_heads, key_ctas, batch),
            grid_names=("heads", "k", "batch"),
            kernel_name="flash_attention_" + "".join(grads) + ("_dq" if with_dq else ""),
            num_threads=_CONSUMERS + 1,
            thread_name=_WG,
            compiler_params=_compiler_params(),
            interpret=_interpret_params(interpret),
        )(*args, *spans, *([dq_acc] if with_dq else []))
        grad_kv.update(zip(("dkv",) if lay.packed else grads, outs))

    # Packed: the dK/dV output goes in as a ref in the output's place, written where q's heads are.
    dqkv = jax.new_ref(grad_kv["dkv"]) if lay.packed else None
    scale = spec2.scale / LOG2E
    if with_dq:
        dq = _dq_from_sum(jax.freeze(dq_acc), dqkv, lay, dtype, scale, bq, interpret)
    else:
        dq = _dq_pass(args, dqkv, q_seg, kv_seg, spec, lay, dq_t, kv_len, q_pad, kv_pad,
                      has_alibi, interpret)
    if lay.packed:
        return None, jax.freeze(dqkv)
    return (dq[:, :q_len], grad_kv["dk"][:, :kv_len], grad_kv["dv"][:, :kv_len]), None


def _bar(n, arrivals=1):
    return plgpu.Barrier(num_arrivals=arrivals, num_barriers=n)


def _f32_tile_smem(shape):
    """Shared memory for float32 tiles of wgmma-layout registers, swizzled for TMA."""
    swizzle = plgpu.find_swizzle(shape[-1] * 32)
    return plgpu.SMEM(shape, jnp.float32, transforms=(
        plgpu.TilingTransform((8, swizzle // 4)), plgpu.SwizzleTransform(swizzle)))


def _dq_in_dkv(t: KernelTiles, head_dim: int, kv_len: int) -> bool:
    """Whether the dK/dV kernel also accumulates dQ (``DQ_IN_DKV``, in a one-pass backward, with
    split columns from ``SPLIT_DQ_MIN_LEN`` keys)."""
    return (DQ_IN_DKV and len(_dkv_passes(t, head_dim)) == 1
            and (not _dq_split(head_dim)[0] or kv_len >= SPLIT_DQ_MIN_LEN))


def _dq_out_kernel(acc_ref, out_ref, acc_smem, out_smem, bar, *, lay, rows, scale):
    """One ``rows``-row tile of dQ: the float32 sum times ``scale``, in ``out_ref``'s dtype, at
    the query head's place in ``out_ref`` (``lay``)."""
    batch, head, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
    sl = pl.ds(tile * rows, rows)
    plgpu.copy_gmem_to_smem(acc_ref.at[batch, sl, head], acc_smem, bar)
    plgpu.barrier_wait(bar)
    out_smem[...] = (acc_smem[...] * scale).astype(out_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[batch, sl, lay.at("q", head)])
    plgpu.wait_smem_to_gmem(0)


def _dq_from_sum(acc, dqkv, lay, dtype, scale, rows, interpret):
    """dQ from the dK/dV kernel's float32 sum: a new array, or (packed) written into ``dqkv``
    where the query heads are."""
    batch, q_pad, heads, head_dim = acc.shape
    return plgpu.kernel(
        functools.partial(_dq_out_kernel, lay=lay, rows=rows, scale=scale),
        out_type=() if dqkv is not None else jax.ShapeDtypeStruct(acc.shape, dtype),
        scratch_types=[plgpu.SMEM((rows, head_dim), jnp.float32),
                       plgpu.SMEM((rows, head_dim), dtype), _bar(1)],
        grid=(heads, q_pad // rows, batch),
        grid_names=("heads", "q", "batch"),
        kernel_name="flash_attention_dq_cast",
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(acc, *([dqkv] if dqkv is not None else []))


def _dq_pass(args, dqkv, q_seg, kv_seg, spec, lay, dq_t, kv_len, q_pad, kv_pad, has_alibi,
             interpret):
    """dQ by its own kernel (a CTA owns 2 * bq query rows of one head and streams its kv head's
    K/V tiles): a new array, or (packed) written into ``dqkv`` where the query heads are."""
    batch, _, _, head_dim = args[0].shape
    dtype, f32, heads = args[0].dtype, jnp.float32, lay.heads
    has_seg = q_seg is not None
    seg = lambda shape: plgpu.SMEM(shape, jnp.int32) if has_seg else None  # noqa: E731
    bq, bk, st = dq_t.owned, dq_t.streamed, dq_t.stages
    n_own = 5 if has_seg else 4
    query_ctas = q_pad // (_CONSUMERS * bq)
    spans = _spans(q_seg, kv_seg, spec, query_ctas, _CONSUMERS * bq, bk, kv_pad // bk)
    return plgpu.kernel(
        functools.partial(
            _dq_kernel, spec2=base2(spec), t=dq_t, lay=lay, nk=kv_pad // bk, kv_len=kv_len,
            has_seg=has_seg, has_alibi=has_alibi, has_spans=bool(spans), ctas=query_ctas,
            interpret=interpret,
        ),
        out_type=() if lay.packed else jax.ShapeDtypeStruct((batch, q_pad, heads, head_dim),
                                                            dtype),
        scratch_types=[
            (
                _tile_smem((_CONSUMERS, bq, head_dim), dtype),
                _tile_smem((_CONSUMERS, bq, head_dim), dtype),
                plgpu.SMEM((_CONSUMERS, bq), f32),
                plgpu.SMEM((_CONSUMERS, bq), f32),
                seg((_CONSUMERS, bq)),
                _tile_smem((st, bk, head_dim), dtype),
                _tile_smem((st, bk, head_dim), dtype),
                seg((st, bk)),
            ),
            (
                _bar(n_own * _CONSUMERS), _bar(st), _bar(st), _bar(st) if has_seg else None,
                _bar(st, _CONSUMERS), _bar(st, _CONSUMERS),
            ),
        ],
        grid=(heads, query_ctas, batch),
        grid_names=("heads", "q", "batch"),
        kernel_name="flash_attention_dq",
        num_threads=_CONSUMERS + 1,
        thread_name=_WG,
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(*args, *spans, *([dqkv] if lay.packed else []))
