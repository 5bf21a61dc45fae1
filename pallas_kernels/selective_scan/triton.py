"""Selective scan (Mamba-1) as Pallas GPU kernels, Triton lowering.

Grid: one program per (batch row, block of ``block_d`` channels). A program keeps its state tile
``h (block_d, d_state)`` in float32 registers and walks the sequence in chunks of ``chunk`` steps.
The chunk is unrolled at trace time, so the loads of all its steps are issued together before the
dependent arithmetic (the only loop-carried dependence is one multiply-add per state element),
which is what hides global-memory latency with only a handful of warps per SM.

Forward: softplus/bias on delta, the decay ``exp(dt * A)`` (``exp2`` with ``A`` pre-scaled by
log2(e)), the state update, ``C . h``, the ``D`` skip and the ``silu(z)`` gate are all fused; y is
written once. With ``save_checkpoints`` it also writes the state at the start of every chunk,
``(batch, n_chunks, d_inner, d_state)`` float32 (``4 * d_state / chunk`` bytes per (token,
channel)), never the ``(batch, length, d_inner, d_state)`` history.

Backward: the programs walk the chunks in reverse. For each chunk they reload its checkpoint,
recompute the ``chunk`` states in registers (unrolled, so each is a distinct value: no dynamic
indexing), then run the adjoint recurrence ``g_t = exp(dt_{t+1} A) g_{t+1} + dy_t C_t`` backwards
through them. Memory is linear in length. Per-channel gradients (du, ddelta, dz) are written
directly; per-program sums over time (dA, dD, ddt_bias) and the gradient of the initial state
are written per batch row and summed over batch outside.

Packed-document resets (float32 0/1 per (batch row, step)) are one scalar load per step, folded
into the step's decay: ``exp(dt A) * (1 - reset)`` is exactly zero at a reset, so the previous
document's state does not enter the step, and the backward (recomputing from the same
checkpoints with the same decays) carries no adjoint across it and gives the decay's gradient
nothing from the dropped state. Folding costs no extra state tile in registers.

dB and dC are sums over the channels of a group. Each program reduces over its own ``block_d``
channels and writes one float32 partial per (batch, channel block, step); the wrapper sums the
``d_inner / n_groups / block_d`` partials of a group. We chose partial sums over atomics because
the result is deterministic (bitwise reproducible gradients) and the partials cost
``8 * d_state / block_d`` bytes per (token, channel) written and read once, a fraction of the
14 bytes per (token, channel) the backward must move anyway (for d_state 16, block_d 64).
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
from pallas_kernels._pallas_util import Refs, operands, out_type
from pallas_kernels._triton_scan import linear_recurrence
from pallas_kernels.selective_scan import common

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_d`` channels per program (a power of 2 dividing ``d_inner // n_groups``); ``chunk``
    steps unrolled per loop iteration and per backward checkpoint; ``forward_chunk`` the same for
    a forward pass that saves no checkpoints (inference), where a longer chunk costs no backward
    registers. Chunks are capped at the length; the warps follow ``block_d`` and ``d_state``
    (about 8 state floats per thread). ``segments > 1`` splits the length into that many
    segments scanned in parallel (see ``forward``); 1 is the sequential scan. Untimed, so the
    default stays 1; the backward is still the sequential kernel (it reads the same checkpoints).
    ``forward_block_d`` is ``block_d`` for the forward that saves no checkpoints (None: the
    same), whose best tile differs from the training kernels'. ``parallel`` runs that forward
    ``forward_chunk`` steps at a time (not capped at the length) as one parallel scan over a
    ``(forward_chunk, forward_block_d, d_state)`` tile (``_fwd_parallel_kernel``). A parallel
    backward measured 2x slower than the sequential one (H200, BENCHMARKS.md, session 20) and
    was removed: a training pass runs the sequential kernels whatever this says."""

    block_d: int
    chunk: int
    forward_chunk: int
    segments: int = 1
    parallel: bool = False
    forward_block_d: int | None = None


# Defaults by compute capability ("" is every GPU). An H100 sweep at (8, 2048, 1536, 16) bf16
# (scripts/bench_scan.py --sweep; notes in BENCHMARKS.md): the backward, which holds a chunk of
# recomputed states in registers, spills at 16-step chunks (8.5 ms fwd+bwd vs 4.0 ms at 8); on an
# H200 (session 12) chunk 4 ran fwd+bwd in 3.57 ms against 3.97 at 8. Session 20, H200, fwd+bwd
# at block_d 8 against 32: 2.78 vs 3.57 ms at 8 x 2048, equal at 2 x 2048 and 1 x 8192 (where a
# rule narrowing the block for few rows already took 8). The forward without checkpoints as one
# parallel scan per 64 steps of 16 channels: 1.13 / 0.57 / 0.82 ms at 8 x 2048 / 2 x 2048 /
# 1 x 8192 against the previous sequential forward's 1.20 / 0.61 / 1.89 (Mamba-1 130M's step at
# 8 x 2048: 177,615 tok/s against 150,142). block_d and forward_block_d are caps: they shrink as
# d_state grows, so that the state tile stays at about 8 floats per thread, and to a divisor of
# the group's channels.
DEFAULT_TILES = {"": Tiles(block_d=8, chunk=4, forward_chunk=64, parallel=True,
                           forward_block_d=16)}
_STATE_ELEMS_PER_THREAD = 8
_MAX_D_STATE = 256
_MAX_CHUNK = 64  # the chunk is unrolled at trace time; longer chunks only cost compile time


def default_tiles(call: common.Call) -> Tiles:
    default = device_default(DEFAULT_TILES)
    d_state_p = common.next_power_of_2(call.d_state)
    cap = 32 * 8 * _STATE_ELEMS_PER_THREAD // d_state_p
    fit = lambda n: common.largest_power_of_2_divisor(  # noqa: E731
        call.d_inner // call.n_groups, max(1, min(n, cap)))
    return dataclasses.replace(default, block_d=fit(default.block_d),
                               forward_block_d=fit(default.forward_block_d or default.block_d))


def supports(call: common.Call, tiles: Tiles) -> str | None:
    """None when these kernels handle the call, else the reason."""
    per_group = call.d_inner // call.n_groups
    if call.d_state > _MAX_D_STATE:
        return (f"d_state must be <= {_MAX_D_STATE} (the state tile lives in registers), "
                f"got {call.d_state}")
    for name, n in (("block_d", tiles.block_d),
                    ("forward_block_d", tiles.forward_block_d or tiles.block_d)):
        if n & (n - 1):
            return f"tiles.{name} must be a power of 2, got {n}"
        if per_group % n:
            return f"tiles.{name} ({n}) must divide d_inner // n_groups ({per_group})"
    for name in ("chunk", "forward_chunk"):
        if getattr(tiles, name) > _MAX_CHUNK:
            return f"tiles.{name} must be <= {_MAX_CHUNK}, got {getattr(tiles, name)}"
    fc = tiles.forward_chunk
    if tiles.parallel and (tiles.segments != 1 or fc < 16 or fc & (fc - 1)):
        return (f"tiles.parallel needs segments == 1 and a forward_chunk that is a power of 2 "
                f">= 16 (Triton's scan over a tile), got segments {tiles.segments}, "
                f"forward_chunk {fc}")
    return None


def config(call: common.Call, tiles: Tiles, dt_softplus: bool, interpret: bool):
    """The launch configuration of ``tiles`` fitted to the call (sequential chunks capped at the
    length; a parallel forward chunk is one tile shape, its steps past the end masked)."""
    d_state_p = common.next_power_of_2(call.d_state)
    return common.ScanConfig(
        implementation="triton",
        dt_softplus=dt_softplus,
        block_d=tiles.block_d,
        forward_block_d=tiles.forward_block_d or tiles.block_d,
        chunk=min(tiles.chunk, call.length),
        forward_chunk=tiles.forward_chunk if tiles.parallel else min(tiles.forward_chunk,
                                                                      call.length),
        num_warps=_warps(tiles.block_d, d_state_p),
        interpret=interpret,
        fast_math=not interpret,
        segments=tiles.segments,
        parallel=tiles.parallel,
    )


def _warps(block_d: int, d_state_p: int) -> int:
    """Warps of a sequential kernel: about 8 state floats per thread, 1 to 8."""
    return max(1, min(8, block_d * d_state_p // (32 * _STATE_ELEMS_PER_THREAD)))


def _exp2(x, fast_math: bool):
    """``2**x``; on CUDA one ``ex2.approx.ftz`` (rel. error < 2**-22) instead of libdevice's."""
    if not fast_math:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
    )
    return y


def _row(ref, t, valid, size):
    """Row ``t`` of a ``(length, size)`` ref as float32, zeros past the end of the sequence."""
    mask = jnp.broadcast_to(valid, (size,))
    return plgpu.load(ref.at[t], mask=mask, other=0.0).astype(f32)


def _store_row(ref, t, valid, value):
    mask = jnp.broadcast_to(valid, value.shape)
    plgpu.store(ref.at[t], value.astype(ref.dtype), mask=mask)


def _load_chunk(r, t0, length, chunk, block_d, d_state, bias, softplus, with_dout):
    """Issue the loads of ``chunk`` steps; returns per-step dicts of float32 values."""
    steps = []
    for i in range(chunk):
        t = t0 + i
        valid = t < length
        s = dict(t=t, valid=valid)
        s["u"] = _row(r.u, t, valid, block_d)
        s["delta"] = _row(r.delta, t, valid, block_d)
        s["B"] = _row(r.B, t, valid, d_state)
        s["C"] = _row(r.C, t, valid, d_state)
        if r.z is not None:
            s["z"] = _row(r.z, t, valid, block_d)
        if with_dout:
            s["dout"] = _row(r.dout, t, valid, block_d)
        if r.reset is not None:
            s["keep"] = 1.0 - plgpu.load(r.reset.at[t], mask=valid, other=0.0)
        steps.append(s)
    for s in steps:
        x = s["delta"] if bias is None else s["delta"] + bias
        s["dt_raw"] = x
        # Steps past the end get dt = 0: decay 1 and no input, so the state is carried unchanged.
        s["dt"] = jnp.where(s["valid"], _ssm_math.softplus(x) if softplus else x, 0.0)
        s["dtu"] = s["dt"] * s["u"]
    return steps


def _decay(s, A2, fast_math):
    """The step's ``exp(dt * A)`` tile, times ``1 - reset`` with resets (zero: a restart)."""
    decay = _exp2(s["dt"][:, None] * A2, fast_math)
    return decay * s["keep"] if "keep" in s else decay


def _fwd_kernel(*refs, length, chunk, n_chunks, softplus, fast_math, flags):
    """One program scans ``n_chunks`` chunks of its segment (``program_id(2)``) from ``h0``.

    Without ``y`` it is the first pass of the segmented scan: it only writes the segment's end
    state and ``dt_sum``, the sum of its step sizes (its total decay is ``exp(A * dt_sum)``).
    """
    r = Refs(refs, flags)
    block_d, d_state = r.A.shape
    first = pl.program_id(2) * n_chunks  # the segment's first chunk
    A2 = r.A[...].astype(f32) * common.LOG2E
    D = None if r.D is None else r.D[...].astype(f32)
    bias = None if r.bias is None else r.bias[...].astype(f32)
    h = jnp.zeros((block_d, d_state), f32) if r.h0 is None else r.h0[...].astype(f32)
    dt_sum = None if r.dt_sum is None else jnp.zeros((block_d,), f32)

    def chunk_body(c, carry):
        h, dt_sum = carry
        if r.ckpt is not None:
            r.ckpt[first + c] = h
        t0 = (first + c) * chunk
        steps = _load_chunk(r, t0, length, chunk, block_d, d_state, bias, softplus, False)
        for s in steps:
            decay = _decay(s, A2, fast_math)
            h = decay * h + s["dtu"][:, None] * s["B"][None, :]
            if dt_sum is not None:
                dt_sum = dt_sum + s["dt"]
            if r.y is None:
                continue
            y = jnp.sum(h * s["C"][None, :], axis=1)
            if D is not None:
                y = y + D * s["u"]
            if r.z is not None:
                y = _ssm_math.gate_and_grad(y, s["z"])[0]
            _store_row(r.y, s["t"], s["valid"], y)
        return h, dt_sum

    h, dt_sum = jax.lax.fori_loop(0, n_chunks, chunk_body, (h, dt_sum))
    if r.h_final is not None:
        r.h_final[...] = h
    if r.dt_sum is not None:
        r.dt_sum[...] = dt_sum


class _ChunkTile:
    """Masked loads and stores of one chunk's rows ``t`` (a step vector) of ``(length, columns)``
    refs, as float32 ``(chunk, columns)`` tiles, zero past the end of the sequence."""

    def __init__(self, r, t, length):
        self.r, self.t, self.length = r, t, length
        self.valid = t < length
        self.at = jnp.minimum(t, length - 1)  # loads clamped: interpret mode reads in range

    def load(self, ref, cols):
        return plgpu.load(ref.at[self.at[:, None], cols[None, :]], mask=self.valid[:, None],
                          other=0.0).astype(f32)

    def store(self, ref, cols, value):
        # Unclamped: a clamped duplicate row, masked off, would still be written in interpret mode.
        plgpu.store(ref.at[self.t[:, None], cols[None, :]], value.astype(ref.dtype),
                    mask=self.valid[:, None])

    def decays(self, bias, A2, softplus, fast_math):
        """``(dt, exp(dt A) * (1 - reset))`` of the chunk's steps; steps past the end get dt = 0:
        decay 1 and no input, so the state is carried unchanged."""
        x = self.load(self.r.delta, jax.lax.iota(jnp.int32, A2.shape[0]))
        x = x if bias is None else x + bias
        dt = jnp.where(self.valid[:, None], _ssm_math.softplus(x) if softplus else x, 0.0)
        decay = _exp2(dt[:, :, None] * A2[None], fast_math)
        if self.r.reset is not None:
            keep = 1.0 - plgpu.load(self.r.reset.at[self.at], mask=self.valid,
                                    other=0.0).astype(f32)
            decay = decay * keep[:, None, None]
        return dt, decay


def _fwd_parallel_kernel(*refs, length, chunk, n_chunks, softplus, fast_math, flags):
    """The forward ``chunk`` steps at a time as one ``(chunk, block_d, d_state)`` tile: every
    step's decay and input at once, ``linear_recurrence`` along the steps (one parallel scan
    instead of ``chunk`` dependent updates), the carried-in state added through the cumulative
    decay, and the chunk's y in one store. The next chunk's carry is the last state, taken by a
    masked sum (a register tile has no row index). It saves no checkpoints (inference only)."""
    r = Refs(refs, flags)
    block_d, d_state = r.A.shape
    A2 = r.A[...].astype(f32) * common.LOG2E
    D = None if r.D is None else r.D[...].astype(f32)[None, :]
    bias = None if r.bias is None else r.bias[...].astype(f32)[None, :]
    h = jnp.zeros((block_d, d_state), f32) if r.h0 is None else r.h0[...].astype(f32)
    steps = jax.lax.iota(jnp.int32, chunk)
    chan, lanes = jax.lax.iota(jnp.int32, block_d), jax.lax.iota(jnp.int32, d_state)

    def chunk_body(c, h):
        tile = _ChunkTile(r, c * chunk + steps, length)
        u = tile.load(r.u, chan)
        dt, decay = tile.decays(bias, A2, softplus, fast_math)
        inputs = (dt * u)[:, :, None] * tile.load(r.B, lanes)[:, None, :]
        carried, states = linear_recurrence(decay, inputs, axis=0)
        states = states + carried * h[None]
        y = jnp.sum(states * tile.load(r.C, lanes)[:, None, :], axis=2)
        if D is not None:
            y = y + D * u
        if r.z is not None:
            y = _ssm_math.gate_and_grad(y, tile.load(r.z, chan))[0]
        tile.store(r.y, chan, y)
        return jnp.sum(jnp.where((steps == chunk - 1)[:, None, None], states, 0.0), axis=0)

    h = jax.lax.fori_loop(0, n_chunks, chunk_body, h)
    if r.h_final is not None:
        r.h_final[...] = h


def _bwd_kernel(*refs, length, chunk, n_chunks, softplus, fast_math, flags):
    r = Refs(refs, flags)
    block_d, d_state = r.A.shape
    A = r.A[...].astype(f32)
    A2 = A * common.LOG2E
    D = None if r.D is None else r.D[...].astype(f32)
    bias = None if r.bias is None else r.bias[...].astype(f32)

    def chunk_body(k, carry):
        g, dA_acc, dD_acc, dbias_acc = carry
        c = n_chunks - 1 - k
        steps = _load_chunk(r, c * chunk, length, chunk, block_d, d_state, bias, softplus, True)
        # Recompute the chunk's states from its checkpoint; states[i] is the state before step i.
        states = [r.ckpt[c]]
        decays = []
        for s in steps:
            decays.append(_decay(s, A2, fast_math))
            states.append(decays[-1] * states[-1] + s["dtu"][:, None] * s["B"][None, :])
        for i in reversed(range(chunk)):
            s, h_prev, h, decay = steps[i], states[i], states[i + 1], decays[i]
            u, dout = s["u"], s["dout"]
            if r.z is not None:
                y = jnp.sum(h * s["C"][None, :], axis=1)
                if D is not None:
                    y = y + D * u
                _, dy, dz = _ssm_math.gate_and_grad(y, s["z"])
                dy, dz = dout * dy, dout * dz
                _store_row(r.dz, s["t"], s["valid"], dz)
            else:
                dy = dout
            du = 0.0  # the D skip's term, then the state's
            if D is not None:
                du = dy * D
                dD_acc = dD_acc + dy * u
            g = g + dy[:, None] * s["C"][None, :]
            _store_row(r.dC, s["t"], s["valid"], jnp.sum(dy[:, None] * h, axis=0))
            _store_row(r.dB, s["t"], s["valid"], jnp.sum(g * s["dtu"][:, None], axis=0))
            g_dot_B = jnp.sum(g * s["B"][None, :], axis=1)
            g_h = g * h_prev * decay
            du = du + s["dt"] * g_dot_B
            ddt = u * g_dot_B + jnp.sum(g_h * A, axis=1)
            dA_acc = dA_acc + g_h * s["dt"][:, None]
            if softplus:
                ddt = ddt * _ssm_math.sigmoid(s["dt_raw"])
            ddt = jnp.where(s["valid"], ddt, 0.0)
            dbias_acc = dbias_acc + ddt
            _store_row(r.du, s["t"], s["valid"], du)
            _store_row(r.ddelta, s["t"], s["valid"], ddt)
            g = g * decay
        return g, dA_acc, dD_acc, dbias_acc

    zeros_v = jnp.zeros((block_d,), f32)
    zeros_s = jnp.zeros((block_d, d_state), f32)
    g = zeros_s if r.dh_final is None else r.dh_final[...].astype(f32)
    g, dA_acc, dD_acc, dbias_acc = jax.lax.fori_loop(
        0, n_chunks, chunk_body, (g, zeros_s, zeros_v, zeros_v)
    )
    r.dA[...] = dA_acc
    if r.dD is not None:
        r.dD[...] = dD_acc
    if r.dbias is not None:
        r.dbias[...] = dbias_acc
    if r.dh0 is not None:
        r.dh0[...] = g  # the adjoint left at step 0


def _specs(batch, length, d_inner, d_state, n_groups, block_d):
    """BlockSpecs of the operands for grid (batch, channel block[, segment]); a segment's
    program sees the whole length and touches only its own steps."""
    per_group = d_inner // n_groups // block_d
    seq = pl.BlockSpec((None, length, block_d), lambda i, j, *_: (i, 0, j))
    row = pl.BlockSpec((None, length), lambda i, j, *_: (i, 0))
    grp = pl.BlockSpec((None, length, None, d_state), lambda i, j, *_: (i, 0, j // per_group, 0))
    chan = pl.BlockSpec((block_d,), lambda i, j, *_: (j,))
    chan_state = pl.BlockSpec((block_d, d_state), lambda i, j, *_: (j, 0))
    state = pl.BlockSpec((None, block_d, d_state), lambda i, j, *_: (i, j, 0))
    row_chan = pl.BlockSpec((None, block_d), lambda i, j, *_: (i, j))
    return seq, grp, chan, chan_state, state, row_chan, row


def _pad_state(x, d_state_p, axis=-1):
    """Pad the d_state axis to a power of two with zeros (padded lanes stay exactly zero)."""
    if x is None or x.shape[axis] == d_state_p:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, d_state_p - x.shape[axis])
    return jnp.pad(x, pad)


def _parallel_cfg(cfg: common.ScanConfig, chunk: int, d_state_p: int) -> common.ScanConfig:
    """``cfg`` with the warps of the parallel forward: about 16 floats of each ``(chunk, block_d,
    d_state)`` tile per thread (at most 8 warps); ptxas (sm_90, triton 3.6, 8 x 2048 x 1536 x 16
    with every feature, scripts/kernel_resources.py): 240 registers at the default 16 x 64, 153
    at 16 x 32, 171 at 8 x 64, no spill."""
    warps = chunk * cfg.block_d * d_state_p // (32 * 16)
    return dataclasses.replace(cfg, num_warps=max(1, min(8, warps)))


def _compiler_params(cfg: common.ScanConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _launch(kernel, name, named_in, named_out, cfg, *, grid, **static):
    """``pallas_call`` of ``kernel`` (static arguments bound) over ``[(name, array or None,
    spec)]`` inputs and ``[(name, shape or None, spec)]`` outputs; a dict of the present outputs."""
    in_flags, args, in_specs = operands(named_in)
    out_flags, out_shapes, out_specs = operands(named_out)
    kernel = functools.partial(
        kernel, softplus=cfg.dt_softplus, fast_math=cfg.fast_math, flags=in_flags + out_flags,
        **static,
    )  # fmt: skip
    outs = pl.pallas_call(
        kernel,
        out_shape=[out_type(s.shape, s.dtype, *args) for s in out_shapes],
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name=name,
    )(*args)
    return dict(zip([n for n, s, _ in named_out if s is not None], outs))


def forward(u, delta, A, B, C, D, z, dt_bias, h0, reset, cfg: common.ScanConfig, *,
            save_checkpoints):
    """Returns ``(y, final_state, checkpoints or None)``; ``final_state`` float32.

    With ``cfg.segments = S > 1`` the length is cut into S segments of whole chunks and the scan
    runs in three passes, S times more programs each walking 1/S of the steps: (1) every
    (segment, channel block) scans from a zero state, writing its end state and ``dt_sum``;
    (2) ``enter_states``, a sequential pass over the S segments in plain JAX, gives the true
    state entering each segment (the recurrence is linear: ``h_out = exp(A dt_sum) h_in +
    h_local``); (3) every segment rescans from its entering state, writing y and the
    checkpoints. Pass 3 rescans rather than adding ``C_t exp(A cumsum dt) h_in`` to y because
    the gate and the checkpoints need the true states anyway. A segment holding a reset does not
    carry its entering state through (pass 1 already restarted at its resets).
    """
    batch, length, d_inner = u.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    d_state_p = common.next_power_of_2(d_state)
    A, B, C, h0 = (_pad_state(x, d_state_p) for x in (A, B, C, h0))
    if not save_checkpoints:
        cfg = dataclasses.replace(cfg, block_d=cfg.forward_block_d,
                                  num_warps=_warps(cfg.forward_block_d, d_state_p))
    block_d, n_seg = cfg.block_d, cfg.segments
    chunk = cfg.chunk if save_checkpoints else cfg.forward_chunk
    n_blocks = d_inner // block_d
    seg_chunks = pl.cdiv(pl.cdiv(length, n_seg), chunk)  # chunks per segment
    n_chunks = n_seg * seg_chunks  # chunks past the end carry the state unchanged
    seq, grp, chan, chan_state, _, _, row = _specs(
        batch, length, d_inner, d_state_p, n_groups, block_d)
    seg_state = pl.BlockSpec((None, None, block_d, d_state_p), lambda i, j, k: (i, k, j, 0))
    per_seg_state = jax.ShapeDtypeStruct((batch, n_seg, d_inner, d_state_p), f32)
    ins = [("u", u, seq), ("delta", delta, seq), ("A", A, chan_state), ("B", B, grp),
           ("C", C, grp), ("D", D, chan), ("z", z, seq), ("bias", dt_bias, chan),
           ("reset", reset, row)]
    launch = functools.partial(
        _launch, _fwd_kernel, cfg=cfg, grid=(batch, n_blocks, n_seg), length=length, chunk=chunk,
        n_chunks=seg_chunks,
    )  # fmt: skip
    h_final = None
    if n_seg > 1:
        local = launch(
            "selective_scan_fwd_segments", ins + [("h0", None, seg_state)],
            [("y", None, seq), ("h_final", per_seg_state, seg_state),
             ("dt_sum", jax.ShapeDtypeStruct((batch, n_seg, d_inner), f32),
              pl.BlockSpec((None, None, block_d), lambda i, j, k: (i, k, j))),
             ("ckpt", None, None)],
        )  # fmt: skip
        kept = None
        if reset is not None:  # 1.0 for a segment without resets (steps past the end have none)
            padded = jnp.pad(reset, ((0, 0), (0, n_chunks * chunk - length)))
            kept = 1.0 - padded.reshape(batch, n_seg, -1).max(axis=-1)
        h0, h_final = enter_states(local["h_final"], local["dt_sum"], A, h0, kept)
    elif h0 is not None:
        h0 = h0[:, None]
    ckpt = jax.ShapeDtypeStruct((batch, n_chunks, d_inner, d_state_p), f32)
    parallel = cfg.parallel and not save_checkpoints
    if parallel:
        launch = functools.partial(
            _launch, _fwd_parallel_kernel, cfg=_parallel_cfg(cfg, chunk, d_state_p),
            grid=(batch, n_blocks, 1), length=length, chunk=chunk, n_chunks=n_chunks)
    res = launch(
        "selective_scan_fwd_parallel" if parallel else "selective_scan_fwd",
        ins + [("h0", h0, seg_state)],
        [("y", jax.ShapeDtypeStruct((batch, length, d_inner), u.dtype), seq),
         ("h_final", per_seg_state if n_seg == 1 else None, seg_state),
         ("dt_sum", None, None),
         ("ckpt", ckpt if save_checkpoints else None,
          pl.BlockSpec((None, n_chunks, block_d, d_state_p), lambda i, j, k: (i, 0, j, 0)))],
    )  # fmt: skip
    if h_final is None:
        h_final = res["h_final"][:, 0]
    return res["y"], h_final[..., :d_state], res.get("ckpt")


def enter_states(h_local, dt_sum, A, h0, kept=None):
    """The boundary pass: ``(entering states (batch, S, d_inner, N), final state)`` from each
    segment's end state scanned from zero, ``h_local (batch, S, d_inner, N)``, its summed step
    sizes ``dt_sum (batch, S, d_inner)`` and the initial state (None: zeros); ``kept (batch, S)``
    is 0.0 for a segment holding a reset (its entering state does not reach its end), else 1.0
    (None: all 1.0)."""
    decay = jnp.exp(dt_sum[..., None] * A.astype(f32))
    if kept is not None:
        decay = decay * kept[:, :, None, None]
    h = jnp.zeros_like(h_local[:, 0]) if h0 is None else h0.astype(f32)

    def body(h, seg):
        local, dec = seg
        return dec * h + local, h

    xs = (jnp.moveaxis(h_local, 1, 0), jnp.moveaxis(decay, 1, 0))
    h_final, h_enter = jax.lax.scan(body, h, xs)
    return jnp.moveaxis(h_enter, 0, 1), h_final


def backward(dy, dh_final, u, delta, A, B, C, D, z, dt_bias, h0, reset, ckpt,
             cfg: common.ScanConfig):
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddt_bias, dh0, None)``, None for absent
    inputs (and for ``reset``).

    ``ckpt`` are the forward's checkpoints (already padded to a power-of-two d_state).
    """
    batch, length, d_inner = u.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    d_state_p = ckpt.shape[-1]
    A_p, B_p, C_p, dh_final_p = (_pad_state(x, d_state_p) for x in (A, B, C, dh_final))
    block_d, chunk = cfg.block_d, cfg.chunk
    n_blocks, n_chunks = d_inner // block_d, ckpt.shape[1]
    seq, grp, chan, chan_state, state, row_chan, row = _specs(
        batch, length, d_inner, d_state_p, n_groups, block_d
    )
    partial = pl.BlockSpec((None, None, length, d_state_p), lambda i, j: (i, j, 0, 0))
    per_state = jax.ShapeDtypeStruct((batch, d_inner, d_state_p), f32)
    per_chan = jax.ShapeDtypeStruct((batch, d_inner), f32)
    if_given = lambda x, shape: None if x is None else shape
    res = _launch(
        _bwd_kernel, "selective_scan_bwd",
        [("dout", dy, seq), ("u", u, seq), ("delta", delta, seq), ("A", A_p, chan_state),
         ("B", B_p, grp), ("C", C_p, grp), ("D", D, chan), ("z", z, seq),
         ("bias", dt_bias, chan), ("dh_final", dh_final_p, state), ("reset", reset, row),
         ("ckpt", ckpt,
          pl.BlockSpec((None, n_chunks, block_d, d_state_p), lambda i, j: (i, 0, j, 0)))],
        [("du", jax.ShapeDtypeStruct(u.shape, u.dtype), seq),
         ("ddelta", jax.ShapeDtypeStruct(delta.shape, delta.dtype), seq),
         ("dz", None if z is None else jax.ShapeDtypeStruct(u.shape, z.dtype), seq),
         ("dB", jax.ShapeDtypeStruct((batch, n_blocks, length, d_state_p), f32), partial),
         ("dC", jax.ShapeDtypeStruct((batch, n_blocks, length, d_state_p), f32), partial),
         ("dA", per_state, state),
         ("dD", if_given(D, per_chan), row_chan),
         ("dbias", if_given(dt_bias, per_chan), row_chan),
         ("dh0", if_given(h0, per_state), state)],
        cfg, grid=(batch, n_blocks), length=length, chunk=chunk, n_chunks=n_chunks,
    )  # fmt: skip

    def group_sum(part, like):
        # (batch, n_blocks, length, N) -> (batch, length, n_groups, N): sum a group's blocks.
        part = part[..., :d_state].reshape(batch, n_groups, n_blocks // n_groups, length, d_state)
        return jnp.transpose(part.sum(axis=2), (0, 2, 1, 3)).astype(like.dtype)

    def batch_sum(name, like):
        return None if like is None else res[name].sum(axis=0)[..., : like.shape[-1]].astype(like.dtype)

    dh0 = None if h0 is None else res["dh0"][..., :d_state].astype(h0.dtype)
    return (
        res["du"],
        res["ddelta"],
        batch_sum("dA", A),
        group_sum(res["dB"], B),
        group_sum(res["dC"], C),
        batch_sum("dD", D),
        res.get("dz"),
        batch_sum("dbias", dt_bias),
        dh0,
        None,
    )
