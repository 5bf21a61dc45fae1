"""LayerNorm, RMSNorm and the gated RMSNorm as Pallas GPU kernels, Triton lowering.

One kernel pair serves the three: the normalised quantity is ``h = x`` or, gated,
``h = x * silu(z)``; LayerNorm subtracts its mean (``NormConfig.subtract_mean``) and may add a
bias. A program owns a block of rows of one group and keeps ``block_rows x next_pow2(group_size)``
values of each operand in registers (channels past ``group_size`` are masked), so each direction
reads its inputs once: the forward ``x`` (and ``z``), ``scale`` (and ``bias``) and writes the
output; the backward reads them and the output gradient, recomputes the statistics, and writes
``dx`` (and ``dz``) and one float32 partial of ``dscale`` (and ``dbias``) per program
(``bwd_rows`` rows), summed outside (deterministic, no atomics). XLA's form takes several passes
and, for the scale gradient, writes ``dout * x_hat`` in float32 before reducing it.
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
from pallas_kernels.layer_norm.common import Call, NormConfig

f32 = jnp.float32
# Values of one operand a program holds (block_rows x padded group): 4096 float32 over 256
# threads is 16 registers per operand. ptxas (sm_90, the gated norm at 1536 channels): the
# backward needs 128 registers (two programs per SM), the forward 40; at 8192 the backward
# needed 255.
_BLOCK_VALUES = 4096


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_rows`` rows held at once (a power of 2; 0: as many as fit ``_BLOCK_VALUES``),
    ``bwd_rows`` rows per backward program (a multiple of ``block_rows``; each program writes
    one ``dscale`` partial), the warps per program, and the software-pipeline depth of the
    backward's walk over its row blocks (> 1: the next blocks' loads are issued while a block's
    row reductions run)."""

    block_rows: int = 0
    bwd_rows: int = 64
    num_warps: int = 8
    bwd_stages: int = 1


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


def auto_declines(call: Call) -> str | None:
    """"auto" takes the LayerNorm kernels (the GPT train step on an H200, against XLA's fusions
    in the same run: 1.030x at 125M, 1.035x at 350M, 1.026x at 1.3B; BENCHMARKS.md, session 13)
    and leaves RMSNorm to XLA, whose fusions measured as fast at Mamba-2 130M's 8 x 2048 x 768
    (fwd+bwd 0.95x; session 12)."""
    if not call.subtract_mean:
        return "RMSNorm: measured no faster than XLA's fusions (BENCHMARKS.md)"
    return None


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
                      dtype, interpret, call.subtract_mean, tiles.bwd_stages)


def _masks(r0, BR, FP, rows, F):
    row = r0 + jax.lax.broadcasted_iota(jnp.int32, (BR, FP), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (BR, FP), 1)
    return (row < rows) & (col < F), jax.lax.broadcasted_iota(jnp.int32, (FP,), 0) < F


def _load(ref, r0, BR, FP, mask):
    return plgpu.load(ref.at[pl.ds(r0, BR), pl.ds(0, FP)], mask=mask, other=0.0).astype(f32)


def _channels(ref, cmask, FP):
    return plgpu.load(ref.at[pl.ds(0, FP)], mask=cmask, other=0.0).astype(f32)


def _present(refs, *present):
    """``refs`` with None inserted where an optional operand is absent."""
    it = iter(refs)
    return [next(it) if p else None for p in present]


def _normalise(x_ref, z_ref, r0, BR, FP, mask, F, eps, subtract_mean):
    """``x_hat`` (masked channels zero), the inverse deviation ``r`` per row, and the gate's
    factors ``dh/dx``, ``dh/dz`` (None ungated)."""
    h, dh_dx, dh_dz = _load(x_ref, r0, BR, FP, mask), None, None
    if z_ref is not None:
        h, dh_dx, dh_dz = _ssm_math.gate_and_grad(h, _load(z_ref, r0, BR, FP, mask))
    if subtract_mean:
        h = jnp.where(mask, h - (jnp.sum(h, axis=1) / F)[:, None], 0.0)
    r = jax.lax.rsqrt(jnp.sum(h * h, axis=1) / F + eps)
    return h * r[:, None], r, dh_dx, dh_dz


def _fwd_kernel(*refs, rows, F, BR, FP, eps, gated, biased, subtract_mean):
    x_ref, z_ref, s_ref, b_ref, o_ref = _present(refs, True, gated, True, biased, True)
    r0 = pl.program_id(0) * BR
    mask, cmask = _masks(r0, BR, FP, rows, F)
    x_hat, _, _, _ = _normalise(x_ref, z_ref, r0, BR, FP, mask, F, eps, subtract_mean)
    out = x_hat * _channels(s_ref, cmask, FP)[None, :]
    if b_ref is not None:
        out = out + _channels(b_ref, cmask, FP)[None, :]
    plgpu.store(o_ref.at[pl.ds(r0, BR), pl.ds(0, FP)], out.astype(o_ref.dtype), mask=mask)


def _bwd_kernel(*refs, rows, F, BR, FP, R, eps, gated, biased, subtract_mean):
    x_ref, z_ref, s_ref, do_ref, dx_ref, dz_ref, ds_ref, db_ref = _present(
        refs, True, gated, True, True, True, gated, True, biased)
    _, cmask = _masks(0, BR, FP, rows, F)
    s = _channels(s_ref, cmask, FP)
    first = pl.program_id(0) * R  # outside the loop: interpret mode has no program_id there

    def block(k, partials):
        r0 = first + k * BR
        mask, _ = _masks(r0, BR, FP, rows, F)
        x_hat, r, dh_dx, dh_dz = _normalise(x_ref, z_ref, r0, BR, FP, mask, F, eps,
                                            subtract_mean)
        do = _load(do_ref, r0, BR, FP, mask)
        g = do * s[None, :]
        # d/dh of x_hat: r * (g - x_hat * mean(g * x_hat) [- mean(g) when centred]).
        dh = g - x_hat * (jnp.sum(g * x_hat, axis=1) / F)[:, None]
        if subtract_mean:
            dh = dh - (jnp.sum(g, axis=1) / F)[:, None]
        dh = dh * r[:, None]
        at = lambda ref: ref.at[pl.ds(r0, BR), pl.ds(0, FP)]
        plgpu.store(at(dx_ref), (dh if dh_dx is None else dh * dh_dx).astype(dx_ref.dtype),
                    mask=mask)
        if dz_ref is not None:
            plgpu.store(at(dz_ref), (dh * dh_dz).astype(dz_ref.dtype), mask=mask)
        sums = (do * x_hat, do)[:len(partials)]
        return tuple(p + jnp.sum(v, axis=0) for p, v in zip(partials, sums))

    partials = (jnp.zeros((FP,), f32),) * (2 if biased else 1)
    partials = jax.lax.fori_loop(0, R // BR, block, partials)
    for ref, total in zip((ds_ref, db_ref), partials):
        plgpu.store(ref.at[pl.ds(0, FP)], total, mask=cmask)


def _specs(rows, F):
    """BlockSpecs over grid (row block, group) for ``(rows, groups, F)`` operands, the
    ``(groups, F)`` scale and bias, and ``(programs, groups, F)`` partials: whole columns of one
    group."""
    return (pl.BlockSpec((rows, None, F), lambda i, g: (0, g, 0)),
            pl.BlockSpec((None, F), lambda i, g: (g, 0)),
            pl.BlockSpec((None, None, F), lambda i, g: (i, g, 0)))


def _call(kernel, cfg, grid, operands, out_shapes, name, stages=1, **static):
    """``operands`` and ``out_shapes`` are ``(array or shape, spec)`` pairs; absent (None)
    operands are left out of the call; ``stages``: the pipeline depth of the kernel's loop."""
    operands = [(a, s) for a, s in operands if a is not None]
    args = [a for a, _ in operands]
    return pl.pallas_call(
        functools.partial(kernel, **static),
        out_shape=[out_type(s.shape, s.dtype, *args) for s, _ in out_shapes],
        grid=grid, in_specs=[s for _, s in operands], out_specs=[s for _, s in out_shapes],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=stages),
        interpret=cfg.interpret, name=name,
    )(*args)


def norm_forward(x, z, scale, bias, cfg: NormConfig, name: str):
    """``x`` (and the gate ``z``) ``(rows, groups, F)``, ``scale`` (and ``bias``) ``(groups, F)``
    -> the output ``(rows, groups, F)`` in ``cfg.dtype``."""
    rows, groups, F = x.shape
    rows_spec, group_spec, _ = _specs(rows, F)
    BR = cfg.block_rows
    (out,) = _call(
        _fwd_kernel, cfg, (pl.cdiv(rows, BR), groups),
        [(x, rows_spec), (z, rows_spec), (scale, group_spec), (bias, group_spec)],
        [(jax.ShapeDtypeStruct(x.shape, cfg.dtype), rows_spec)], name + "_fwd",
        rows=rows, F=F, BR=BR, FP=pl.next_power_of_2(F), eps=cfg.epsilon, gated=z is not None,
        biased=bias is not None, subtract_mean=cfg.subtract_mean)
    return out


def norm_backward(dout, x, z, scale, bias, cfg: NormConfig, name: str):
    """Gradients ``(dx, dz, dscale, dbias)`` shaped and typed like the arguments (None for an
    absent ``z`` or ``bias``)."""
    rows, groups, F = x.shape
    rows_spec, group_spec, part_spec = _specs(rows, F)
    programs = pl.cdiv(rows, cfg.bwd_rows)
    like = lambda a: None if a is None else (jax.ShapeDtypeStruct(a.shape, a.dtype), rows_spec)
    partial = (jax.ShapeDtypeStruct((programs, groups, F), f32), part_spec)
    outs = _call(
        _bwd_kernel, cfg, (programs, groups),
        [(x, rows_spec), (z, rows_spec), (scale, group_spec), (dout, rows_spec)],
        [o for o in (like(x), like(z), partial, partial if bias is not None else None) if o],
        name + "_bwd", stages=cfg.bwd_stages, rows=rows, F=F, BR=cfg.block_rows,
        FP=pl.next_power_of_2(F), R=cfg.bwd_rows, eps=cfg.epsilon, gated=z is not None,
        biased=bias is not None, subtract_mean=cfg.subtract_mean)
    dx, dz, ds, db = _present(outs, True, z is not None, True, bias is not None)
    total = lambda p, like: None if p is None else p.sum(0).astype(like.dtype)
    return dx, dz, total(ds, scale), total(db, bias)


def forward(x, scale, bias, cfg: NormConfig):
    """``layer_norm``'s forward: ``x (rows, 1, F)``, ``scale`` and ``bias`` ``(1, F)``."""
    return norm_forward(x, None, scale, bias, cfg, "layer_norm")


def backward(dout, x, scale, bias, cfg: NormConfig):
    dx, _, dscale, dbias = norm_backward(dout, x, None, scale, bias, cfg, "layer_norm")
    return dx, dscale, dbias
