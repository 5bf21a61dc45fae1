"""The cross-entropy forward and backward as Pallas GPU kernels, Triton lowering.

Forward: one program per row walks the vocabulary in blocks of ``block_v`` entries, keeping the
running maximum and the sum of ``exp(logit - maximum)`` (rescaled when the maximum grows): the
logits are read once, where ``jax.nn.logsumexp`` reads them twice (the maximum, then the sum)
and a one-pass ``lax.reduce`` over (maximum, sum) pairs runs its combiner per element and is
compute-bound on an H200 (BENCHMARKS.md, session 14). The target's logit is one scalar load.
Backward: one program per (block of ``block_v`` entries, row) writes ``(softmax - onehot) * g``
from the forward's log-sum-exp, one read of the logits and one write.

Both index a block with the column vector ``start + iota`` and mask the columns past the
vocabulary, rather than with ``pl.ds`` windows (interpret mode shifts a window that runs past
the end) or clamped indices (Triton then cannot prove the columns contiguous and loads them one
element per instruction instead of 16 bytes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import out_type
from pallas_kernels.cross_entropy.common import Call, Config

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_v`` vocabulary entries per loop step (a power of two), the warps per program, and
    the loop's software-pipeline depth (a step's load does not depend on the running sums)."""

    block_v: int
    num_warps: int
    num_stages: int = 1


# 2048 entries over 4 warps was the fastest of four tiles on an H200 at 16384 x 50304 bf16: forward
# 0.654 ms against XLA's 1.04 (4096 x 8 warps: 0.752), forward+backward 1.21x (BENCHMARKS.md,
# session 15).
DEFAULT_TILES = {"": Tiles(block_v=2048, num_warps=4)}


def default_tiles(call: Call) -> Tiles:
    default = device_default(DEFAULT_TILES)
    return dataclasses.replace(default,
                               block_v=min(default.block_v, pl.next_power_of_2(call.vocab)))


def supports(call: Call, tiles: Tiles) -> str | None:
    """Why this lowering cannot run the call (None if it can)."""
    for name in ("block_v", "num_warps"):
        if (value := getattr(tiles, name)) & (value - 1):
            return f"tiles.{name} ({value}) must be a power of two"
    return None


def config(call: Call, tiles: Tiles, interpret: bool) -> Config:
    return Config("triton", tiles.block_v, tiles.num_warps, tiles.num_stages, interpret)


def _forward_kernel(logits_ref, targets_ref, ce_ref, lse_ref, *, vocab, BV):
    def block(i, carry):
        m, s = carry
        cols = i * BV + jax.lax.broadcasted_iota(jnp.int32, (BV,), 0)
        x = plgpu.load(logits_ref.at[cols], mask=cols < vocab,
                       other=-jnp.inf).astype(f32)
        m_new = jnp.maximum(m, jnp.max(x))
        return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new))

    m, s = jax.lax.fori_loop(0, pl.cdiv(vocab, BV), block, (f32(-jnp.inf), f32(0)))
    lse = m + jnp.log(s)
    target = targets_ref[0]
    picked = plgpu.load(logits_ref.at[jnp.clip(target, 0, vocab - 1)]).astype(f32)
    ce_ref[0] = lse - picked
    lse_ref[0] = lse


def _backward_kernel(logits_ref, lse_ref, targets_ref, g_ref, dlogits_ref, *, vocab, BV):
    cols = pl.program_id(0) * BV + jax.lax.broadcasted_iota(jnp.int32, (BV,), 0)
    inside = cols < vocab
    x = plgpu.load(logits_ref.at[cols], mask=inside, other=0.0).astype(f32)
    probs = jnp.exp(x - lse_ref[0])
    d = (probs - (cols == targets_ref[0]).astype(f32)) * g_ref[0]
    plgpu.store(dlogits_ref.at[cols], d.astype(dlogits_ref.dtype), mask=inside)


def backward(logits, lse, targets, g, cfg: Config):
    """``(softmax(logits) - onehot(targets)) * g`` in ``logits``' dtype (``common.backward``'s
    value): ``logits (rows, vocab)``, float32 ``lse`` and ``g`` and ``targets``, ``(rows,)``."""
    rows, vocab = logits.shape
    # Column blocks along the grid's first (CUDA x) axis: one row's blocks run back to back, as
    # an elementwise kernel walks the flattened array.
    row = pl.BlockSpec((1,), lambda j, i: (i,))
    whole = pl.BlockSpec((None, vocab), lambda j, i: (i, 0))
    return pl.pallas_call(
        functools.partial(_backward_kernel, vocab=vocab, BV=cfg.block_v),
        out_shape=out_type(logits.shape, logits.dtype, logits, lse, targets, g),
        grid=(pl.cdiv(vocab, cfg.block_v), rows),
        in_specs=[whole, row, row, row],
        out_specs=whole,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name="cross_entropy_bwd",
    )(logits, lse, targets.astype(jnp.int32), g.astype(f32))


def forward(logits, targets, cfg: Config):
    """``(ce, lse)``, float32 ``(rows,)``, of ``logits (rows, vocab)`` and ``targets (rows,)``."""
    rows, vocab = logits.shape
    row = pl.BlockSpec((1,), lambda i: (i,))
    out = out_type((rows,), f32, logits, targets)
    return pl.pallas_call(
        functools.partial(_forward_kernel, vocab=vocab, BV=cfg.block_v),
        out_shape=(out, out),
        grid=(rows,),
        in_specs=[pl.BlockSpec((None, vocab), lambda i: (i, 0)), row],
        out_specs=(row, row),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="cross_entropy_fwd",
    )(logits, targets.astype(jnp.int32))
