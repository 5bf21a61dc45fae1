"""The gated RMSNorm as Pallas GPU kernels, Triton lowering.

A program owns a block of rows of one group and keeps ``block_rows x next_pow2(group_size)``
values of each operand in registers (channels past ``group_size`` are masked), so each direction
reads its inputs once: the forward ``y``, ``z``, ``scale`` and writes the output; the backward
reads ``y``, ``z``, ``scale`` and the output gradient, recomputes the statistics, and writes
``dy``, ``dz`` and one float32 partial of ``dscale`` per program (``bwd_rows`` rows), summed
outside (deterministic, no atomics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _ssm_math
from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import out_type
from pallas_kernels.gated_rms_norm.common import Call, NormConfig

f32 = jnp.float32
# Values of one operand a program holds (block_rows x padded group): 4096 float32 over 256
# threads is 16 registers per operand. ptxas (sm_90, 1536 channels): the backward needs 128
# registers (two programs per SM), the forward 40; at 8192 the backward needed 255.
_BLOCK_VALUES = 4096


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_rows`` rows held at once (a power of 2; 0: as many as fit ``_BLOCK_VALUES``),
    ``bwd_rows`` rows per backward program (a multiple of ``block_rows``; each program writes
    one ``dscale`` partial) and the warps per program."""

    block_rows: int = 0
    bwd_rows: int = 64
    num_warps: int = 8


DEFAULT_TILES = {"": Tiles()}


def _padded(call: Call) -> int:
    return pl.next_power_of_2(call.group_size)


def default_tiles(call: Call) -> Tiles:
    tiles = device_default(DEFAULT_TILES)
    if tiles.block_rows == 0:
        block = max(1, min(16, _BLOCK_VALUES // _padded(call)))
        tiles = dataclasses.replace(tiles, block_rows=block,
                                    bwd_rows=max(tiles.bwd_rows, block))
    return tiles


def supports(call: Call, tiles: Tiles) -> str | None:
    """Why this lowering cannot run the call (None if it can)."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0
    if not pow2(tiles.block_rows) or tiles.bwd_rows % tiles.block_rows:
        return (f"tiles.block_rows ({tiles.block_rows}) must be a power of two dividing "
                f"tiles.bwd_rows ({tiles.bwd_rows})")
    if _padded(call) * tiles.block_rows > 2 * _BLOCK_VALUES:
        return (f"a group of {call.group_size} channels (padded to {_padded(call)}) times "
                f"{tiles.block_rows} rows exceeds the {2 * _BLOCK_VALUES} values a program holds")
    return None


def config(call: Call, tiles: Tiles, epsilon: float, dtype, interpret: bool) -> NormConfig:
    return NormConfig("triton", tiles.block_rows, tiles.bwd_rows, tiles.num_warps, epsilon,
                      dtype, interpret)


def _masks(r0, BR, FP, rows, F):
    row = r0 + jax.lax.broadcasted_iota(jnp.int32, (BR, FP), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (BR, FP), 1)
    return (row < rows) & (col < F), jax.lax.broadcasted_iota(jnp.int32, (FP,), 0) < F


def _load(ref, r0, BR, FP, mask):
    return plgpu.load(ref.at[pl.ds(r0, BR), pl.ds(0, FP)], mask=mask, other=0.0).astype(f32)


def _normalise(y, z, F, eps):
    """``h = y * silu(z)``, its inverse RMS per row, and the gate's factors."""
    h, dh_dy, dh_dz = _ssm_math.gate_and_grad(y, z)
    r = jax.lax.rsqrt(jnp.sum(h * h, axis=1) / F + eps)
    return h, r, dh_dy, dh_dz


def _fwd_kernel(y_ref, z_ref, s_ref, o_ref, *, rows, F, BR, FP, eps):
    r0 = pl.program_id(0) * BR
    mask, cmask = _masks(r0, BR, FP, rows, F)
    s = plgpu.load(s_ref.at[pl.ds(0, FP)], mask=cmask, other=0.0).astype(f32)
    h, r, _, _ = _normalise(_load(y_ref, r0, BR, FP, mask), _load(z_ref, r0, BR, FP, mask), F,
                            eps)
    out = h * r[:, None] * s[None, :]
    plgpu.store(o_ref.at[pl.ds(r0, BR), pl.ds(0, FP)], out.astype(o_ref.dtype), mask=mask)


def _bwd_kernel(y_ref, z_ref, s_ref, do_ref, dy_ref, dz_ref, ds_ref, *, rows, F, BR, FP, R,
                eps):
    _, cmask = _masks(0, BR, FP, rows, F)
    s = plgpu.load(s_ref.at[pl.ds(0, FP)], mask=cmask, other=0.0).astype(f32)
    first = pl.program_id(0) * R  # outside the loop: interpret mode has no program_id there

    def block(k, ds):
        r0 = first + k * BR
        mask, _ = _masks(r0, BR, FP, rows, F)
        h, r, dh_dy, dh_dz = _normalise(_load(y_ref, r0, BR, FP, mask),
                                        _load(z_ref, r0, BR, FP, mask), F, eps)
        do = _load(do_ref, r0, BR, FP, mask)
        gs = do * s[None, :]
        # d/dh of h * r: r * gs - h * r^3 * mean(h * gs) (r depends on every h of the row).
        dh = r[:, None] * gs - h * (r * r * r * jnp.sum(h * gs, axis=1) / F)[:, None]
        at = lambda ref: ref.at[pl.ds(r0, BR), pl.ds(0, FP)]
        plgpu.store(at(dy_ref), (dh * dh_dy).astype(dy_ref.dtype), mask=mask)
        plgpu.store(at(dz_ref), (dh * dh_dz).astype(dz_ref.dtype), mask=mask)
        return ds + jnp.sum(do * h * r[:, None], axis=0)

    ds = jax.lax.fori_loop(0, R // BR, block, jnp.zeros((FP,), f32))
    plgpu.store(ds_ref.at[pl.ds(0, FP)], ds, mask=cmask)


def _specs(rows, F):
    """BlockSpecs over grid (row block, group) for ``(rows, groups, F)`` operands, the
    ``(groups, F)`` scale, and ``(programs, groups, F)`` partials: whole columns of one group."""
    return (pl.BlockSpec((rows, None, F), lambda i, g: (0, g, 0)),
            pl.BlockSpec((None, F), lambda i, g: (g, 0)),
            pl.BlockSpec((None, None, F), lambda i, g: (i, g, 0)))


def _call(kernel, cfg, grid, in_specs, out_shapes, out_specs, args, name, **static):
    return pl.pallas_call(
        functools.partial(kernel, **static),
        out_shape=[out_type(s.shape, s.dtype, *args) for s in out_shapes],
        grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=cfg.interpret, name=name,
    )(*args)


def forward(y, z, scale, cfg: NormConfig):
    """``y, z (rows, groups, F)``, ``scale (groups, F)`` -> output ``(rows, groups, F)``."""
    rows, groups, F = y.shape
    rows_spec, scale_spec, _ = _specs(rows, F)
    BR = cfg.block_rows
    (out,) = _call(
        _fwd_kernel, cfg, (pl.cdiv(rows, BR), groups), [rows_spec, rows_spec, scale_spec],
        [jax.ShapeDtypeStruct(y.shape, cfg.dtype)], [rows_spec], (y, z, scale),
        "gated_rms_norm_fwd", rows=rows, F=F, BR=BR, FP=pl.next_power_of_2(F), eps=cfg.epsilon)
    return out


def backward(dout, y, z, scale, cfg: NormConfig):
    """Gradients ``(dy, dz, dscale)`` shaped and typed like ``(y, z, scale)``."""
    rows, groups, F = y.shape
    rows_spec, scale_spec, part_spec = _specs(rows, F)
    programs = pl.cdiv(rows, cfg.bwd_rows)
    dy, dz, ds = _call(
        _bwd_kernel, cfg, (programs, groups), [rows_spec, rows_spec, scale_spec, rows_spec],
        [jax.ShapeDtypeStruct(y.shape, y.dtype), jax.ShapeDtypeStruct(z.shape, z.dtype),
         jax.ShapeDtypeStruct((programs, groups, F), f32)],
        [rows_spec, rows_spec, part_spec], (y, z, scale, dout), "gated_rms_norm_bwd",
        rows=rows, F=F, BR=cfg.block_rows, FP=pl.next_power_of_2(F), R=cfg.bwd_rows,
        eps=cfg.epsilon)
    return dy, dz, ds.sum(0).astype(scale.dtype)
