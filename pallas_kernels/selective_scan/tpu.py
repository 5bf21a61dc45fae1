"""Selective scan (Mamba-1) as Pallas TPU kernels (Mosaic-TPU lowering), forward and backward.

Grid ``(batch, channel block, chunk)``; the chunk axis is sequential ("arbitrary") and carries the
state in VMEM scratch, the other two are "parallel". The state tile is ``(d_state, block_d)``:
channels on the 128 lanes, state indices on sublanes, so the per-step inputs ``u, dt, z`` are
single sublane rows and ``C . h`` is a sublane reduction. ``B`` and ``C`` arrive transposed,
``(d_state, chunk)`` per block, and the column of step ``t`` is taken with a lane mask and a lane
reduction (two vregs for d_state 16): cheaper and more portable than a dynamic lane slice.

Forward: one float32 checkpoint of the state per chunk (``save_checkpoints``). Backward: the chunks
run in reverse; each first recomputes its ``chunk`` states into VMEM scratch from its checkpoint,
then runs the adjoint recurrence through them. ``dA, dD, ddt_bias`` and the initial-state
gradient accumulate in output blocks that stay resident across the chunk axis; ``dB, dC`` are
written per channel block and summed over a group's blocks outside (deterministic, no atomics).

Lengths that are not a multiple of the chunk are padded with ``u = 0`` and masked to ``dt = 0``
(decay 1, no input), so padded steps carry the state unchanged.

Packed-document resets arrive as float32 0/1, ``(1, chunk)`` per block with the steps on lanes
(taken per step like a column of ``B``), folded into the step's decay: ``exp(dt A) * (1 -
reset)`` is exactly zero at a reset, so the previous document's state does not enter the step and
the backward (the same decays) carries no adjoint across it.

Not yet run on TPU hardware (none was available): it is tested in interpret mode, and forward and
backward lower to Mosaic for a v5e target (checked on CPU under an abstract TPU mesh); the
defaults below are not tuned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _ssm_math
from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import Refs, operands, out_type
from pallas_kernels.selective_scan import common

f32 = jnp.float32
_LANES = 128


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_d`` channels per block (a multiple of 128 dividing ``d_inner // n_groups``, or all
    of ``d_inner``) and ``chunk`` steps per grid step (a multiple of 128, or the whole length;
    capped at the length)."""

    block_d: int
    chunk: int


# Defaults by device kind ("" is every TPU); untuned. The backward's recomputed states, (chunk,
# d_state, block_d) float32 scratch, take 4 MiB at these sizes and d_state 16, leaving room in the
# 16 MiB default scoped VMEM of v5e for the double-buffered (chunk, block_d) input and output
# blocks. block_d is a cap: the largest lane-aligned divisor of the group's channels under it,
# or all channels when a group is not lane-aligned.
DEFAULT_TILES = {"": Tiles(block_d=512, chunk=128)}


def default_tiles(call: common.Call) -> Tiles:
    default = device_default(DEFAULT_TILES)
    per_group = call.d_inner // call.n_groups
    if per_group % _LANES:
        block_d = call.d_inner
    else:
        lanes = common.largest_power_of_2_divisor(per_group // _LANES, default.block_d // _LANES)
        block_d = _LANES * lanes
    return Tiles(block_d, default.chunk)


def supports(call: common.Call, tiles: Tiles) -> str | None:
    """None when these kernels handle the call, else the reason (Mosaic's (8, 128) tiling)."""
    per_group = call.d_inner // call.n_groups
    if per_group % _LANES and call.n_groups > 1:
        return f"d_inner // n_groups must be a multiple of {_LANES} with groups, got {per_group}"
    if per_group % tiles.block_d:
        return f"tiles.block_d ({tiles.block_d}) must divide d_inner // n_groups ({per_group})"
    if tiles.block_d % _LANES and tiles.block_d != call.d_inner:
        return (f"tiles.block_d must be a multiple of {_LANES} or d_inner ({call.d_inner}), got "
                f"{tiles.block_d}")
    if tiles.chunk % _LANES and tiles.chunk < call.length:
        return (f"tiles.chunk must be a multiple of {_LANES} or >= length ({call.length}), got "
                f"{tiles.chunk}")
    return None


def config(call: common.Call, tiles: Tiles, dt_softplus: bool, interpret: bool):
    """The launch configuration of ``tiles`` fitted to the call."""
    chunk = min(tiles.chunk, call.length)
    return common.ScanConfig(
        implementation="tpu",
        dt_softplus=dt_softplus,
        block_d=tiles.block_d,
        chunk=chunk,
        forward_chunk=chunk,
        num_warps=None,
        interpret=interpret,
        fast_math=False,
    )


def _column(mat, lane, t):
    """Column ``t`` of a ``(d_state, chunk)`` value as ``(d_state, 1)``."""
    return jnp.sum(jnp.where(lane == t, mat, 0.0), axis=1, keepdims=True)


def _step_inputs(r, t, t0, length, lane, Bt, bias, softplus):
    """Row ``t`` of the chunk: ``u, dt_raw, dt, dt*u`` as ``(1, block_d)`` and ``B_t`` column."""
    u = r.u[pl.ds(t, 1), :].astype(f32)
    x = r.delta[pl.ds(t, 1), :].astype(f32)
    if bias is not None:
        x = x + bias
    dt = _ssm_math.softplus(x) if softplus else x
    dt = jnp.where(t0 + t < length, dt, 0.0)
    return u, x, dt, dt * u, _column(Bt, lane, t)


def _decay_fn(r, A):
    """``decay(t, dt)``: ``exp(dt * A)`` of the chunk's step ``t``, times ``1 - reset`` with
    resets (zero: a restart)."""
    if r.reset is None:
        return lambda t, dt: jnp.exp(dt * A)
    resets = r.reset[...]
    lane = lax.broadcasted_iota(jnp.int32, resets.shape, 1)
    return lambda t, dt: jnp.exp(dt * A) * (1.0 - _column(resets, lane, t))


def _fwd_kernel(*refs, length, chunk, n_chunks, softplus, flags):
    r = Refs(refs, flags)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        r.h[...] = jnp.zeros(r.h.shape, f32) if r.h0 is None else r.h0[...].astype(f32)

    if r.ckpt is not None:
        r.ckpt[...] = r.h[...]
    A = r.A[...]
    D = None if r.D is None else r.D[...]
    bias = None if r.bias is None else r.bias[...]
    Bt, Ct = r.B[...].astype(f32), r.C[...].astype(f32)
    lane = lax.broadcasted_iota(jnp.int32, Bt.shape, 1)
    decay_of = _decay_fn(r, A)

    def step(t, h):
        u, _, dt, dtu, b = _step_inputs(r, t, k * chunk, length, lane, Bt, bias, softplus)
        h = decay_of(t, dt) * h + dtu * b
        y = jnp.sum(h * _column(Ct, lane, t), axis=0, keepdims=True)
        if D is not None:
            y = y + D * u
        if r.z is not None:
            y = _ssm_math.gate_and_grad(y, r.z[pl.ds(t, 1), :].astype(f32))[0]
        r.y[pl.ds(t, 1), :] = y.astype(r.y.dtype)
        return h

    h = lax.fori_loop(0, chunk, step, r.h[...])
    r.h[...] = h

    @pl.when(k == n_chunks - 1)
    def _():
        r.h_final[...] = h


def _bwd_kernel(*refs, length, chunk, n_chunks, softplus, flags):
    r = Refs(refs, flags)
    k = pl.program_id(2)
    t0 = (n_chunks - 1 - k) * chunk

    @pl.when(k == 0)
    def _():
        r.g[...] = jnp.zeros(r.g.shape, f32) if r.dh_final is None else r.dh_final[...]
        r.dA[...] = jnp.zeros(r.dA.shape, f32)
        for acc in (r.dD, r.dbias):
            if acc is not None:
                acc[...] = jnp.zeros(acc.shape, f32)

    A = r.A[...]
    D = None if r.D is None else r.D[...]
    bias = None if r.bias is None else r.bias[...]
    Bt, Ct = r.B[...].astype(f32), r.C[...].astype(f32)
    lane = lax.broadcasted_iota(jnp.int32, Bt.shape, 1)
    inputs = functools.partial(
        _step_inputs, r, t0=t0, length=length, lane=lane, Bt=Bt, bias=bias, softplus=softplus
    )
    decay_of = _decay_fn(r, A)

    def recompute(t, h):
        r.hs[t] = h  # the state before step t
        _, _, dt, dtu, b = inputs(t)
        return decay_of(t, dt) * h + dtu * b

    lax.fori_loop(0, chunk, recompute, r.ckpt[...])

    def step(i, carry):
        g, dB, dC, dA, dD, dbias = carry
        t = chunk - 1 - i
        u, x, dt, dtu, b = inputs(t)
        c = _column(Ct, lane, t)
        h_prev = r.hs[t]
        decay = decay_of(t, dt)
        h = decay * h_prev + dtu * b
        dout = r.dout[pl.ds(t, 1), :].astype(f32)
        if r.z is not None:
            y = jnp.sum(h * c, axis=0, keepdims=True)
            if D is not None:
                y = y + D * u
            _, dy, dz = _ssm_math.gate_and_grad(y, r.z[pl.ds(t, 1), :].astype(f32))
            dy, dz = dout * dy, dout * dz
            r.dz[pl.ds(t, 1), :] = dz.astype(r.dz.dtype)
        else:
            dy = dout
        du = jnp.zeros_like(u)
        if D is not None:
            du = dy * D
            dD = dD + dy * u
        g = g + dy * c
        dC = jnp.where(lane == t, jnp.sum(dy * h, axis=1, keepdims=True), dC)
        dB = jnp.where(lane == t, jnp.sum(g * dtu, axis=1, keepdims=True), dB)
        g_dot_B = jnp.sum(g * b, axis=0, keepdims=True)
        g_h = g * h_prev * decay
        du = du + dt * g_dot_B
        ddt = u * g_dot_B + jnp.sum(g_h * A, axis=0, keepdims=True)
        dA = dA + g_h * dt
        if softplus:
            ddt = ddt * _ssm_math.sigmoid(x)
        ddt = jnp.where(t0 + t < length, ddt, 0.0)
        r.du[pl.ds(t, 1), :] = du.astype(r.du.dtype)
        r.ddelta[pl.ds(t, 1), :] = ddt.astype(r.ddelta.dtype)
        return g * decay, dB, dC, dA, dD, dbias + ddt

    zeros_bc = jnp.zeros(Bt.shape, f32)
    zeros_row = jnp.zeros((1, A.shape[1]), f32)
    carry = (r.g[...], zeros_bc, zeros_bc, jnp.zeros(A.shape, f32), zeros_row, zeros_row)
    g, dB, dC, dA, dD, dbias = lax.fori_loop(0, chunk, step, carry)
    r.g[...] = g
    r.dB[...] = dB
    r.dC[...] = dC
    r.dA[...] += dA
    if r.dD is not None:
        r.dD[...] += dD
    if r.dbias is not None:
        r.dbias[...] += dbias
    if r.dh0 is not None:

        @pl.when(k == n_chunks - 1)
        def _():
            r.dh0[...] = g


def _prepare(u, delta, A, B, C, D, z, dt_bias, h0, reset, extra, chunk):
    """Pads the length to a multiple of ``chunk`` and moves operands into the kernels' layouts."""
    length = u.shape[1]
    n_chunks = pl.cdiv(length, chunk)
    pad = n_chunks * chunk - length
    seq = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    # (batch, length, G, N) -> (batch, G, N, length): the step axis on lanes.
    grp = lambda x: jnp.pad(jnp.transpose(x, (0, 2, 3, 1)), ((0, 0),) * 3 + ((0, pad),))
    chan = lambda x: None if x is None else x.astype(f32)[None, :]
    state = lambda x: None if x is None else jnp.swapaxes(x.astype(f32), 1, 2)
    return dict(
        u=seq(u), delta=seq(delta), A=jnp.swapaxes(A.astype(f32), 0, 1), B=grp(B), C=grp(C),
        D=chan(D), z=seq(z), bias=chan(dt_bias), h0=state(h0),
        reset=None if reset is None else jnp.pad(reset, ((0, 0), (0, pad)))[:, None],
        **{name: seq(x) for name, x in extra.items()},
    ), n_chunks  # fmt: skip


def _specs(n_chunks, chunk, d_inner, d_state, n_groups, block_d, reverse):
    per_group = d_inner // n_groups // block_d
    c = (lambda k: n_chunks - 1 - k) if reverse else (lambda k: k)
    return dict(
        seq=pl.BlockSpec((None, chunk, block_d), lambda b, j, k: (b, c(k), j)),
        grp=pl.BlockSpec((None, None, d_state, chunk), lambda b, j, k: (b, j // per_group, 0, c(k))),
        chan=pl.BlockSpec((1, block_d), lambda b, j, k: (0, j)),
        chan_state=pl.BlockSpec((d_state, block_d), lambda b, j, k: (0, j)),
        state=pl.BlockSpec((None, d_state, block_d), lambda b, j, k: (b, 0, j)),
        row_chan=pl.BlockSpec((None, 1, block_d), lambda b, j, k: (b, 0, j)),
        ckpt=pl.BlockSpec((None, None, d_state, block_d), lambda b, j, k: (b, c(k), 0, j)),
        partial=pl.BlockSpec((None, None, d_state, chunk), lambda b, j, k: (b, j, 0, c(k))),
        reset=pl.BlockSpec((None, 1, chunk), lambda b, j, k: (b, 0, c(k))),
    )


def _call(kernel, name, grid, named_in, named_out, scratch, cfg, **static):
    """``pallas_call`` of ``kernel`` (static arguments bound) over ``[(name, array or None,
    spec)]`` inputs, ``[(name, shape or None, spec)]`` outputs and ``[(name, scratch shape)]``;
    returns a dict of the present outputs by name."""
    in_flags, args, in_specs = operands(named_in)
    out_flags, out_shapes, out_specs = operands(named_out)
    flags = in_flags + out_flags + tuple((n, True) for n, _ in scratch)
    outs = pl.pallas_call(
        functools.partial(kernel, softplus=cfg.dt_softplus, flags=flags, **static),
        out_shape=[out_type(s.shape, s.dtype, *args) for s in out_shapes],
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[shape for _, shape in scratch],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        # The TPU interpreter simulates VMEM and poisons uninitialised scratch, catching misuse.
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        name=name,
    )(*args)
    return dict(zip([n for n, s, _ in named_out if s is not None], outs))


_KINDS = dict(u="seq", delta="seq", A="chan_state", B="grp", C="grp", D="chan", z="seq",
              bias="chan", h0="state", dh_final="state", dout="seq", ckpt="ckpt",
              reset="reset")  # fmt: skip


def _inputs(arrays, names, spec):
    """``[(name, array or None, spec)]`` for ``names``, each with the BlockSpec of its kind."""
    return [(n, arrays.get(n), spec[_KINDS[n]]) for n in names]


def forward(u, delta, A, B, C, D, z, dt_bias, h0, reset, cfg: common.ScanConfig, *,
            save_checkpoints):
    """Returns ``(y, final_state, checkpoints or None)``; ``final_state`` float32."""
    batch, length, d_inner = u.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    arrays, n_chunks = _prepare(u, delta, A, B, C, D, z, dt_bias, h0, reset, {}, cfg.chunk)
    spec = _specs(n_chunks, cfg.chunk, d_inner, d_state, n_groups, cfg.block_d, reverse=False)
    ckpt = jax.ShapeDtypeStruct((batch, n_chunks, d_state, d_inner), f32)
    res = _call(
        _fwd_kernel, "selective_scan_fwd", (batch, d_inner // cfg.block_d, n_chunks),
        _inputs(arrays, ("u", "delta", "A", "B", "C", "D", "z", "bias", "h0", "reset"), spec),
        [("y", jax.ShapeDtypeStruct(arrays["u"].shape, u.dtype), spec["seq"]),
         ("h_final", jax.ShapeDtypeStruct((batch, d_state, d_inner), f32), spec["state"]),
         ("ckpt", ckpt if save_checkpoints else None, spec["ckpt"])],
        [("h", pltpu.VMEM((d_state, cfg.block_d), f32))],
        cfg, length=length, chunk=cfg.chunk, n_chunks=n_chunks,
    )  # fmt: skip
    h_final = jnp.swapaxes(res["h_final"], 1, 2)
    return res["y"][:, :length], h_final, res.get("ckpt")


def backward(dy, dh_final, u, delta, A, B, C, D, z, dt_bias, h0, reset, ckpt,
             cfg: common.ScanConfig):
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddt_bias, dh0, None)``, None for absent
    inputs (and for ``reset``)."""
    batch, length, d_inner = u.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    block_d, chunk = cfg.block_d, cfg.chunk
    n_blocks = d_inner // block_d
    arrays, n_chunks = _prepare(u, delta, A, B, C, D, z, dt_bias, None, reset, {"dout": dy},
                                chunk)
    arrays["ckpt"] = ckpt
    if dh_final is not None:
        arrays["dh_final"] = jnp.swapaxes(dh_final.astype(f32), 1, 2)
    spec = _specs(n_chunks, chunk, d_inner, d_state, n_groups, block_d, reverse=True)
    names = ("dout", "u", "delta", "A", "B", "C", "D", "z", "bias", "dh_final", "ckpt", "reset")
    padded = arrays["u"].shape
    partial = jax.ShapeDtypeStruct((batch, n_blocks, d_state, n_chunks * chunk), f32)
    per_state = jax.ShapeDtypeStruct((batch, d_state, d_inner), f32)
    per_chan = jax.ShapeDtypeStruct((batch, 1, d_inner), f32)
    if_given = lambda x, shape: None if x is None else shape
    outputs = [
        ("du", jax.ShapeDtypeStruct(padded, u.dtype), spec["seq"]),
        ("ddelta", jax.ShapeDtypeStruct(padded, delta.dtype), spec["seq"]),
        ("dz", None if z is None else jax.ShapeDtypeStruct(padded, z.dtype), spec["seq"]),
        ("dB", partial, spec["partial"]),
        ("dC", partial, spec["partial"]),
        ("dA", per_state, spec["state"]),
        ("dD", if_given(D, per_chan), spec["row_chan"]),
        ("dbias", if_given(dt_bias, per_chan), spec["row_chan"]),
        ("dh0", if_given(h0, per_state), spec["state"]),
    ]
    scratch = [("g", pltpu.VMEM((d_state, block_d), f32)),
               ("hs", pltpu.VMEM((chunk, d_state, block_d), f32))]  # fmt: skip
    res = _call(
        _bwd_kernel, "selective_scan_bwd", (batch, n_blocks, n_chunks),
        _inputs(arrays, names, spec), outputs, scratch, cfg,
        length=length, chunk=chunk, n_chunks=n_chunks,
    )  # fmt: skip

    def group_sum(part, like):
        # (batch, n_blocks, N, L) -> (batch, L, n_groups, N): sum a group's channel blocks.
        part = part[..., :length].reshape(batch, n_groups, n_blocks // n_groups, d_state, length)
        return jnp.transpose(part.sum(axis=2), (0, 3, 1, 2)).astype(like.dtype)

    def batch_sum(name, like):
        return None if like is None else res[name].sum(axis=0)[0].astype(like.dtype)

    return (
        res["du"][:, :length],
        res["ddelta"][:, :length],
        jnp.swapaxes(res["dA"].sum(axis=0), 0, 1).astype(A.dtype),
        group_sum(res["dB"], B),
        group_sum(res["dC"], C),
        batch_sum("dD", D),
        None if z is None else res["dz"][:, :length],
        batch_sum("dbias", dt_bias),
        None if h0 is None else jnp.swapaxes(res["dh0"], 1, 2).astype(h0.dtype),
        None,
    )
