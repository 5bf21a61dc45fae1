"""The causal depthwise convolution as Pallas GPU kernels, Triton lowering.

Programs own one (batch row, block of ``block_t`` steps, block of ``block_c`` channels). Taps
are shifted masked loads of the row (hits in L1/L2 after the first), so the forward reads ``x``
once from memory and writes ``y`` once, with the bias, SiLU and document masks fused; XLA's form
materialises the padded input and, backward, reduces the weight gradient in separate fusions.

The backward recomputes the pre-activation from ``x`` (the inputs are the only residuals):
``dx[s] = sum_j kernel[K-1-j] * dpre[s+j] * [doc_pos[s+j] >= j]`` needs ``pre`` at ``s..s+K-1``,
hence ``x`` at ``s-K+1..s+K-1`` (``2K - 1`` shifted loads). The kernel and bias gradients are
float32 partials per (batch row, ``bwd_blocks`` time blocks), summed outside (deterministic, no
atomics): a backward program walks its time blocks accumulating them in registers.

Loads index the row with clamped step vectors rather than ``pl.ds`` windows: a window starting
before step 0 would be shifted by interpret mode's dynamic slice, and the masks zero those taps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import Refs, operands, out_type
from pallas_kernels.causal_conv1d.common import Call

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_t`` steps and ``block_c`` channels per program (powers of two; the length and the
    channels need not be multiples), the warps per program, and the time blocks a backward
    program walks (fewer kernel/bias gradient partials to write and sum)."""

    block_t: int
    block_c: int
    num_warps: int
    bwd_blocks: int = 1


# 32 x 64 with 4 warps, one block per backward program: 16 float32 elements per thread per tile;
# the backward's 3K - 1 shifted loads (and their pointers) fit 197 registers without spilling on
# an H100 (scripts/kernel_resources.py; bwd_blocks > 1 loops: 246 at 8 warps, 255 and spills at
# 4). Fastest of those timed on an H200 (bench_conv1d.py --variants; BENCHMARKS.md, session 9).
DEFAULT_TILES = {"": Tiles(block_t=32, block_c=64, num_warps=4)}


@dataclasses.dataclass(frozen=True)
class Config:
    """What the kernels are specialised on (static under ``jit``)."""

    tiles: Tiles
    activation: str | None
    interpret: bool
    implementation: str = "triton"


def default_tiles(call: Call) -> Tiles:
    return device_default(DEFAULT_TILES)


def auto_declines(call: Call) -> str | None:
    """Runs when named; "auto" keeps the plain-JAX form, which XLA fuses: on an H200 the
    backward measured slower (Mamba-2 130M's conv_x, 8 x 2048 x 1536 bf16: fwd+bwd 0.631 ms vs
    0.543, though the forward is 1.38x faster; BENCHMARKS.md, session 9)."""
    return "backward measured slower than the plain-JAX form XLA fuses (BENCHMARKS.md)"


def supports(call: Call, tiles: Tiles) -> str | None:
    """Why this lowering cannot run the call (None if it can)."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0
    for name in ("block_t", "block_c"):
        if not pow2(value := getattr(tiles, name)):
            return f"tiles.{name} ({value}) must be a power of two (Triton's block shapes)"
    if not pow2(tiles.num_warps):
        return f"tiles.num_warps ({tiles.num_warps}) must be a power of two"
    return None


def config(call: Call, tiles: Tiles, interpret: bool) -> Config:
    return Config(tiles, call.activation, interpret)


# ----------------------------------------------------------------------------- kernels


class _Tile:
    """Index vectors of a program's ``(T, C)`` tile and its shifted masked loads."""

    def __init__(self, length, channels, T, C, t0, c0):
        self.length = length
        self.t = t0 + jax.lax.broadcasted_iota(jnp.int32, (T,), 0)
        self.c = c0 + jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
        self.c_ok = self.c < channels

    def rows(self, shift):
        """Steps ``t + shift`` (clamped in range) and whether each is in the sequence."""
        s = self.t + shift
        return jnp.clip(s, 0, self.length - 1), (s >= 0) & (s < self.length)

    def load(self, ref, shift, extra=None):
        """``ref[t + shift, c]`` as float32, zero outside the sequence, the channels or ``extra``
        (a ``(T,)`` mask)."""
        s, ok = self.rows(shift)
        if extra is not None:
            ok = ok & extra
        mask = ok[:, None] & self.c_ok[None, :]
        return plgpu.load(ref.at[s[:, None], self.c[None, :]], mask=mask, other=0.0).astype(f32)

    def store(self, ref, value):
        mask = (self.t < self.length)[:, None] & self.c_ok[None, :]
        plgpu.store(ref.at[self.t[:, None], self.c[None, :]], value.astype(ref.dtype), mask=mask)

    def doc_pos(self, r, shift):
        """The document position of step ``t + shift`` (None without documents)."""
        if r.doc_pos is None:
            return None
        s, ok = self.rows(shift)
        return plgpu.load(r.doc_pos.at[s], mask=ok, other=0)

    def channel_row(self, ref, k=None):
        """``ref[k, c]`` (or ``ref[c]``) as a float32 ``(1, C)`` row, zero past the channels."""
        at = ref.at[self.c] if k is None else ref.at[k, self.c]
        return plgpu.load(at, mask=self.c_ok, other=0.0).astype(f32)[None, :]


def _pre(r, tile, K, shift, xs=None):
    """The pre-activation at steps ``t + shift``; ``xs[d]`` is ``x[t + d]`` when preloaded."""
    pos = tile.doc_pos(r, shift)
    acc = None
    for k in range(K):
        back = K - 1 - k  # tap k reads `back` steps before
        if xs is None:
            tap = tile.load(r.x, shift - back, None if pos is None else pos >= back)
        else:
            tap = xs[shift - back]
            if pos is not None:
                tap = jnp.where((pos >= back)[:, None], tap, 0.0)
        term = tap * tile.channel_row(r.kernel, k)
        acc = term if acc is None else acc + term
    if r.bias is not None:
        acc = acc + tile.channel_row(r.bias)
    return acc, pos


def _forward_kernel(*refs, length, channels, K, T, C, activation, flags):
    r = Refs(refs, flags)
    tile = _Tile(length, channels, T, C, pl.program_id(1) * T, pl.program_id(2) * C)
    pre, _ = _pre(r, tile, K, 0)
    tile.store(r.y, jax.nn.silu(pre) if activation == "silu" else pre)


def _backward_kernel(*refs, length, channels, K, T, C, activation, blocks, flags):
    r = Refs(refs, flags)
    first, c0 = pl.program_id(1) * blocks, pl.program_id(2) * C

    def block(i, sums):
        tile = _Tile(length, channels, T, C, (first + i) * T, c0)  # (no program_id in a loop)
        return _backward_block(r, tile, K, activation, sums)

    if blocks == 1:  # no loop: the partials are stored as soon as they are summed
        block(0, None)
        return
    sums = jax.lax.fori_loop(0, blocks, block, (jnp.zeros((C,), f32),) * (K + 1))
    _store_partials(r, sums)


def _store_partials(r, sums):
    for k, row in enumerate(sums[:-1]):
        r.dkernel[k, :] = row
    if r.dbias is not None:
        r.dbias[:] = sums[-1]


def _backward_block(r, tile, K, activation, sums):
    """Store ``dx`` of one tile; returns ``sums`` (``K`` kernel rows, then the bias) plus the
    tile's parameter gradients, or stores those (``sums`` None: one block per program)."""
    xs = {d: tile.load(r.x, d) for d in range(-(K - 1), K)}
    dx = None
    for j in range(K):  # output step t + j reads x[t] through tap K - 1 - j
        pre, pos = _pre(r, tile, K, j, xs)
        dpre = tile.load(r.dy, j)  # zero past the sequence end
        if activation == "silu":
            sig = jax.nn.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        if j == 0:  # the parameter gradients sum dpre at the tile's own steps
            taps = [xs[-(K - 1 - k)] for k in range(K)]
            if pos is not None:
                taps = [jnp.where((pos >= K - 1 - k)[:, None], tap, 0.0)
                        for k, tap in enumerate(taps)]
            parts = (*(jnp.sum(dpre * tap, axis=0) for tap in taps), jnp.sum(dpre, axis=0))
            if sums is None:
                _store_partials(r, parts)
            else:
                sums = tuple(s + p for s, p in zip(sums, parts))
        if pos is not None:
            dpre = jnp.where((pos >= j)[:, None], dpre, 0.0)
        term = dpre * tile.channel_row(r.kernel, K - 1 - j)
        dx = term if dx is None else dx + term
    tile.store(r.dx, dx)
    return sums


# ----------------------------------------------------------------------------- calls


def _call(kernel, cfg: Config, x, named_in, named_out, name, blocks=None):
    """``blocks``: the time blocks per program of the backward (None: the forward, one)."""
    batch, length, channels = x.shape
    T, C = cfg.tiles.block_t, cfg.tiles.block_c
    grid = (batch, pl.cdiv(length, T * (blocks or 1)), pl.cdiv(channels, C))
    in_flags, args, in_specs = operands(named_in)
    out_flags, out_shapes, out_specs = operands(named_out)
    static = dict(length=length, channels=channels, K=named_in[1][1].shape[0], T=T, C=C,
                  activation=cfg.activation, **({} if blocks is None else {"blocks": blocks}))
    return pl.pallas_call(
        functools.partial(kernel, flags=in_flags + out_flags, **static),
        out_shape=[out_type(s.shape, s.dtype, *args) for s in out_shapes],
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.tiles.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name=name,
    )(*args)


def _row(x):
    """A program's block of a ``(batch, length, channels)`` array: its whole batch row."""
    return pl.BlockSpec((None, *x.shape[1:]), lambda b, i, j: (b, 0, 0))


def _inputs(x, kernel, bias, doc_pos):
    """The named inputs: a program sees its batch row of ``x``/``doc_pos`` and all parameters."""
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, i, j: (0,) * a.ndim)
    return [
        ("x", x, _row(x)),
        ("kernel", kernel, whole(kernel)),
        ("bias", bias, None if bias is None else whole(bias)),
        ("doc_pos", doc_pos, pl.BlockSpec((None, x.shape[1]), lambda b, i, j: (b, 0))),
    ]


def forward(x, kernel, bias, doc_pos, cfg: Config):
    (y,) = _call(_forward_kernel, cfg, x, _inputs(x, kernel, bias, doc_pos),
                 [("y", jax.ShapeDtypeStruct(x.shape, x.dtype), _row(x))], "causal_conv1d_fwd")
    return y


def backward(dy, x, kernel, bias, doc_pos, cfg: Config):
    """``(dx, dkernel, dbias, None)``; the parameter gradients in their own dtypes, none for the
    integer ``doc_pos``."""
    dy = dy.astype(x.dtype)
    batch, length, channels = x.shape
    T, C = cfg.tiles.block_t, cfg.tiles.block_c
    blocks = min(cfg.tiles.bwd_blocks, pl.cdiv(length, T))  # no program past the end
    K, n_t = kernel.shape[0], pl.cdiv(length, T * blocks)
    padded = pl.cdiv(channels, C) * C  # whole channel blocks: the partials' blocks tile them
    named_in = _inputs(x, kernel, bias, doc_pos) + [("dy", dy, _row(x))]
    partial_k = pl.BlockSpec((None, None, K, C), lambda b, i, j: (b, i, 0, j))
    partial_b = pl.BlockSpec((None, None, C), lambda b, i, j: (b, i, j))
    sds = jax.ShapeDtypeStruct
    outs = _call(_backward_kernel, cfg, x, named_in, [
        ("dx", sds(x.shape, x.dtype), _row(x)),
        ("dkernel", sds((batch, n_t, K, padded), f32), partial_k),
        ("dbias", None if bias is None else sds((batch, n_t, padded), f32), partial_b),
    ], "causal_conv1d_bwd", blocks)
    dx, dkernel = outs[0], outs[1].sum((0, 1))[:, :channels].astype(kernel.dtype)
    dbias = None if bias is None else outs[2].sum((0, 1))[:channels].astype(bias.dtype)
    return dx, dkernel, dbias, None
