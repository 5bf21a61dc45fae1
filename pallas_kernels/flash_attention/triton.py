"""Flash attention as Pallas kernels lowered through Triton (NVIDIA Ampere and Hopper, AMD).

Forward: one program per (query block, batch, head) streams the visible key blocks with an online
softmax in float32 (FlashAttention-2). Backward, with ``delta = rowsum(dO * O)`` computed in XLA
and P recomputed from the saved log-sum-exp:

- a dK/dV kernel, one program per (key block, batch, kv head), loops over the query heads of its
  group and over the visible query blocks, so GQA/MQA gradients need no reduction afterwards;
- a dQ kernel, one program per (query block, batch, head), loops over the visible key blocks.

Key blocks that a query block cannot see (causal, sliding window; with ``common.SKIP_DOCUMENTS``
also other packed documents' blocks, by ``common.document_spans``) are never visited; blocks that
it sees entirely skip the mask. Each kernel splits its loop into [masked edge | unmasked interior |
masked edge] so the common interior blocks pay for no ``where``.

T5's relative position bias is computed per tile: the bucket of each (key, query) pair from the
tile's position blocks (loaded as segment ids are), then a gather from the head's row of the
table. Its gradient comes from the dQ kernel: each program sums its dS per bucket (a static loop
over the buckets) into its own row of a partial output, which XLA sums afterwards (no atomics).

All kernels work in base 2: scale, soft cap, ALiBi slopes and relative bias are multiplied by
log2(e), which
multiplies every logit by exactly log2(e) (``transform_scores`` is homogeneous in the three), so the
softmax exponentials are bare ``exp2``. Lengths that are not a multiple of the block are padded
here; padded keys are masked and padded queries are sliced away (in the backward they carry
``dO = 0`` and ``lse = +inf``, hence ``P = 0``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import out_type
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

_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """One kernel's launch shape: query and key tile sizes, warps per program, pipeline depth."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The launch shapes of the forward, dK/dV and dQ kernels (tiles are powers of 2 >= 16). Each
    kernel shrinks its tiles to short sequences (decoding), down to Triton's 16-wide minimum."""

    fwd: KernelTiles
    dkv: KernelTiles
    dq: KernelTiles


def _tiles(fwd, dkv, dq) -> Tiles:
    return Tiles(KernelTiles(*fwd), KernelTiles(*dkv), KernelTiles(*dq))


# Defaults: compute capability -> head_dim -> tiles, each kernel's (block_q, block_k, num_warps,
# num_stages). The dK/dV kernel keeps a key tile resident and streams query tiles; the dQ kernel
# the reverse. FlashAttention-2 starting points not yet timed on a device, picked among the tiles
# that spill no registers and fit shared memory when compiled for sm_90a / sm_80, causal or not
# (`scripts/kernel_resources.py`). `scripts/bench_attention.py --sweep` times the candidates on
# the GPU at hand. "" is every other device.
DEFAULT_TILES: dict[str, dict[int, Tiles]] = {
    "9.0": {
        64: _tiles((128, 64, 4, 3), (32, 128, 8, 3), (128, 32, 4, 3)),
        128: _tiles((128, 64, 8, 3), (32, 128, 8, 2), (128, 64, 8, 2)),
        256: _tiles((64, 64, 8, 2), (16, 64, 8, 2), (64, 32, 8, 2)),
    },
    "8.0": {
        64: _tiles((128, 64, 8, 3), (32, 128, 8, 2), (128, 32, 4, 3)),
        128: _tiles((64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 8, 2)),
        256: _tiles((64, 64, 8, 2), (32, 32, 8, 1), (64, 32, 8, 2)),
    },
    "": {
        64: _tiles((64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)),
        128: _tiles((64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)),
        256: _tiles((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
    },
}


def default_tiles(call: Call) -> Tiles:
    """The target device's tiles for the smallest tabled head_dim >= the call's."""
    table = device_default(DEFAULT_TILES)
    return table[next((d for d in sorted(table) if d >= call.head_dim), max(table))]


def supports(call: Call, tiles: Tiles) -> str | None:
    """None when these kernels handle the call, else the reason (Triton needs power-of-2 tiles)."""
    if call.head_dim not in _HEAD_DIMS:  # Every length, mask and feature is handled.
        return f"head_dim must be one of {_HEAD_DIMS}, got {call.head_dim}"
    if jnp.dtype(call.dtype) not in _DTYPES:
        return f"dtype must be bfloat16, float16 or float32, got {jnp.dtype(call.dtype)}"
    for kernel in ("fwd", "dkv", "dq"):
        for field in ("block_q", "block_k"):
            size = getattr(getattr(tiles, kernel), field)
            if size < 16 or size & (size - 1):
                return f"tiles.{kernel}.{field} must be a power of 2 >= 16, got {size}"
    return None


def _fit(tiles: KernelTiles, q_len: int, kv_len: int) -> KernelTiles:
    """Tiles shrunk for short sequences (decoding), keeping Triton's 16-wide dot minimum."""

    def fit(block, length):
        return max(16, min(block, pl.next_power_of_2(length)))

    return dataclasses.replace(tiles, block_q=fit(tiles.block_q, q_len),
                               block_k=fit(tiles.block_k, kv_len))


# ----------------------------------------------------------------------------- shared pieces


def _dot(a, b, *, trans_b: bool = False):
    """float32-accumulated tile product; exact float32 products for float32 inputs."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _loop(lo, hi, body, carry):
    if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
        return carry
    return lax.fori_loop(lo, hi, body, carry)


def _iota(n: int):
    return lax.iota(jnp.int32, n)


# ----------------------------------------------------------------------------- forward


def _over_key_blocks(r, step, carry, *, spec2, tiles, nq, nk, kv_len, has_seg, has_alibi):
    """Folds ``step(start, k, s, visible, buckets, carry)`` over the key blocks that this
    program's query block sees; ``k`` is the key tile at row ``start``, ``s, visible`` its base-2
    logits against the query tile (masked only in the blocks that need it), ``buckets`` the
    tile's relative-position buckets (None without a relative bias)."""
    bq, bk = tiles.block_q, tiles.block_k
    padded_kv = nk * bk != kv_len
    q = r.q[...]
    q_first = spec2.q_offset + _q_block(pl.program_id(0), nq, spec2) * bq
    q_pos = (q_first + _iota(bq))[:, None]
    q_seg = r.q_seg[...][:, None] if has_seg else None
    slope = r.slopes[pl.program_id(2)] if has_alibi else None
    q_rpos = r.q_rpos[...][:, None] if spec2.has_relative_bias else None

    def body(masked):
        def tile(j, carry):
            start = pl.multiple_of(j * bk, bk)
            k = r.k[pl.ds(start, bk), :]
            k_pos = (start + _iota(bk))[None, :]
            seg = has_seg and segment_masked(masked, r.spans is not None)
            k_seg = r.kv_seg[pl.ds(start, bk)][None, :] if seg else None
            buckets = bias = None
            if spec2.has_relative_bias:
                buckets = spec2.relative.bucket(r.kv_rpos[pl.ds(start, bk)][None, :] - q_rpos)
                bias = r.table[buckets]
            s, visible = tile_logits(
                _dot(q, k, trans_b=True), q_pos, k_pos, spec2, masked=masked,
                kv_len=kv_len if padded_kv else None, q_seg=q_seg if seg else None, k_seg=k_seg,
                slope=slope, bias=bias,
            )
            return step(start, k, s, visible, buckets, carry)

        return tile

    parts = key_blocks(q_first, bq, bk, nk, spec2, kv_len if padded_kv else None)
    lo, full_lo, full_hi, hi = _within_documents(r, parts)
    carry = _loop(lo, full_lo, body(True), carry)
    carry = _loop(full_lo, full_hi, body(False), carry)
    return _loop(full_hi, hi, body(True), carry)


def _within_documents(r, parts):
    """``parts`` clipped to the program's ``document_spans`` block (when the call has them)."""
    return parts if r.spans is None else clip_blocks(parts, [r.spans[i] for i in range(4)])


def _spans(q_seg, kv_seg, spec, ctas, rows, block, num_blocks, index_map):
    """``(common.kernel_spans(...), their BlockSpecs)``: each program reads its own four bounds;
    ``index_map`` gives ``(batch, program's block)``."""
    spans = kernel_spans(q_seg, kv_seg, spec, ctas, rows, block, num_blocks)
    return spans, [pl.BlockSpec((None, None, 4), lambda *ids: (*index_map(*ids), 0))] * len(spans)


def _fwd_kernel(*refs, spec2, tiles, nq, nk, kv_len, has_seg, has_alibi, has_spans):
    r = kernel_refs(refs, ("q", "k", "v"), has_seg, has_alibi, ("o", "lse"),
                    spec2.has_relative_bias, has_spans)
    bq, bk = tiles.block_q, tiles.block_k

    def step(start, _k, s, _visible, _buckets, carry):
        acc, m, l = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = r.v[pl.ds(start, bk), :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    # m starts at MASK_VALUE: a row whose every key so far is masked keeps m = MASK_VALUE (its
    # masked terms are wiped by alpha = 0 once a visible key arrives), so m tells dead rows apart.
    carry = (
        jnp.zeros((bq, r.q.shape[-1]), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _over_key_blocks(
        r, step, carry, spec2=spec2, tiles=tiles, nq=nq, nk=nk, kv_len=kv_len, has_seg=has_seg,
        has_alibi=has_alibi,
    )

    dead = m <= 0.5 * MASK_VALUE
    l = jnp.where(dead, 1.0, l)
    r.o[...] = jnp.where(dead[:, None], 0.0, acc / l[:, None]).astype(r.o.dtype)
    r.lse[...] = jnp.where(dead, -jnp.inf, (m + jnp.log2(l)) / LOG2E)


def _q_block(pid, nq, spec):
    """Causal programs run heaviest (last) query block first, which evens out the tail."""
    return nq - 1 - pid if spec.causal else pid


def _relative_inputs(relative_bias, q_pad, kv_pad):
    """The kernels' relative-bias inputs: positions padded with zeros (padded rows are masked or
    sliced away) and the ``(heads, num_buckets)`` table in base-2 units."""
    table, q_rpos, kv_rpos = relative_bias
    return [pad_to(q_rpos, 1, q_pad), pad_to(kv_rpos, 1, kv_pad),
            jnp.transpose(table.astype(jnp.float32)) * LOG2E]


def forward(q, k, v, q_seg, kv_seg, alibi_slopes, *, spec, tiles: Tiles, interpret,
            relative_bias=None):
    """``(out, lse)`` per the lowering contract; ``relative_bias`` is ``(table, q_positions,
    kv_positions)`` when ``spec.relative`` is set."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    tiles = _fit(tiles.fwd, q_len, kv_len)
    bq, bk = tiles.block_q, tiles.block_k
    nq, nk = pl.cdiv(q_len, bq), pl.cdiv(kv_len, bk)
    spec2 = base2(spec)

    def q_index(i, b, h):
        return b, _q_block(i, nq, spec), h, 0

    def kv_index(i, b, h):
        return b, 0, lax.div(h, jnp.int32(group)), 0

    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), q_index),
        pl.BlockSpec((None, nk * bk, None, head_dim), kv_index),
        pl.BlockSpec((None, nk * bk, None, head_dim), kv_index),
    ]
    args = [pad_to(q, 1, nq * bq), pad_to(k, 1, nk * bk), pad_to(v, 1, nk * bk)]
    if q_seg is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, _q_block(i, nq, spec))),
            pl.BlockSpec((None, nk * bk), lambda i, b, h: (b, 0)),
        ]
        args += [pad_to(q_seg, 1, nq * bq), pad_to(kv_seg, 1, nk * bk)]
    if alibi_slopes is not None:
        in_specs.append(pl.BlockSpec((heads,), lambda i, b, h: (0,)))
        args.append(alibi_slopes.astype(jnp.float32) * LOG2E)
    if spec.has_relative_bias:
        num_buckets = spec.relative.num_buckets
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, _q_block(i, nq, spec))),
            pl.BlockSpec((None, nk * bk), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, num_buckets), lambda i, b, h: (h, 0)),
        ]
        args += _relative_inputs(relative_bias, nq * bq, nk * bk)
    spans, span_specs = _spans(q_seg, kv_seg, spec, nq, bq, bk, nk,
                               lambda i, b, h: (b, _q_block(i, nq, spec)))
    args += spans
    in_specs += span_specs

    kernel = functools.partial(
        _fwd_kernel, spec2=spec2, tiles=tiles, nq=nq, nk=nk, kv_len=kv_len,
        has_seg=q_seg is not None, has_alibi=alibi_slopes is not None, has_spans=bool(spans),
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(nq, batch, heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, head_dim), q_index),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, _q_block(i, nq, spec))),
        ],
        out_shape=[
            out_type((batch, nq * bq, heads, head_dim), q.dtype, *args),
            out_type((batch, heads, nq * bq), jnp.float32, *args),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)
    return out[:, :q_len], lse[:, :, :q_len]


# ----------------------------------------------------------------------------- backward


def _dkv_kernel(*refs, spec2, tiles, nq, kv_len, padded_kv, group, has_seg, has_alibi,
                has_spans):
    r = kernel_refs(refs, BWD_INPUTS, has_seg, has_alibi, ("dk", "dv"), spec2.has_relative_bias,
                    has_spans)
    bq, bk = tiles.block_q, tiles.block_k
    head_dim = r.k.shape[-1]

    k_first = pl.program_id(0) * bk
    k = r.k[...]
    v = r.v[...]
    # The tile is kept transposed (keys x queries) so dK and dV come out without transposes.
    k_pos = (k_first + _iota(bk))[:, None]
    k_seg = r.kv_seg[...][:, None] if has_seg else None
    k_rpos = r.kv_rpos[...][:, None] if spec2.has_relative_bias else None

    first_head = pl.program_id(2) * group

    def visit(first, last, masked, carry):
        """Query blocks ``[first, last)`` of every head of the group, as one flat loop.

        One loop rather than a loop over heads around a loop over blocks: the flat loop needs no
        nested trip counts, and Pallas' interpreter mistypes ref reads in nested loops inside
        ``shard_map``.
        """
        count = last - first

        def step(t, carry):
            dk, dv = carry
            g, i = (0, first + t) if group == 1 else (lax.div(t, count), first + lax.rem(t, count))
            start = pl.multiple_of(i * bq, bq)
            rows = pl.ds(start, bq)
            q = r.q[rows, g, :]
            do = r.do[rows, g, :]
            lse = r.lse[g, rows]
            delta = r.delta[g, rows]
            q_pos = (spec2.q_offset + start + _iota(bq))[None, :]
            seg = has_seg and segment_masked(masked, r.spans is not None)
            q_seg = r.q_seg[rows][None, :] if seg else None
            slope = r.slopes[first_head + g] if has_alibi else None
            bias = None
            if spec2.has_relative_bias:  # the table block holds the group's heads
                bias = r.table[g, spec2.relative.bucket(k_rpos - r.q_rpos[rows][None, :])]
            s, visible = tile_logits(
                _dot(k, q, trans_b=True), q_pos, k_pos, spec2, masked=masked,
                kv_len=kv_len if padded_kv else None, q_seg=q_seg, k_seg=k_seg if seg else None,
                slope=slope, bias=bias,
            )
            p = jnp.exp2(s - lse[None, :])
            dv = dv + _dot(p.astype(do.dtype), do)
            dp = _dot(v, do, trans_b=True)
            ds = score_grad(p, dp, delta[None, :], s, visible, spec2)
            dk = dk + _dot(ds.astype(q.dtype), q)
            return dk, dv

        return _loop(0, group * count, step, carry)

    lo, full_lo, full_hi, hi = _within_documents(
        r, query_blocks(k_first, bk, bq, nq, spec2, kv_len if padded_kv else None))
    zeros = jnp.zeros((bk, head_dim), jnp.float32)
    carry = visit(lo, full_lo, True, (zeros, zeros))
    carry = visit(full_lo, full_hi, False, carry)
    dk, dv = visit(full_hi, hi, True, carry)
    r.dk[...] = (dk * spec2.scale / LOG2E).astype(r.dk.dtype)
    r.dv[...] = dv.astype(r.dv.dtype)


def _dq_kernel(*refs, spec2, tiles, nq, nk, kv_len, has_seg, has_alibi, has_spans):
    has_rel = spec2.has_relative_bias
    r = kernel_refs(refs, BWD_INPUTS, has_seg, has_alibi, ("dq", "dtable") if has_rel else ("dq",),
                    has_rel, has_spans)
    bk = tiles.block_k
    do = r.do[...]
    lse = r.lse[...][:, None]
    delta = r.delta[...][:, None]

    def step(start, k, s, visible, buckets, carry):
        dq, dtable = carry
        v = r.v[pl.ds(start, bk), :]
        p = jnp.exp2(s - lse)
        dp = _dot(do, v, trans_b=True)
        ds = score_grad(p, dp, delta, s, visible, spec2)
        if has_rel:
            dtable = dtable + _bucket_sums(ds, buckets, spec2.relative.num_buckets,
                                           r.dtable.shape[-1])
        return dq + _dot(ds.astype(k.dtype), k), dtable

    carry = (jnp.zeros(r.q.shape, jnp.float32),
             jnp.zeros((r.dtable.shape[-1],), jnp.float32) if has_rel else None)
    dq, dtable = _over_key_blocks(
        r, step, carry, spec2=spec2, tiles=tiles, nq=nq, nk=nk, kv_len=kv_len, has_seg=has_seg,
        has_alibi=has_alibi,
    )
    r.dq[...] = (dq * spec2.scale / LOG2E).astype(r.dq.dtype)
    if has_rel:
        r.dtable[...] = dtable


def _bucket_sums(ds, buckets, num_buckets: int, width: int):
    """``(width,)``: entry ``b < num_buckets`` is the sum of ``ds`` over the tile's pairs in
    bucket ``b``: one masked sum per bucket (Triton has no scatter-add into registers), only
    over the buckets of the pairs with a gradient (a tile far from the diagonal holds one or
    two; one of another segment none)."""
    lanes = _iota(width)
    live = ds != 0.0
    first = jnp.min(jnp.where(live, buckets, num_buckets))
    last = jnp.max(jnp.where(live, buckets, -1))

    def add(b, sums):
        total = jnp.sum(jnp.where(buckets == b, ds, 0.0))
        return sums + jnp.where(lanes == b, total, 0.0)

    return lax.fori_loop(first, last + 1, add, jnp.zeros((width,), jnp.float32))


def backward(q, k, v, q_seg, kv_seg, alibi_slopes, out, lse, dout, *, spec, tiles: Tiles,
             interpret, relative_bias=None):
    """``(dq, dk, dv)`` per the lowering contract, and the float32 ``(num_buckets, heads)``
    table gradient last when ``relative_bias`` (``forward``'s) is given."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dkv_tiles, dq_tiles = _fit(tiles.dkv, q_len, kv_len), _fit(tiles.dq, q_len, kv_len)
    # Tiles are powers of 2, so padding to the larger one suits both kernels.
    q_pad = pl.cdiv(q_len, max(dkv_tiles.block_q, dq_tiles.block_q)) * max(
        dkv_tiles.block_q, dq_tiles.block_q)
    kv_pad = pl.cdiv(kv_len, max(dkv_tiles.block_k, dq_tiles.block_k)) * max(
        dkv_tiles.block_k, dq_tiles.block_k)
    spec2 = base2(spec)
    has_seg, has_alibi = q_seg is not None, alibi_slopes is not None
    has_rel = spec.has_relative_bias

    f32 = jnp.float32
    delta = jnp.swapaxes(jnp.sum(out.astype(f32) * dout.astype(f32), axis=-1), 1, 2)
    # Rows that saw no key (lse = -inf) get lse = +inf, hence P = 0 and zero gradients.
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
    q_p, do_p = pad_to(q, 1, q_pad), pad_to(dout, 1, q_pad)
    k_p, v_p = pad_to(k, 1, kv_pad), pad_to(v, 1, kv_pad)
    lse_p, delta_p = pad_to(lse2, 2, q_pad, jnp.inf), pad_to(delta, 2, q_pad)
    extra = []
    if has_seg:
        extra += [pad_to(q_seg, 1, q_pad), pad_to(kv_seg, 1, kv_pad)]
    if has_alibi:
        extra.append(alibi_slopes.astype(f32) * LOG2E)
    if has_rel:
        extra += _relative_inputs(relative_bias, q_pad, kv_pad)
        num_buckets = spec.relative.num_buckets
    alibi_spec = [pl.BlockSpec((heads,), lambda *_: (0,))] if has_alibi else []
    inputs = (q_p, k_p, v_p, do_p, lse_p, delta_p, *extra)

    # dK, dV: grid over (key block, batch, kv head); the group's query heads are one block.
    bq, bk = dkv_tiles.block_q, dkv_tiles.block_k
    nq = q_pad // bq
    seg_specs = [
        pl.BlockSpec((None, q_pad), lambda j, b, h: (b, 0)),
        pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
    ] if has_seg else []
    kv_block = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    q_group = pl.BlockSpec((None, q_pad, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    row_group = pl.BlockSpec((None, group, q_pad), lambda j, b, h: (b, h, 0))
    rel_specs = [
        pl.BlockSpec((None, q_pad), lambda j, b, h: (b, 0)),
        pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
        pl.BlockSpec((group, num_buckets), lambda j, b, h: (h, 0)),
    ] if has_rel else []
    spans, span_specs = _spans(q_seg, kv_seg, spec, kv_pad // bk, bk, bq, nq,
                               lambda j, b, h: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel, spec2=spec2, tiles=dkv_tiles, nq=nq, kv_len=kv_len,
            padded_kv=kv_pad != kv_len, group=group, has_seg=has_seg, has_alibi=has_alibi,
            has_spans=bool(spans),
        ),
        grid=(kv_pad // bk, batch, kv_heads),
        in_specs=[q_group, kv_block, kv_block, q_group, row_group, row_group, *seg_specs,
                  *alibi_spec, *rel_specs, *span_specs],
        out_specs=[kv_block, kv_block],
        out_shape=[out_type(k_p.shape, k.dtype, *inputs)] * 2,
        compiler_params=plgpu.CompilerParams(
            num_warps=dkv_tiles.num_warps, num_stages=dkv_tiles.num_stages),
        interpret=interpret,
        name="flash_attention_dkv",
    )(*inputs, *spans)

    # dQ: grid over (query block, batch, head).
    bq, bk = dq_tiles.block_q, dq_tiles.block_k
    nq, nk = q_pad // bq, kv_pad // bk

    def q_index(i, b, h):
        return b, _q_block(i, nq, spec), h, 0

    def kv_index(i, b, h):
        return b, 0, lax.div(h, jnp.int32(group)), 0

    def row_index(i, b, h):
        return b, h, _q_block(i, nq, spec)

    seg_specs = [
        pl.BlockSpec((None, bq), lambda i, b, h: (b, _q_block(i, nq, spec))),
        pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
    ] if has_seg else []
    q_block = pl.BlockSpec((None, bq, None, head_dim), q_index)
    kv_full = pl.BlockSpec((None, kv_pad, None, head_dim), kv_index)
    rows = pl.BlockSpec((None, None, bq), row_index)
    rel_specs = [
        pl.BlockSpec((None, bq), lambda i, b, h: (b, _q_block(i, nq, spec))),
        pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, num_buckets), lambda i, b, h: (h, 0)),
    ] if has_rel else []
    spans, span_specs = _spans(q_seg, kv_seg, spec, nq, bq, bk, nk,
                               lambda i, b, h: (b, _q_block(i, nq, spec)))
    out_specs, out_shape = q_block, out_type(q_p.shape, q.dtype, *inputs)
    if has_rel:  # one row of per-bucket sums per program
        width = pl.next_power_of_2(num_buckets)
        out_specs = [out_specs, pl.BlockSpec((None, None, None, width),
                                             lambda i, b, h: (b, h, _q_block(i, nq, spec), 0))]
        out_shape = [out_shape, out_type((batch, heads, nq, width), f32, *inputs)]
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel, spec2=spec2, tiles=dq_tiles, nq=nq, nk=nk, kv_len=kv_len,
            has_seg=has_seg, has_alibi=has_alibi, has_spans=bool(spans),
        ),
        grid=(nq, batch, heads),
        in_specs=[q_block, kv_full, kv_full, q_block, rows, rows, *seg_specs, *alibi_spec,
                  *rel_specs, *span_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=dq_tiles.num_warps, num_stages=dq_tiles.num_stages),
        interpret=interpret,
        name="flash_attention_dq",
    )(*inputs, *spans)
    if not has_rel:
        return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
    dq, parts = dq
    d_table = jnp.transpose(jnp.sum(parts, axis=(0, 2))[:, :num_buckets])
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len], d_table
