"""Grouped matmul through JAX's own Hopper kernels (Pallas, Mosaic GPU lowering: TMA, wgmma).

- forward and ``d_lhs``: ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot``, a
  persistent kernel over (row block visit, column tile) like ``triton.work_items``; with
  ``transpose_rhs`` it reads each group's rhs ``(n, k)`` tile transposed, so ``d_lhs`` needs no
  copy of rhs.
- ``d_rhs``: ``transposed_ragged_dot_mgpu.transposed_ragged_dot``, one (group, output tile) per
  step, pipelining the group's row blocks and zeroing the neighbouring groups' rows.

Their constraints (checked by ``supports``): Hopper, bfloat16 or float16 operands with the
result in that dtype, ``m`` a multiple of 8, tiles multiples of 64 (one warpgroup of rows,
128-byte swizzled 16-bit columns), the contraction of each kernel a multiple of its ``block_k``
and its output columns of ``block_n`` (``d_rhs``: ``k`` a multiple of ``block_m`` too). They
have no interpret mode. The forward kernel leaves the rows past ``sum(group_sizes)`` unwritten,
so they are zeroed here; the rhs-gradient kernel masks other groups' rows by multiplying them by
zero, so its inputs must be finite on every row.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

from pallas_kernels._api import device_default

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """One kernel's launch shape (JAX's kernels' arguments): ``block_m`` rows, ``block_n``
    columns, ``block_k`` contraction per step, ``max_concurrent_steps`` pipeline stages, and
    ``grid_block_n`` column tiles per band of the persistent loop's snake order."""

    block_m: int
    block_n: int
    block_k: int
    max_concurrent_steps: int
    grid_block_n: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The launch shapes of the forward, lhs-gradient and rhs-gradient kernels."""

    fwd: KernelTiles
    dlhs: KernelTiles
    drhs: KernelTiles


# H200, MoE shapes (BENCHMARKS.md): two column tiles per band of the persistent loop beat one
# (fwd+bwd 1.13 vs 1.39 ms at n 2304); 256-column tiles are 2-3x slower.
_KT = KernelTiles(128, 128, 64, 4, 2)
DEFAULT_TILES = {"": Tiles(fwd=_KT, dlhs=_KT, drhs=_KT)}


def default_tiles(call) -> Tiles:
    return device_default(DEFAULT_TILES)


def supports(call, tiles: Tiles) -> str | None:
    """Why JAX's Hopper kernels cannot run the call (None if they can)."""
    if jnp.dtype(call.dtype) not in _DTYPES:
        return f"dtype must be bfloat16 or float16, got {jnp.dtype(call.dtype)}"
    if jnp.dtype(call.out_dtype) != jnp.dtype(call.dtype):
        return (f"the result is written in the operands' dtype {jnp.dtype(call.dtype)}, got "
                f"preferred_element_type={jnp.dtype(call.out_dtype)}")
    if call.m % 8:
        return f"m ({call.m}) must be a multiple of 8 (the TMA tiling of the rows)"
    # (kernel, its contraction, its output columns, and d_rhs's output rows)
    shapes = (("fwd", call.k, call.n, None), ("dlhs", call.n, call.k, None),
              ("drhs", None, call.n, call.k))
    for kernel, contraction, columns, rows in shapes:
        t = getattr(tiles, kernel)
        for name in ("block_m", "block_n", "block_k"):
            if getattr(t, name) % 64:
                return f"tiles.{kernel}.{name} ({getattr(t, name)}) must be a multiple of 64"
        if contraction is not None and contraction % t.block_k:
            return (f"the {kernel} kernel's contraction ({contraction}) must be a multiple of "
                    f"tiles.{kernel}.block_k ({t.block_k})")
        if columns % t.block_n:
            return (f"the {kernel} kernel's output columns ({columns}) must be a multiple of "
                    f"tiles.{kernel}.block_n ({t.block_n})")
        if rows is not None and rows % t.block_m:
            return (f"the {kernel} kernel's output rows (k = {rows}) must be a multiple of "
                    f"tiles.{kernel}.block_m ({t.block_m})")
    return None


def _kwargs(t: KernelTiles) -> dict:
    return dataclasses.asdict(t)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, tiles: KernelTiles,
        interpret: bool):
    """``ragged_dot_mgpu.ragged_dot``, with the rows past the sum zeroed."""
    del interpret  # compiled only (api rejects interpret=True)
    out = ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes,
                                     transpose_rhs=transpose_rhs, **_kwargs(tiles))
    rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)[:, None]
    return jnp.where(rows < jnp.sum(group_sizes), out, 0).astype(out_dtype)


def tgmm(lhs, dout, group_sizes, *, out_dtype, tiles: KernelTiles, interpret: bool):
    """``transposed_ragged_dot_mgpu.transposed_ragged_dot``: ``(groups, k, n)``."""
    del interpret
    out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs, dout, group_sizes=group_sizes, **_kwargs(tiles))
    return out.astype(out_dtype)
