"""Grouped matmul as Pallas GPU kernels, Triton lowering (megablox-like, no padding copies).

Forward (and, reading each group's rhs transposed, the lhs gradient): the rows are cut into
blocks of ``block_m``; a block that straddles group boundaries is visited once per group it
touches. ``work_items`` lists those (group, row block, row range) visits in JAX, a static
``cdiv(m, block_m) + groups`` of them (the surplus do nothing); a program owns one visit and one
``block_n`` column tile, multiplies the whole row block by its group's rhs (the dynamic group
index picks the tile) and stores only its group's rows, so two visits of one block never write
the same row. The rows past ``sum(group_sizes)`` form one more group whose visits store zeros
without a product: the output needs no zero fill.

The rhs gradient (``tgmm``): a program owns one (group, ``block_k`` x ``block_n`` tile of
``d_rhs[g]``) and loops over the row blocks of its group (dynamic trip count), masking the rows
of the neighbouring groups out of the first and last block.

Everything accumulates in float32; the products take the operands in their dtype (float32 runs
as tf32 on NVIDIA GPUs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import out_type

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """One kernel's launch shape: ``block_m`` rows, ``block_k`` contraction (``tgmm``: the
    ``block_k`` rows of its output tile), ``block_n`` columns (powers of 2 >= 16), warps per
    program and software-pipeline stages of the loop."""

    block_m: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The launch shapes of the forward, lhs-gradient and rhs-gradient kernels."""

    fwd: KernelTiles
    dlhs: KernelTiles
    drhs: KernelTiles


# Defaults by compute capability ("" is every GPU), shrunk to small shapes by default_tiles.
# Hopper: the best of scripts/bench_grouped_matmul.py --tiles on an H200 (BENCHMARKS.md, session
# 8: fwd+bwd 1.18x / 1.16x a dense matmul at the MoE layer's two shapes, 1.47x / 1.26x with the
# generic tiles); 256-column tiles need Hopper's 228 KiB of shared memory.
_GMM = KernelTiles(128, 64, 128, 8, 3)
_GMM_WIDE = KernelTiles(128, 64, 256, 8, 3)
DEFAULT_TILES = {
    "9.0": Tiles(fwd=_GMM_WIDE, dlhs=_GMM_WIDE, drhs=KernelTiles(64, 128, 256, 8, 3)),
    "": Tiles(fwd=_GMM, dlhs=_GMM, drhs=KernelTiles(64, 128, 128, 8, 3)),
}


def _pow2_at_least(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def default_tiles(call) -> Tiles:
    """The device default, each tile no larger than its dimension needs (a power of 2 >= 16)."""
    d = device_default(DEFAULT_TILES)
    fit = lambda t, m, k, n: dataclasses.replace(
        t, block_m=min(t.block_m, _pow2_at_least(m)), block_k=min(t.block_k, _pow2_at_least(k)),
        block_n=min(t.block_n, _pow2_at_least(n)))
    return Tiles(fit(d.fwd, call.m, call.k, call.n), fit(d.dlhs, call.m, call.n, call.k),
                 fit(d.drhs, call.m, call.k, call.n))


def supports(call, tiles: Tiles) -> str | None:
    """Why this lowering cannot run the call (None if it can): every shape is handled (edges are
    masked); Triton needs tiles that are powers of two >= 16 and a power of two of warps."""
    for kernel in ("fwd", "dlhs", "drhs"):
        t = getattr(tiles, kernel)
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(t, name)
            if value < 16 or value & (value - 1):
                return f"tiles.{kernel}.{name} ({value}) must be a power of two >= 16"
        if t.num_warps & (t.num_warps - 1):
            return f"tiles.{kernel}.num_warps ({t.num_warps}) must be a power of two"
    return None


def work_items(group_sizes, m: int, block_m: int):
    """``(group, row block, first row, end row)`` of every visit, four ``(W,)`` int32 arrays with
    ``W = cdiv(m, block_m) + groups`` (a static bound: each group adds at most one block visit
    beyond the ``cdiv(m, block_m)`` blocks). Group ``groups`` holds the rows past the sum; the
    surplus visits have an empty row range."""
    groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes), m)
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])  # + the rows past the sum
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first, last = starts // block_m, (ends - 1) // block_m
    visits = jnp.where(ends > starts, last - first + 1, 0)
    visits_end = jnp.cumsum(visits)
    i = jnp.arange(pl.cdiv(m, block_m) + groups, dtype=jnp.int32)
    # The number of groups whose visits end at or before i (not jnp.searchsorted: inside
    # shard_map it fails on a varying sorted array and an unvarying query in jax 0.11.2).
    passed = jnp.sum(i[:, None] >= visits_end[None, :], axis=1, dtype=jnp.int32)
    group = jnp.minimum(passed, groups)
    used = i < visits_end[-1]
    block = jnp.where(used, first[group] + i - (visits_end - visits)[group], 0)
    lo = jnp.where(used, jnp.maximum(starts[group], block * block_m), 0)
    hi = jnp.where(used, jnp.minimum(ends[group], block * block_m + block_m), 0)
    return group, block, lo, hi


def _dot(a, b, a_axis: int, b_axis: int):
    """``a`` and ``b`` contracted over the given axes on the matrix units, float32 result."""
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())),
                               preferred_element_type=f32)


def _in_range(start, size: int, dim: int):
    """``start + arange(size) < dim`` for a tile starting at a multiple of ``size``; None when
    ``dim`` is a multiple of ``size`` (every index in range: the loads need no mask there)."""
    if dim % size == 0:
        return None
    return start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0) < dim


def _mask(rows, cols, shape):
    """The ``shape`` mask of optional row and column masks (None: all true; both None: None)."""
    if rows is None and cols is None:
        return None
    if rows is None or cols is None:
        return jnp.broadcast_to(cols[None, :] if rows is None else rows[:, None], shape)
    return rows[:, None] & cols[None, :]


def _load(ref, mask):
    """``ref`` with zeros where ``mask`` is false (Triton takes a fill value only with a mask)."""
    return plgpu.load(ref, mask=mask, other=None if mask is None else 0.0)


def _gmm_kernel(group_ref, block_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, groups,
                t: KernelTiles, transpose_rhs: bool):
    """One (column tile, visit): ``out[rows of the visit] = lhs[row block] @ W[:, tile]`` with
    ``W = rhs[group]`` (``rhs[group]^T`` with ``transpose_rhs``)."""
    bm, bk, bn = t.block_m, t.block_k, t.block_n
    k_dim, n_dim = lhs_ref.shape[1], out_ref.shape[1]
    col0, item = pl.program_id(0) * bn, pl.program_id(1)
    group, row0 = group_ref[item], block_ref[item] * bm
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    row_ok = (rows >= lo_ref[item]) & (rows < hi_ref[item])
    col_ok = _in_range(col0, bn, n_dim)
    w_group = jnp.minimum(group, groups - 1)

    def step(kk, acc):
        k0 = kk * bk
        k_ok = _in_range(k0, bk, k_dim)
        x = _load(lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], _mask(row_ok, k_ok, (bm, bk)))
        if transpose_rhs:
            w = _load(rhs_ref.at[w_group, pl.ds(col0, bn), pl.ds(k0, bk)],
                      _mask(col_ok, k_ok, (bn, bk)))
            return acc + _dot(x, w, 1, 1)
        w = _load(rhs_ref.at[w_group, pl.ds(k0, bk), pl.ds(col0, bn)],
                  _mask(k_ok, col_ok, (bk, bn)))
        return acc + _dot(x, w, 1, 0)

    # The rows past the sum (group == groups) are stored as zeros without a product.
    # (int32 bounds: Triton's scf.for verifier rejects mixed types, and jnp.where(c, 1, 0) would
    # reach the lowering as a bool -> int32 convert, which it leaves an i1)
    n_steps = jax.lax.select(group < groups, jnp.int32(pl.cdiv(k_dim, bk)), jnp.int32(0))
    acc = jax.lax.fori_loop(jnp.int32(0), n_steps, step, jnp.zeros((bm, bn), f32))
    plgpu.store(out_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], acc.astype(out_ref.dtype),
                mask=_mask(row_ok, col_ok, (bm, bn)))


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, tiles: KernelTiles,
        interpret: bool):
    """``(m, n)``: each row times its group's ``rhs`` ``(groups, k, n)``, or with
    ``transpose_rhs`` its group's ``rhs^T`` for ``rhs`` ``(groups, n, k)``."""
    m = lhs.shape[0]
    groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    items = work_items(group_sizes, m, tiles.block_m)
    return pl.pallas_call(
        lambda *refs: _gmm_kernel(*refs, groups=groups, t=tiles, transpose_rhs=transpose_rhs),
        out_shape=out_type((m, n), out_dtype, lhs, rhs),
        grid=(pl.cdiv(n, tiles.block_n), items[0].shape[0]),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                             num_stages=tiles.num_stages),
        interpret=interpret,
        name="grouped_matmul_t" if transpose_rhs else "grouped_matmul",
    )(*items, lhs, rhs)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, t: KernelTiles):
    """One (column tile, row tile, group) of ``out[g] = lhs_g^T @ dout_g``, looping over the
    row blocks of the group."""
    bm, bk, bn = t.block_m, t.block_k, t.block_n
    k_dim, n_dim = lhs_ref.shape[1], dout_ref.shape[1]
    col0, k0, group = pl.program_id(0) * bn, pl.program_id(1) * bk, pl.program_id(2)
    start, end = start_ref[group], end_ref[group]
    k_ok, col_ok = _in_range(k0, bk, k_dim), _in_range(col0, bn, n_dim)
    first = start // bm

    def step(j, acc):
        row0 = (first + j) * bm
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        row_ok = (rows >= start) & (rows < end)
        x = _load(lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], _mask(row_ok, k_ok, (bm, bk)))
        dy = _load(dout_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], _mask(row_ok, col_ok, (bm, bn)))
        return acc + _dot(x, dy, 0, 0)

    n_steps = jnp.where(end > start, pl.cdiv(end, bm) - first, 0).astype(jnp.int32)
    acc = jax.lax.fori_loop(jnp.int32(0), n_steps, step, jnp.zeros((bk, bn), f32))
    plgpu.store(out_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], acc.astype(out_ref.dtype),
                mask=_mask(k_ok, col_ok, (bk, bn)))


def tgmm(lhs, dout, group_sizes, *, out_dtype, tiles: KernelTiles, interpret: bool):
    """``(groups, k, n)``: ``lhs_g^T @ dout_g`` over each group's rows (zeros for an empty one)."""
    m, k = lhs.shape
    n = dout.shape[1]
    groups = group_sizes.shape[0]
    end = jnp.minimum(jnp.cumsum(group_sizes), m).astype(jnp.int32)
    start = jnp.concatenate([jnp.zeros((1,), jnp.int32), end[:-1]])
    return pl.pallas_call(
        lambda *refs: _tgmm_kernel(*refs, t=tiles),
        out_shape=out_type((groups, k, n), out_dtype, lhs, dout),
        grid=(pl.cdiv(n, tiles.block_n), pl.cdiv(k, tiles.block_k), groups),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                             num_stages=tiles.num_stages),
        interpret=interpret,
        name="grouped_matmul_tgmm",
    )(start, end, lhs, dout)
