"""The cross-entropy forward as a Pallas GPU kernel, Triton lowering.

One program per row walks the vocabulary in blocks of ``block_v`` entries, keeping the running
maximum and the sum of ``exp(logit - maximum)`` (rescaled when the maximum grows): the logits are
read once, where ``jax.nn.logsumexp`` reads them twice (the maximum, then the sum) and a one-pass
``lax.reduce`` over (maximum, sum) pairs runs its combiner per element and is compute-bound on an
H200 (BENCHMARKS.md, session 14). The target's logit is one scalar load.

Loads index the row with clamped column vectors rather than ``pl.ds`` windows: interpret mode
shifts a window that runs past the end, and the mask gives those columns ``-inf``.
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
        x = plgpu.load(logits_ref.at[jnp.minimum(cols, vocab - 1)], mask=cols < vocab,
                       other=-jnp.inf).astype(f32)
        m_new = jnp.maximum(m, jnp.max(x))
        return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new))

    m, s = jax.lax.fori_loop(0, pl.cdiv(vocab, BV), block, (f32(-jnp.inf), f32(0)))
    lse = m + jnp.log(s)
    target = targets_ref[0]
    picked = plgpu.load(logits_ref.at[jnp.clip(target, 0, vocab - 1)]).astype(f32)
    ce_ref[0] = lse - picked
    lse_ref[0] = lse


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
