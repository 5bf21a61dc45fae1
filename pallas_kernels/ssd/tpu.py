"""Mamba-2 SSD as Pallas TPU kernels (Mosaic-TPU lowering).

Grid: (batch row, head, chunk), the chunk axis sequential ("arbitrary"): each grid step brings one
chunk of ``chunk_size`` steps into VMEM and the float32 state ``H (head_dim, d_state)`` lives in a
VMEM scratch between steps. Inside a step the chunk is worked in tiles of ``block_t`` steps with
the products of ``common.Chunk`` on the MXU.

The wrapper transposes to head-major layouts (``x (batch, heads, length, head_dim)``, ``B, C
(batch, n_groups, length, d_state)``) so every block's two minor dimensions are a full
``(steps, features)`` tile, and pads the length to a multiple of ``chunk_size`` (padded steps get
``dt = 0`` inside the kernel and carry the state unchanged).

The forward writes the state entering each chunk (float32, linear in length). The backward walks
the chunks in reverse (reversed index maps), recomputes the states entering the chunk's tiles
into a VMEM scratch, and carries the state gradient in another. dB/dC are written per head and
summed over each group outside; the per-head sums dA, dD, ddt_bias accumulate in an output block
that stays resident across the chunk axis. Packed-document resets come in as float32 0/1
``(batch, 1, length)`` (dt's layout with one head) and mask ``common.Chunk``'s decays.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _ssm_math
from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import Refs, operands, out_type
from pallas_kernels.ssd import common

f32 = jnp.float32
_LANES = 128


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_t`` steps per matrix-product tile (a multiple of 8 dividing ``chunk_size``); a
    program takes a whole head."""

    block_t: int


# Defaults by device kind ("" is every TPU), capped at chunk_size; untuned.
DEFAULT_TILES = {"": Tiles(block_t=128)}


def default_tiles(call: common.Call) -> Tiles:
    return Tiles(min(device_default(DEFAULT_TILES).block_t, call.chunk_size))


def supports(call: common.Call, tiles: Tiles) -> str | None:
    """Why this lowering cannot run the call (None if it can)."""
    if call.chunk_size % tiles.block_t:
        return f"tiles.block_t ({tiles.block_t}) must divide chunk_size ({call.chunk_size})"
    if tiles.block_t % 8:
        return f"tiles.block_t ({tiles.block_t}) must be a multiple of 8"
    return None


def config(call: common.Call, tiles: Tiles, dt_softplus: bool, interpret: bool):
    return common.SSDConfig(
        implementation="tpu", chunk_size=call.chunk_size, block_t=tiles.block_t,
        block_p=call.head_dim, dt_softplus=dt_softplus, num_warps=None, interpret=interpret,
    )


def _scalars(r):
    h = pl.program_id(1)
    A = r.A[h].astype(f32)
    D = None if r.D is None else r.D[h].astype(f32)
    bias = None if r.bias is None else r.bias[h].astype(f32)
    return A, D, bias


def _tile(r, chunk, t0, T, length, bias, softplus, dtype, *, with_C=True, with_dout=False):
    """Tile ``[t0, t0 + T)`` of the current chunk (grid step ``chunk``)."""
    t = chunk * r.x.shape[0] + t0 + jax.lax.broadcasted_iota(jnp.int32, (T,), 0)
    valid = t < length
    sl = pl.ds(t0, T)
    raw = r.dt[sl].astype(f32)
    if bias is not None:
        raw = raw + bias
    v = dict(valid=valid, raw=raw, x=r.x[sl, :].astype(dtype), B=r.B[sl, :].astype(dtype))
    v["dt"] = jnp.where(valid, _ssm_math.softplus(raw) if softplus else raw, 0.0)
    if with_C:
        v["C"] = r.C[sl, :].astype(dtype)
    if r.z is not None and with_C:
        v["z"] = r.z[sl, :]
    if with_dout:
        v["dout"] = r.dout[sl, :].astype(f32)
    v["reset"] = None if r.reset is None else r.reset[sl]
    return v


def _fwd_kernel(*refs, length, T, n_sub, softplus, dtype, flags):
    r = Refs(refs, flags)
    A, D, bias = _scalars(r)
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        r.H[...] = jnp.zeros(r.H.shape, f32) if r.h0 is None else r.h0[...].astype(f32)

    H = r.H[...]
    if r.ckpt is not None:
        r.ckpt[...] = H
    for j in range(n_sub):
        v = _tile(r, c, j * T, T, length, bias, softplus, dtype)
        ch = common.Chunk(v["x"], v["dt"], A, v["B"], v["C"], dtype, v["reset"])
        r.y[pl.ds(j * T, T), :] = common.chunk_output(ch, H, D, v.get("z")).astype(r.y.dtype)
        H = ch.next_state(H)
    r.H[...] = H
    r.h_final[...] = H  # resident across the chunk axis: the last step's value is written back


def _bwd_kernel(*refs, length, T, n_sub, n_chunks, softplus, dtype, flags):
    r = Refs(refs, flags)
    A, D, bias = _scalars(r)
    c = n_chunks - 1 - pl.program_id(2)

    @pl.when(pl.program_id(2) == 0)
    def _():
        r.dH[...] = jnp.zeros(r.dH.shape, f32) if r.dh_final is None else r.dh_final[...]
        r.sums[...] = jnp.zeros(r.sums.shape, f32)

    # States entering each tile of the chunk, recomputed from the chunk's saved state.
    H = r.ckpt[...]
    for j in range(n_sub):
        r.Hs[j] = H
        if j + 1 < n_sub:
            v = _tile(r, c, j * T, T, length, bias, softplus, dtype, with_C=False)
            H = common.next_state(v["x"], v["dt"], A, v["B"], H, dtype, v["reset"])

    dH = r.dH[...]
    dA = dD = dbias = jnp.zeros((), f32)
    for j in reversed(range(n_sub)):
        sl = pl.ds(j * T, T)
        v = _tile(r, c, j * T, T, length, bias, softplus, dtype, with_dout=True)
        ch = common.Chunk(v["x"], v["dt"], A, v["B"], v["C"], dtype, v["reset"])
        g = common.chunk_backward(ch, r.Hs[j], dH, v["dout"], A, D, v.get("z"))
        ddt = g["ddt"] * _ssm_math.sigmoid(v["raw"]) if softplus else g["ddt"]
        ddt = jnp.where(v["valid"], ddt, 0.0)
        r.dx[sl, :] = g["dx"].astype(r.dx.dtype)
        r.ddt[sl] = ddt
        r.dB[sl, :] = g["dB"]
        r.dC[sl, :] = g["dC"]
        if r.dz is not None:
            r.dz[sl, :] = g["dz"].astype(r.dz.dtype)
        dA, dbias = dA + g["dA"], dbias + jnp.sum(ddt)
        if D is not None:
            dD = dD + g["dD"]
        dH = g["dH"]
    r.dH[...] = dH
    lane = jax.lax.broadcasted_iota(jnp.int32, r.sums.shape, 1)
    r.sums[...] += jnp.where(lane == 0, dA, jnp.where(lane == 1, dD, jnp.where(lane == 2, dbias, 0.0)))
    if r.dh0 is not None:
        r.dh0[...] = dH


def _layout(x, dt, B, C, z, chunk_size, reset=None):
    """Head-major, length padded to a multiple of ``chunk_size``; ``reset`` as one head."""
    length = x.shape[1]
    pad = -length % chunk_size
    padl = lambda v: None if v is None else jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    hm = lambda v: None if v is None else jnp.moveaxis(padl(v), 2, 1)
    return hm(x), hm(dt), hm(B), hm(C), hm(z), hm(None if reset is None else reset[..., None])


def _specs(heads, n_groups, chunk_size, head_dim, d_state, reverse, n_chunks):
    rep = heads // n_groups
    cidx = (lambda c: n_chunks - 1 - c) if reverse else (lambda c: c)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    return dict(
        seq=pl.BlockSpec((None, None, chunk_size, head_dim), lambda i, j, c: (i, j, cidx(c), 0)),
        dt=pl.BlockSpec((None, None, chunk_size), lambda i, j, c: (i, j, cidx(c))),
        reset=pl.BlockSpec((None, None, chunk_size), lambda i, j, c: (i, 0, cidx(c))),
        grp=pl.BlockSpec((None, None, chunk_size, d_state), lambda i, j, c: (i, j // rep, cidx(c), 0)),
        head=smem,
        state=pl.BlockSpec((None, None, head_dim, d_state), lambda i, j, c: (i, j, 0, 0)),
        ckpt=pl.BlockSpec((None, None, None, head_dim, d_state), lambda i, j, c: (i, j, cidx(c), 0, 0)),
    )


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _call(kernel, name, grid, args, in_specs, out, scratch, interpret):
    """``pallas_call`` of ``kernel`` over ``args``; ``out`` is ``[(ShapeDtypeStruct, spec)]``."""
    return pl.pallas_call(
        kernel,
        out_shape=[out_type(s.shape, s.dtype, *args) for s, _ in out],
        grid=grid,
        in_specs=in_specs,
        out_specs=[spec for _, spec in out],
        scratch_shapes=scratch,
        compiler_params=_params(),
        interpret=interpret,
        name=name,
    )(*args)


def forward(x, dt, A, B, C, D, z, dt_bias, h0, reset, cfg: common.SSDConfig, *,
            save_checkpoints):
    """Returns ``(y, final_state, checkpoints or None)``; states float32."""
    batch, length, heads, head_dim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    Q, T = cfg.chunk_size, cfg.block_t
    n_chunks = pl.cdiv(length, Q)
    xh, dth, Bh, Ch, zh, rh = _layout(x, dt, B, C, z, Q, reset)
    sp = _specs(heads, n_groups, Q, head_dim, d_state, False, n_chunks)
    in_flags, args, in_specs = operands([
        ("A", A, sp["head"]), ("D", D, sp["head"]), ("bias", dt_bias, sp["head"]),
        ("x", xh, sp["seq"]), ("dt", dth, sp["dt"]), ("B", Bh, sp["grp"]), ("C", Ch, sp["grp"]),
        ("z", zh, sp["seq"]), ("h0", h0, sp["state"]), ("reset", rh, sp["reset"]),
    ])
    out = [
        (jax.ShapeDtypeStruct(xh.shape, x.dtype), sp["seq"]),
        (jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), f32), sp["state"]),
    ]
    if save_checkpoints:
        out.append((jax.ShapeDtypeStruct((batch, heads, n_chunks, head_dim, d_state), f32), sp["ckpt"]))
    kernel = functools.partial(
        _fwd_kernel, length=length, T=T, n_sub=Q // T, softplus=cfg.dt_softplus, dtype=x.dtype,
        flags=in_flags + (("y", True), ("h_final", True), ("ckpt", save_checkpoints), ("H", True)),
    )
    outs = _call(
        kernel, "ssd_fwd", (batch, heads, n_chunks), args, in_specs, out,
        [pltpu.VMEM((head_dim, d_state), f32)], cfg.interpret,
    )
    y = jnp.moveaxis(outs[0], 1, 2)[:, :length]
    return y, outs[1], (outs[2] if save_checkpoints else None)


def backward(dout, dh_final, x, dt, A, B, C, D, z, dt_bias, h0, reset, ckpt,
             cfg: common.SSDConfig):
    """Gradients ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0, None)``, None for absent inputs
    (none for ``reset``)."""
    batch, length, heads, head_dim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    Q, T = cfg.chunk_size, cfg.block_t
    n_chunks = ckpt.shape[2]
    xh, dth, Bh, Ch, zh, rh = _layout(x, dt, B, C, z, Q, reset)
    douth = _layout(dout, dt, B, C, None, Q)[0]
    Lp = xh.shape[2]
    sp = _specs(heads, n_groups, Q, head_dim, d_state, True, n_chunks)
    in_flags, args, in_specs = operands([
        ("A", A, sp["head"]), ("D", D, sp["head"]), ("bias", dt_bias, sp["head"]),
        ("x", xh, sp["seq"]), ("dt", dth, sp["dt"]), ("B", Bh, sp["grp"]), ("C", Ch, sp["grp"]),
        ("z", zh, sp["seq"]), ("dout", douth, sp["seq"]), ("dh_final", dh_final, sp["state"]),
        ("ckpt", ckpt, sp["ckpt"]), ("reset", rh, sp["reset"]),
    ])
    per_head = lambda n: pl.BlockSpec(
        (None, None, Q, n), lambda i, j, c: (i, j, n_chunks - 1 - c, 0)
    )
    out = [
        ("dx", True, jax.ShapeDtypeStruct(xh.shape, x.dtype), sp["seq"]),
        ("ddt", True, jax.ShapeDtypeStruct((batch, heads, Lp), f32), sp["dt"]),
        ("dB", True, jax.ShapeDtypeStruct((batch, heads, Lp, d_state), f32), per_head(d_state)),
        ("dC", True, jax.ShapeDtypeStruct((batch, heads, Lp, d_state), f32), per_head(d_state)),
        ("dz", z is not None, jax.ShapeDtypeStruct(xh.shape, getattr(z, "dtype", f32)), sp["seq"]),
        ("sums", True, jax.ShapeDtypeStruct((batch, heads, 8, _LANES), f32),
         pl.BlockSpec((None, None, 8, _LANES), lambda i, j, c: (i, j, 0, 0))),
        ("dh0", h0 is not None, jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), f32),
         sp["state"]),
    ]
    present = [(s, spec) for _, p, s, spec in out if p]
    kernel = functools.partial(
        _bwd_kernel, length=length, T=T, n_sub=Q // T, n_chunks=n_chunks,
        softplus=cfg.dt_softplus, dtype=x.dtype,
        flags=in_flags + tuple((name, p) for name, p, _, _ in out) + (("dH", True), ("Hs", True)),
    )
    outs = _call(
        kernel, "ssd_bwd", (batch, heads, n_chunks), args, in_specs, present,
        [pltpu.VMEM((head_dim, d_state), f32), pltpu.VMEM((Q // T, head_dim, d_state), f32)],
        cfg.interpret,
    )
    res = dict(zip([name for name, p, _, _ in out if p], outs))
    seq_major = lambda v: jnp.moveaxis(v, 1, 2)[:, :length]

    def group_sum(part):
        part = part.reshape(batch, n_groups, heads // n_groups, Lp, d_state).sum(2)
        return seq_major(part).astype(B.dtype)

    sums = res["sums"][:, :, 0, :3].sum(0)  # (heads, 3)
    return (
        seq_major(res["dx"]),
        jnp.moveaxis(res["ddt"], 1, 2)[:, :length].astype(dt.dtype),
        sums[:, 0].astype(A.dtype),
        group_sum(res["dB"]),
        group_sum(res["dC"]),
        None if D is None else sums[:, 1].astype(D.dtype),
        None if z is None else seq_major(res["dz"]),
        None if dt_bias is None else sums[:, 2].astype(dt_bias.dtype),
        None if h0 is None else res["dh0"].astype(h0.dtype),
        None,
    )
