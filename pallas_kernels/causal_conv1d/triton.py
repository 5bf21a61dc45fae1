"""The causal depthwise convolution as Pallas GPU kernels, Triton lowering.

Programs own one (batch row, block of ``block_t`` steps, block of ``block_c`` channels). Taps
are shifted masked loads of the row (hits in L1/L2 after the first), so the forward reads ``x``
once from memory and writes ``y`` once, with the bias, SiLU and document masks fused; XLA's form
materialises the padded input and, backward, reduces the weight gradient in separate fusions.

The backward recomputes the pre-activation from ``x`` (the inputs are the only residuals):
``dx[s] = sum_j kernel[K-1-j] * dpre[s+j] * [doc_pos[s+j] >= j]`` needs ``pre`` at ``s..s+K-1``.
Fused, one kernel recomputes it at each of those shifts from ``x`` at ``s-K+1..s+K-1`` (``2K - 1``
shifted loads, ~200 registers at a 32 x 64 tile). Split (``Tiles.split_bwd``), a first kernel
computes ``dpre`` once per step and stores it (in ``x``'s dtype; with no activation it is ``dy``
and nothing is stored), and a second sums ``dx`` from its ``K`` shifted loads: more memory traffic,
far fewer registers. The kernel and bias gradients are float32 partials per (batch row, program's
time blocks), summed outside (deterministic, no atomics).

A program of any of the kernels walks ``Tiles.blocks`` time tiles in a loop (fewer programs, and
fewer parameter partials to write and sum). Triton does not software-pipeline that loop: its
loads feed no matrix product, and the PTX is the same at any ``num_stages``.

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
    """``block_t`` steps and ``block_c`` channels per tile (powers of two; the length and the
    channels need not be multiples), the warps per program, the time tiles each program walks,
    and whether the backward is split in two kernels (module docstring)."""

    block_t: int
    block_c: int
    num_warps: int
    blocks: int = 1
    split_bwd: bool = False


# 32 x 64 with 4 warps, one block per program, split backward: 16 float32 elements per thread per
# tile; the split kernels fit 128 + 64 registers on an H100 (the fused one 197;
# scripts/kernel_resources.py). Fastest of those timed on an H200 (bench_conv1d.py --variants
# --kernels; BENCHMARKS.md, session 12): fwd+bwd 1.45x XLA's fusions at 8 x 2048 x 1536.
DEFAULT_TILES = {"": Tiles(block_t=32, block_c=64, num_warps=4, split_bwd=True)}


@dataclasses.dataclass(frozen=True)
class Config:
    """What the kernels are specialised on (static under ``jit``)."""

    tiles: Tiles
    activation: str | None
    interpret: bool
    implementation: str = "triton"


def default_tiles(call: Call) -> Tiles:
    return device_default(DEFAULT_TILES)


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


class _Program:
    """A program's channel block and the time tiles it walks.

    Weight rows are loaded where used (L1 hits): held in registers across the fused backward's
    ``K`` recomputations they cost it 8 bytes of spill at 32 x 64 (ptxas, 255 registers vs 197).
    """

    def __init__(self, r, *, length, channels, K, T, C, blocks):
        self.r, self.K, self.C, self.blocks = r, K, C, blocks
        self.first, c0 = pl.program_id(1) * blocks, pl.program_id(2) * C
        self.tile = lambda i: _Tile(length, channels, T, C, (self.first + i) * T, c0)
        self._rows = self.tile(0)

    def weight(self, k):
        """Kernel row ``k`` of the program's channels, ``(1, C)`` float32."""
        return self._rows.channel_row(self.r.kernel, k)

    def walk(self, body, carry=None):
        """``carry = body(tile, carry)`` over the program's time tiles (a loop if several; its
        tiles are built inside it: no ``program_id`` in a loop body)."""
        if self.blocks == 1:
            return body(self.tile(0), carry)
        return jax.lax.fori_loop(0, self.blocks, lambda i, c: body(self.tile(i), c), carry)

    def pre(self, tile, shift, xs=None):
        """The pre-activation at steps ``t + shift`` and their document positions; ``xs[d]`` is
        ``x[t + d]`` when preloaded."""
        pos = tile.doc_pos(self.r, shift)
        acc = None
        for k in range(self.K):
            back = self.K - 1 - k  # tap k reads `back` steps before
            if xs is None:
                tap = tile.load(self.r.x, shift - back, None if pos is None else pos >= back)
            else:
                tap = xs[shift - back]
                if pos is not None:
                    tap = jnp.where((pos >= back)[:, None], tap, 0.0)
            term = tap * self.weight(k)
            acc = term if acc is None else acc + term
        if self.r.bias is not None:
            acc = acc + self._rows.channel_row(self.r.bias)
        return acc, pos

    def param_partials(self, dpre, xs, pos):
        """This tile's kernel-gradient rows and bias-gradient row: ``dpre`` against each tap of
        the tile's own steps."""
        taps = [xs[-(self.K - 1 - k)] for k in range(self.K)]
        if pos is not None:
            taps = [jnp.where((pos >= self.K - 1 - k)[:, None], tap, 0.0)
                    for k, tap in enumerate(taps)]
        return (*(jnp.sum(dpre * tap, axis=0) for tap in taps), jnp.sum(dpre, axis=0))

    def dx_term(self, dpre, pos, j):
        """Output step ``t + j``'s share of ``dx[t]`` (through tap ``K - 1 - j``), unless it
        starts a document fewer than ``j`` steps in."""
        if pos is not None:
            dpre = jnp.where((pos >= j)[:, None], dpre, 0.0)
        return dpre * self.weight(self.K - 1 - j)

    def walk_partials(self, body):
        """``walk`` carrying the parameter partials, stored at the end. With one block the carry
        is None and ``accumulate`` stores them as soon as they are summed: the fused backward
        holding them through its ``dx`` sum took 255 registers and spilled (197 otherwise)."""
        zeros = (jnp.zeros((self.C,), f32),) * (self.K + 1)
        sums = self.walk(body, None if self.blocks == 1 else zeros)
        if sums is not None:
            self._store_partials(sums)

    def accumulate(self, sums, parts):
        """``sums + parts``, or ``parts`` stored (``sums`` None: one block)."""
        if sums is None:
            self._store_partials(parts)
            return None
        return tuple(u + v for u, v in zip(sums, parts))

    def _store_partials(self, sums):
        for k, row in enumerate(sums[:-1]):
            self.r.dkernel[k, :] = row
        if self.r.dbias is not None:
            self.r.dbias[:] = sums[-1]


def _dpre(dy, pre, activation):
    """The pre-activation's gradient from the output's."""
    if activation != "silu":
        return dy
    sig = jax.nn.sigmoid(pre)
    return dy * sig * (1.0 + pre * (1.0 - sig))


def _forward_kernel(*refs, activation, flags, **shape):
    p = _Program(Refs(refs, flags), **shape)

    def block(tile, carry):
        pre, _ = p.pre(tile, 0)
        tile.store(p.r.y, jax.nn.silu(pre) if activation == "silu" else pre)
        return carry

    p.walk(block)


def _backward_kernel(*refs, activation, flags, **shape):
    """Fused: ``dx`` and the parameter partials, recomputing ``pre`` at all ``K`` shifts."""
    p = _Program(Refs(refs, flags), **shape)
    K = p.K

    def block(tile, sums):
        xs = {d: tile.load(p.r.x, d) for d in range(-(K - 1), K)}
        dx = None
        for j in range(K):  # output step t + j reads x[t] through tap K - 1 - j
            pre, pos = p.pre(tile, j, xs)
            dpre = _dpre(tile.load(p.r.dy, j), pre, activation)  # zero past the sequence end
            if j == 0:  # the parameter gradients sum dpre at the tile's own steps
                sums = p.accumulate(sums, p.param_partials(dpre, xs, pos))
            term = p.dx_term(dpre, pos, j)
            dx = term if dx is None else dx + term
        tile.store(p.r.dx, dx)
        return sums

    p.walk_partials(block)


def _dpre_kernel(*refs, activation, flags, **shape):
    """Split, first kernel: ``dpre`` at each step (stored unless it is ``dy``) and the parameter
    partials."""
    p = _Program(Refs(refs, flags), **shape)

    def block(tile, sums):
        xs = {d: tile.load(p.r.x, d) for d in range(-(p.K - 1), 1)}
        pre, pos = p.pre(tile, 0, xs)
        dpre = _dpre(tile.load(p.r.dy, 0), pre, activation)
        if p.r.dpre is not None:
            tile.store(p.r.dpre, dpre)
        return p.accumulate(sums, p.param_partials(dpre, xs, pos))

    p.walk_partials(block)


def _dx_kernel(*refs, flags, **shape):
    """Split, second kernel: ``dx`` from ``K`` shifted loads of ``dpre``."""
    p = _Program(Refs(refs, flags), **shape)

    def block(tile, carry):
        dx = None
        for j in range(p.K):
            term = p.dx_term(tile.load(p.r.dpre, j), tile.doc_pos(p.r, j), j)
            dx = term if dx is None else dx + term
        tile.store(p.r.dx, dx)
        return carry

    p.walk(block)


# ----------------------------------------------------------------------------- calls


def _blocks(cfg: Config, length: int) -> int:
    """Time tiles per program: no program starts past the end."""
    return min(cfg.tiles.blocks, pl.cdiv(length, cfg.tiles.block_t))


def _call(kernel, cfg: Config, x, K, named_in, named_out, name, **static):
    batch, length, channels = x.shape
    T, C, blocks = cfg.tiles.block_t, cfg.tiles.block_c, _blocks(cfg, length)
    grid = (batch, pl.cdiv(length, T * blocks), pl.cdiv(channels, C))
    in_flags, args, in_specs = operands(named_in)
    out_flags, out_shapes, out_specs = operands(named_out)
    shape = dict(length=length, channels=channels, K=K, T=T, C=C, blocks=blocks)
    return pl.pallas_call(
        functools.partial(kernel, flags=in_flags + out_flags, **shape, **static),
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


def _inputs(x, kernel, bias, doc_pos, name="x"):
    """The named inputs: a program sees its batch row of ``x`` (named ``name``) and ``doc_pos``,
    and all parameters."""
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, i, j: (0,) * a.ndim)
    return [
        (name, x, _row(x)),
        ("kernel", kernel, whole(kernel)),
        ("bias", bias, None if bias is None else whole(bias)),
        ("doc_pos", doc_pos, pl.BlockSpec((None, x.shape[1]), lambda b, i, j: (b, 0))),
    ]


def forward(x, kernel, bias, doc_pos, cfg: Config):
    (y,) = _call(_forward_kernel, cfg, x, kernel.shape[0], _inputs(x, kernel, bias, doc_pos),
                 [("y", jax.ShapeDtypeStruct(x.shape, x.dtype), _row(x))], "causal_conv1d_fwd",
                 activation=cfg.activation)
    return y


def backward(dy, x, kernel, bias, doc_pos, cfg: Config):
    """``(dx, dkernel, dbias, None)``; the parameter gradients in their own dtypes, none for the
    integer ``doc_pos``."""
    dy = dy.astype(x.dtype)
    batch, length, channels = x.shape
    T, C = cfg.tiles.block_t, cfg.tiles.block_c
    K, n_t = kernel.shape[0], pl.cdiv(length, T * _blocks(cfg, length))
    padded = pl.cdiv(channels, C) * C  # whole channel blocks: the partials' blocks tile them
    sds = jax.ShapeDtypeStruct
    dx_out = ("dx", sds(x.shape, x.dtype), _row(x))
    partials = [
        ("dkernel", sds((batch, n_t, K, padded), f32),
         pl.BlockSpec((None, None, K, C), lambda b, i, j: (b, i, 0, j))),
        ("dbias", None if bias is None else sds((batch, n_t, padded), f32),
         pl.BlockSpec((None, None, C), lambda b, i, j: (b, i, j))),
    ]
    named_in = _inputs(x, kernel, bias, doc_pos) + [("dy", dy, _row(x))]
    act = dict(activation=cfg.activation)
    if not cfg.tiles.split_bwd:
        dx, *sums = _call(_backward_kernel, cfg, x, K, named_in, [dx_out] + partials,
                          "causal_conv1d_bwd", **act)
    else:
        stored = cfg.activation is not None  # else dpre is dy
        dpre_out = ("dpre", sds(x.shape, x.dtype) if stored else None, _row(x))
        outs = _call(_dpre_kernel, cfg, x, K, named_in, [dpre_out] + partials,
                     "causal_conv1d_bwd_pre", **act)
        dpre, sums = (outs[0], outs[1:]) if stored else (dy, outs)
        (dx,) = _call(_dx_kernel, cfg, x, K, _inputs(dpre, kernel, None, doc_pos, "dpre"),
                      [dx_out], "causal_conv1d_bwd_dx")
    dkernel = sums[0].sum((0, 1))[:, :channels].astype(kernel.dtype)
    dbias = None if bias is None else sums[1].sum((0, 1))[:channels].astype(bias.dtype)
    return dx, dkernel, dbias, None
