"""Flash attention as Pallas TPU kernels (Mosaic-TPU lowering), forward and backward.

Three ``pallas_call``s, each over a ``(batch, head, block, block)`` grid whose last dimension is the
sequential ("arbitrary") reduction and whose other dimensions are "parallel" (split across
TensorCores on megacore chips):

* forward: one query block per ``(b, h, i)``; the innermost loop walks key blocks with an online
  softmax whose running max, normaliser and output accumulator live in float32 VMEM scratch.
* dq: the same grid; recomputes the probabilities from the saved log-sum-exp and accumulates dq.
* dkv: one key block per ``(b, kv_head, j)``; the innermost loop walks the query blocks of every
  query head of the GQA group, so dk/dv are summed per kv head in VMEM and K/V are never repeated.
  It works on transposed tiles (keys on sublanes, queries on lanes) so that all four matmuls are
  plain or rhs-transposed MXU forms and no (block_k, block_q) tile is transposed in the kernel.

Layout notes (Mosaic tiles vectors as (8 sublanes, 128 lanes)): tensors are moved to
``(batch, head, length, head_dim)`` so a block's last two dims are (rows, head_dim); per-row scalars
(running max, normaliser, lse, delta, query segment ids) are kept replicated across the 128 lanes,
per-column scalars (key segment ids, and lse / delta / query segment ids in the transposed dkv
kernel) replicated across 8 sublanes and pre-split into blocks, so that every block shape is legal
for any block size that is a multiple of 8 and the broadcasts in the kernel are whole-vreg copies.

Blocks that causality or the sliding window make invisible are skipped with ``pl.when``, and the
index maps clamp to the visible range so the pipeline re-uses the resident block instead of
fetching a skipped one. Lengths that are not block multiples are padded here; padded keys are
masked by position and padded query rows are sliced off (their lse is +inf in the backward pass so
they contribute nothing to dk/dv). Segment-id masks are applied per element, not used to skip
blocks. float16 inputs run through the float32 kernels (see ``_WIDENED``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._api import device_default
from pallas_kernels.flash_attention.common import (
    BWD_INPUTS,
    MASK_VALUE,
    AttentionSpec,
    Call,
    kernel_refs,
    key_blocks,
    pad_to,
    query_blocks,
    score_grad,
    tile_logits,
)

NUM_LANES = 128
NUM_SUBLANES = 8



@dataclasses.dataclass(frozen=True)
class Tiles:
    """Query and key block sizes of the forward / dQ grid and of the dK/dV grid (multiples of 8,
    the sublane tile)."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int


# Default tiles by device kind, shrunk to short sequences (see ``default_tiles``). No TPU was
# available to tune them; 512x512 is the size MaxText's splash attention uses by default on
# v4/v5/v6, and it fits the 16 MiB default scoped VMEM of v5e with head_dim 256 (about 6 MiB
# forward, 9 MiB dkv). Key a device kind here once it has been measured.
DEFAULT_TILES = {"": Tiles(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512)}

# float16 tiles are not a native Mosaic-TPU matmul/VPU type on most chips, so float16 inputs are
# widened to float32 (exact) around the kernels and the results narrowed back.
_WIDENED = jnp.dtype(jnp.float16)

# Rows of a block that no visible key reached have a running max of -inf or MASK_VALUE; any real
# logit is far above this threshold.
_SEEN_THRESHOLD = 0.5 * MASK_VALUE

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_tiles(call: Call) -> Tiles:
    """The device's tiles, each shrunk to its padded length rounded to the native tile: query rows
    to the sublane tile of the kernels' dtype (8 for float32, 16 for bfloat16) in the forward
    pass, and to 128 lanes where the dimension is the lane axis (keys everywhere, queries in the
    transposed dkv kernel)."""
    default = device_default(DEFAULT_TILES)
    dtype = jnp.float32 if jnp.dtype(call.dtype) == _WIDENED else call.dtype
    sublanes = NUM_SUBLANES * (4 // jnp.dtype(dtype).itemsize)
    lq, lk = call.q_shape[1], call.k_shape[1]
    return Tiles(
        block_q=min(default.block_q, _round_up(lq, sublanes)),
        block_k=min(default.block_k, _round_up(lk, NUM_LANES)),
        block_q_bwd=min(default.block_q_bwd, _round_up(lq, NUM_LANES)),
        block_k_bwd=min(default.block_k_bwd, _round_up(lk, NUM_LANES)),
    )


def supports(call: Call, tiles: Tiles) -> str | None:
    """None when these kernels handle the call, else a one-line reason."""
    if call.spec.q_offset < 0:
        return f"the TPU kernel needs q_offset >= 0, got {call.spec.q_offset}"
    if call.spec.has_relative_bias:
        return "no relative position bias in the TPU kernel (the Triton lowering has it)"
    for field in dataclasses.fields(tiles):
        value = getattr(tiles, field.name)
        if value % NUM_SUBLANES:
            return (f"tiles.{field.name} must be a positive multiple of {NUM_SUBLANES} (the "
                    f"sublane tile), got {value}")
    return None


# --------------------------------------------------------------------------------------------
# Visible block ranges (shared by index maps and kernel bodies, so a skipped block is exactly
# one whose data the index map did not fetch).
# --------------------------------------------------------------------------------------------


def _kv_block_range(qi, spec: AttentionSpec, bq: int, bk: int, nk: int):
    """Inclusive range of key blocks that query block ``qi`` can see."""
    lo, _, _, hi = key_blocks(spec.q_offset + qi * bq, bq, bk, nk, spec)
    return lo, hi - 1


def _q_block_range(ki, spec: AttentionSpec, bq: int, bk: int, nq: int):
    """Inclusive range of query blocks that can see key block ``ki``."""
    lo, _, _, hi = query_blocks(ki * bk, bk, bq, nq, spec)
    return lo, hi - 1


def _clamp(i, lo, hi, n: int):
    """Block index for the DMA: ``i`` inside the visible range, always a valid block."""
    if isinstance(lo, int) and isinstance(hi, int):
        return i
    return jnp.clip(jnp.minimum(jnp.maximum(i, lo), hi), 0, n - 1)


def _when_visible(i, lo, hi, body):
    """Run ``body`` only for blocks inside ``[lo, hi]`` (unconditionally when that is static)."""
    if isinstance(lo, int) and isinstance(hi, int):
        body()
    else:
        pl.when((i >= lo) & (i <= hi))(body)


# --------------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------------


def _lanes(x, n: int):
    """(rows, 128) lane-replicated values -> (rows, n)."""
    if n == NUM_LANES:
        return x
    if n % NUM_LANES == 0:
        return jnp.tile(x, (1, n // NUM_LANES))
    if n < NUM_LANES:
        return x[:, :n]
    return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _sublanes(x, n: int):
    """(8, cols) sublane-replicated values -> (n, cols); ``n`` is a multiple of 8."""
    return x if n == NUM_SUBLANES else jnp.tile(x, (n // NUM_SUBLANES, 1))


def _positions(shape, q_axis: int, q_start, k_start, spec: AttentionSpec, need_q: bool,
               need_k: bool):
    """Absolute query and key positions on a tile with queries along ``q_axis`` (None: unneeded)."""
    q_pos = k_pos = None
    if need_q:
        q_pos = spec.q_offset + q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    if need_k:
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    return q_pos, k_pos


def _query_major_logits(r, s, spec: AttentionSpec, bq: int, bk: int, kv_len: int | None):
    """``tile_logits`` of the forward's and dQ's ``(bq, bk)`` tile ``s`` at grid step ``(b, h,
    qi, ki)``: queries on sublanes, keys on lanes."""
    h, qi, ki = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    q_pos, k_pos = _positions(
        (bq, bk), 0, qi * bq, ki * bk, spec,
        need_q=spec.causal or spec.has_alibi,
        need_k=spec.causal or spec.has_alibi or kv_len is not None,
    )
    return tile_logits(
        s, q_pos, k_pos, spec,
        q_seg=None if r.q_seg is None else _lanes(r.q_seg[...], bk),
        k_seg=None if r.kv_seg is None else _sublanes(r.kv_seg[...], bq),
        slope=None if r.slopes is None else r.slopes[h],
        kv_len=kv_len,
    )


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, spec: AttentionSpec, bq: int, bk: int, nk: int, kv_len: int | None):
    r = kernel_refs(
        refs, ("q", "k", "v"), spec.has_segment_ids, spec.has_alibi,
        ("o", "lse", "m_scr", "l_scr", "acc_scr"),
    )  # fmt: skip
    qi, ki = pl.program_id(2), pl.program_id(3)
    head_dim = r.acc_scr.shape[-1]

    @pl.when(ki == 0)
    def _init():
        r.m_scr[...] = jnp.full(r.m_scr.shape, -jnp.inf, jnp.float32)
        r.l_scr[...] = jnp.zeros(r.l_scr.shape, jnp.float32)
        r.acc_scr[...] = jnp.zeros(r.acc_scr.shape, jnp.float32)

    def step():
        v = r.v[...]
        s = lax.dot_general(r.q[...], r.k[...], _NT, preferred_element_type=jnp.float32)
        logits, _ = _query_major_logits(r, s, spec, bq, bk, kv_len)
        m_prev = r.m_scr[...]
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        # A row whose keys so far are all masked has m_next == MASK_VALUE, so p == 1 on masked
        # entries; a later visible key rescales that by exp(MASK_VALUE - m) == 0, and a row that
        # never sees one is zeroed in the epilogue.
        p = jnp.exp(logits - _lanes(m_next, bk))
        r.l_scr[...] = alpha * r.l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        r.m_scr[...] = m_next
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        r.acc_scr[...] = r.acc_scr[...] * _lanes(alpha, head_dim) + pv

    lo, hi = _kv_block_range(qi, spec, bq, bk, nk)
    _when_visible(ki, lo, hi, step)

    @pl.when(ki == nk - 1)
    def _finish():
        m, l = r.m_scr[...], r.l_scr[...]
        seen = m > _SEEN_THRESHOLD
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        r.o[...] = (r.acc_scr[...] * _lanes(inv, head_dim)).astype(r.o.dtype)
        r.lse[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _to_bhld(x, length: int):
    """(B, L, H, D) -> (B, H, L_padded, D) with zero padding."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _from_bhld(x, length: int):
    return jnp.swapaxes(x[:, :, :length], 1, 2)


def _column(x, length: int, value):
    """(..., L) -> (..., L_padded, 128): one value per row, replicated across lanes."""
    x = pad_to(x, -1, length, value)
    return jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES))


def _row_blocks(x, length: int, block: int, value):
    """(..., L) -> (..., L_padded // block, 8, block): per-column values split into blocks and
    replicated across sublanes, so the block shape equals the array's last two dims."""
    x = pad_to(x, -1, length, value)
    x = x.reshape(*x.shape[:-1], length // block, 1, block)
    return jnp.broadcast_to(x, (*x.shape[:-2], NUM_SUBLANES, block))


def _interpret_arg(interpret: bool):
    # The TPU interpreter simulates VMEM/SMEM, poisons uninitialised scratch with NaN and raises
    # on out-of-bounds block reads, so CPU tests check what the hardware would see.
    return pltpu.InterpretParams() if interpret else False


def _compiler_params(interpret: bool):
    # The last grid axis carries the accumulators; the others are independent (megacore may split
    # them). The jax 0.11 TPU interpreter does not extend these semantics by the grid axes that
    # vmap prepends and then fails on the length mismatch, so interpret mode leaves them unset
    # (all sequential), which changes nothing for a one-core simulation.
    if interpret:
        return pltpu.CompilerParams()
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _smem_spec():
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _q_major_maps(spec: AttentionSpec, bq: int, bk: int, nk: int, group: int, q_seg, kv_seg,
                  slopes, lq_p: int, lk_p: int):
    """``(q_map, kv_map, extra_args, extra_specs)`` of the (b, h, q block, kv block) grid of the
    forward and dq kernels; the extras are the segment ids and ALiBi slopes the spec asks for."""

    def q_map(b, h, i, j):
        return b, h, i, 0

    def kv_map(b, h, i, j):
        lo, hi = _kv_block_range(i, spec, bq, bk, nk)
        return b, h // group, _clamp(j, lo, hi, nk), 0

    args, in_specs = [], []
    if spec.has_segment_ids:
        args += [_column(q_seg, lq_p, -1), _row_blocks(kv_seg, lk_p, bk, -1)]
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec(
                (None, None, NUM_SUBLANES, bk),
                lambda b, h, i, j: (b, kv_map(b, h, i, j)[2], 0, 0),
            ),
        ]
    if spec.has_alibi:
        args.append(slopes)
        in_specs.append(_smem_spec())
    return q_map, kv_map, args, in_specs


def _pallas_call(kernel, args, *, name: str, grid, in_specs, out_specs, out_shape, scratch_shapes,
                 flops: int, transcendentals: int, bytes_accessed: int, interpret: bool):
    """``pl.pallas_call`` with this file's compiler params, cost estimate and interpret mode."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch_shapes,
        compiler_params=_compiler_params(interpret),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=transcendentals, bytes_accessed=bytes_accessed
        ),
        interpret=_interpret_arg(interpret),
        name=name,
    )(*args)


def forward(q, k, v, q_seg, kv_seg, alibi_slopes, *, spec: AttentionSpec, tiles: Tiles,
            interpret: bool):
    """Returns ``(out, lse)``: out like q, lse (B, H, Lq) float32, -inf where no key is visible."""
    if q.dtype == _WIDENED:
        out, lse = forward(
            *(x.astype(jnp.float32) for x in (q, k, v)), q_seg, kv_seg, alibi_slopes,
            spec=spec, tiles=tiles, interpret=interpret,
        )
        return out.astype(q.dtype), lse
    batch, lq, heads, head_dim = q.shape
    _, lk, kv_heads, _ = k.shape
    group = heads // kv_heads
    bq, bk = tiles.block_q, tiles.block_k
    lq_p, lk_p = _round_up(lq, bq), _round_up(lk, bk)
    nq, nk = lq_p // bq, lk_p // bk

    slopes = alibi_slopes.astype(jnp.float32) if spec.has_alibi else None
    q_map, kv_map, extra_args, extra_specs = _q_major_maps(
        spec, bq, bk, nk, group, q_seg, kv_seg, slopes, lq_p, lk_p
    )
    kernel = functools.partial(
        _fwd_kernel, spec=spec, bq=bq, bk=bk, nk=nk, kv_len=lk if lk_p != lk else None
    )
    out, lse = _pallas_call(
        kernel,
        [_to_bhld(q, lq_p), _to_bhld(k, lk_p), _to_bhld(v, lk_p), *extra_args],
        name="flash_attention_fwd_tpu",
        grid=(batch, heads, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), q_map),
            pl.BlockSpec((None, None, bk, head_dim), kv_map),
            pl.BlockSpec((None, None, bk, head_dim), kv_map),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, head_dim), q_map),
            pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, lq_p, head_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, lq_p, NUM_LANES), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, NUM_LANES), jnp.float32),
            pltpu.VMEM((bq, NUM_LANES), jnp.float32),
            pltpu.VMEM((bq, head_dim), jnp.float32),
        ],
        flops=4 * batch * heads * lq_p * lk_p * head_dim,
        transcendentals=batch * heads * lq_p * lk_p,
        bytes_accessed=q.dtype.itemsize * batch * (2 * heads * lq_p + 2 * kv_heads * lk_p)
        * head_dim,
        interpret=interpret,
    )
    return _from_bhld(out, lq), lse[:, :, :lq, 0]


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _dq_kernel(*refs, spec: AttentionSpec, bq: int, bk: int, nk: int, kv_len: int | None):
    r = kernel_refs(refs, BWD_INPUTS, spec.has_segment_ids, spec.has_alibi, ("dq", "dq_scr"))
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        r.dq_scr[...] = jnp.zeros(r.dq_scr.shape, jnp.float32)

    def step():
        k, v = r.k[...], r.v[...]
        s = lax.dot_general(r.q[...], k, _NT, preferred_element_type=jnp.float32)
        logits, visible = _query_major_logits(r, s, spec, bq, bk, kv_len)
        p = jnp.exp(logits - _lanes(r.lse[...], bk))
        dp = lax.dot_general(r.do[...], v, _NT, preferred_element_type=jnp.float32)
        ds = score_grad(p, dp, _lanes(r.delta[...], bk), logits, visible, spec)
        r.dq_scr[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    lo, hi = _kv_block_range(qi, spec, bq, bk, nk)
    _when_visible(ki, lo, hi, step)

    @pl.when(ki == nk - 1)
    def _finish():
        r.dq[...] = (r.dq_scr[...] * spec.scale).astype(r.dq.dtype)


def _dkv_kernel(*refs, spec: AttentionSpec, bq: int, bk: int, nq: int, group: int):
    r = kernel_refs(
        refs, BWD_INPUTS, spec.has_segment_ids, spec.has_alibi, ("dk", "dv", "dk_scr", "dv_scr")
    )
    g, ki, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    h, qi = g * group + t // nq, t % nq

    @pl.when(t == 0)
    def _init():
        r.dk_scr[...] = jnp.zeros(r.dk_scr.shape, jnp.float32)
        r.dv_scr[...] = jnp.zeros(r.dv_scr.shape, jnp.float32)

    def step():
        q, do = r.q[...], r.do[...]
        # Transposed tiles: rows are keys, columns are queries.
        s = lax.dot_general(r.k[...], q, _NT, preferred_element_type=jnp.float32)
        q_pos, k_pos = _positions(
            (bk, bq), 1, qi * bq, ki * bk, spec,
            need_q=spec.causal or spec.has_alibi, need_k=spec.causal or spec.has_alibi,
        )
        # Padded keys need no mask here: their dk/dv rows are sliced off and never mix with others.
        logits, visible = tile_logits(
            s, q_pos, k_pos, spec,
            q_seg=None if r.q_seg is None else _sublanes(r.q_seg[...], bk),
            k_seg=None if r.kv_seg is None else _lanes(r.kv_seg[...], bq),
            slope=None if r.slopes is None else r.slopes[h],
            kv_len=None,
        )
        p = jnp.exp(logits - _sublanes(r.lse[...], bk))
        r.dv_scr[...] += lax.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(r.v[...], do, _NT, preferred_element_type=jnp.float32)
        ds = score_grad(p, dp, _sublanes(r.delta[...], bk), logits, visible, spec)
        r.dk_scr[...] += lax.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)

    lo, hi = _q_block_range(ki, spec, bq, bk, nq)
    _when_visible(qi, lo, hi, step)

    @pl.when(t == group * nq - 1)
    def _finish():
        r.dk[...] = (r.dk_scr[...] * spec.scale).astype(r.dk.dtype)
        r.dv[...] = r.dv_scr[...].astype(r.dv.dtype)


def backward(q, k, v, q_seg, kv_seg, alibi_slopes, out, lse, dout, *, spec: AttentionSpec,
             tiles: Tiles, interpret: bool):
    """Returns ``(dq, dk, dv)`` like ``(q, k, v)``; rows with lse = -inf get zero gradients."""
    if q.dtype == _WIDENED:
        grads = backward(
            *(x.astype(jnp.float32) for x in (q, k, v)), q_seg, kv_seg, alibi_slopes,
            out.astype(jnp.float32), lse, dout.astype(jnp.float32),
            spec=spec, tiles=tiles, interpret=interpret,
        )
        return tuple(g.astype(q.dtype) for g in grads)
    batch, lq, heads, head_dim = q.shape
    _, lk, kv_heads, _ = k.shape
    group = heads // kv_heads
    bq, bk = tiles.block_q_bwd, tiles.block_k_bwd
    lq_p, lk_p = _round_up(lq, bq), _round_up(lk, bk)
    nq, nk = lq_p // bq, lk_p // bk

    # delta_i = sum_d dout_id * out_id = sum_j p_ij dp_ij, the softmax-Jacobian correction.
    delta = jnp.einsum(
        "blhd,blhd->bhl", dout.astype(jnp.float32), out.astype(jnp.float32)
    )
    # lse = +inf for rows without visible keys and for padded rows makes p = exp(logit - lse) = 0.
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse.astype(jnp.float32))
    qt, kt, vt, dot = (
        _to_bhld(q, lq_p), _to_bhld(k, lk_p), _to_bhld(v, lk_p), _to_bhld(dout, lq_p)
    )
    slopes = None if not spec.has_alibi else alibi_slopes.astype(jnp.float32)
    itemsize = q.dtype.itemsize

    # dq: grid (b, h, q block, kv block).
    q_map, kv_map, extra_args, extra_specs = _q_major_maps(
        spec, bq, bk, nk, group, q_seg, kv_seg, slopes, lq_p, lk_p
    )
    dq = _pallas_call(
        functools.partial(
            _dq_kernel, spec=spec, bq=bq, bk=bk, nk=nk, kv_len=lk if lk_p != lk else None
        ),
        [qt, kt, vt, dot, _column(lse, lq_p, jnp.inf), _column(delta, lq_p, 0.0), *extra_args],
        name="flash_attention_dq_tpu",
        grid=(batch, heads, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), q_map),
            pl.BlockSpec((None, None, bk, head_dim), kv_map),
            pl.BlockSpec((None, None, bk, head_dim), kv_map),
            pl.BlockSpec((None, None, bq, head_dim), q_map),
            pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
            pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
            *extra_specs,
        ],
        out_specs=pl.BlockSpec((None, None, bq, head_dim), q_map),
        out_shape=jax.ShapeDtypeStruct((batch, heads, lq_p, head_dim), q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        flops=6 * batch * heads * lq_p * lk_p * head_dim,
        transcendentals=batch * heads * lq_p * lk_p,
        bytes_accessed=itemsize * batch * (3 * heads * lq_p + 2 * kv_heads * lk_p) * head_dim,
        interpret=interpret,
    )

    # dk, dv: grid (b, kv head, kv block, (q head in group, q block)).
    def q_map_t(b, g, j, t):
        lo, hi = _q_block_range(j, spec, bq, bk, nq)
        return b, g * group + t // nq, _clamp(t % nq, lo, hi, nq), 0

    def kv_map_t(b, g, j, t):
        return b, g, j, 0

    def row_map_t(b, g, j, t):  # lse / delta blocks: (b, h, q block, 0, 0)
        _, h, i, _ = q_map_t(b, g, j, t)
        return b, h, i, 0, 0

    args = [
        qt, kt, vt, dot, _row_blocks(lse, lq_p, bq, jnp.inf), _row_blocks(delta, lq_p, bq, 0.0)
    ]
    in_specs = [
        pl.BlockSpec((None, None, bq, head_dim), q_map_t),
        pl.BlockSpec((None, None, bk, head_dim), kv_map_t),
        pl.BlockSpec((None, None, bk, head_dim), kv_map_t),
        pl.BlockSpec((None, None, bq, head_dim), q_map_t),
        pl.BlockSpec((None, None, None, NUM_SUBLANES, bq), row_map_t),
        pl.BlockSpec((None, None, None, NUM_SUBLANES, bq), row_map_t),
    ]
    if spec.has_segment_ids:
        args += [_row_blocks(q_seg, lq_p, bq, -1), _column(kv_seg, lk_p, -1)]
        in_specs += [
            pl.BlockSpec(
                (None, None, NUM_SUBLANES, bq), lambda b, g, j, t: (b, q_map_t(b, g, j, t)[2], 0, 0)
            ),
            pl.BlockSpec((None, bk, NUM_LANES), lambda b, g, j, t: (b, j, 0)),
        ]
    if spec.has_alibi:
        args.append(slopes)
        in_specs.append(_smem_spec())
    dk, dv = _pallas_call(
        functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, nq=nq, group=group),
        args,
        name="flash_attention_dkv_tpu",
        grid=(batch, kv_heads, nk, group * nq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bk, head_dim), kv_map_t),
            pl.BlockSpec((None, None, bk, head_dim), kv_map_t),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, lk_p, head_dim), k.dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, lk_p, head_dim), v.dtype),
        ],
        scratch_shapes=[
            pltpu.VMEM((bk, head_dim), jnp.float32),
            pltpu.VMEM((bk, head_dim), jnp.float32),
        ],
        flops=8 * batch * heads * lq_p * lk_p * head_dim,
        transcendentals=batch * heads * lq_p * lk_p,
        bytes_accessed=itemsize * batch * (2 * heads * lq_p + 4 * kv_heads * lk_p) * head_dim,
        interpret=interpret,
    )
    return _from_bhld(dq, lq), _from_bhld(dk, lk), _from_bhld(dv, lk)
