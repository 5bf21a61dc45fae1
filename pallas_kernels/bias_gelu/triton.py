"""The bias-GELU backward as a Pallas GPU kernel, Triton lowering.

A program owns ``block_features`` columns and walks ``rows_per_program`` rows in tiles of
``block_rows``: it reads the saved pre-activation and the output gradient once, writes the
pre-activation's gradient, and keeps the column sums in float32 registers, written once as its
partial of the bias gradient (summed outside: deterministic, no atomics). XLA fuses the same
work into one reduction whose partials it keeps in the activation dtype; the kernel's partials
stay float32. Tiles are indexed with unclamped row and column vectors and masks (contiguous
columns: 16-byte loads).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import out_type
from pallas_kernels.bias_gelu.common import Call, Config

f32 = jnp.float32
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_CUBIC = 0.044715  # the tanh approximation's (jax.nn.gelu(approximate=True))
_TILE_VALUES = 8192  # most values of one operand a loop step holds


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_rows x block_features`` per loop step (powers of two), ``rows_per_program`` rows
    walked by one program (a multiple of ``block_rows``), warps, and the loop's pipeline depth."""

    block_rows: int
    block_features: int
    rows_per_program: int
    num_warps: int
    num_stages: int = 1


# Not yet timed on a device: 16 x 256 bf16 tiles (8 KiB per operand, 16-byte loads across
# 128 threads), 256 rows per program (GPT-2 125M: 768 programs at 16 x 1024 tokens).
DEFAULT_TILES = {"": Tiles(16, 256, 256, 4)}


def default_tiles(call: Call) -> Tiles:
    tiles = device_default(DEFAULT_TILES)
    return dataclasses.replace(
        tiles, block_features=min(tiles.block_features, pl.next_power_of_2(call.features)))


def auto_declines(call: Call) -> str | None:
    """"auto" keeps XLA's fusion until the kernel is timed against it on a device
    (``scripts/bench_bias_gelu.py``, the GPT-2 step with ``model.mlp_implementation=triton``)."""
    return "not yet timed against XLA's fusion on a device (BENCHMARKS.md, session 23)"


def supports(call: Call, tiles: Tiles) -> str | None:
    """Why this lowering cannot run the call (None if it can)."""
    for name in ("block_rows", "block_features"):
        if (value := getattr(tiles, name)) & (value - 1):
            return f"tiles.{name} ({value}) must be a power of two"
    if tiles.rows_per_program % tiles.block_rows:
        return (f"tiles.rows_per_program ({tiles.rows_per_program}) must be a multiple of "
                f"tiles.block_rows ({tiles.block_rows})")
    if tiles.block_rows * tiles.block_features > _TILE_VALUES:
        return (f"tiles.block_rows x tiles.block_features ({tiles.block_rows} x "
                f"{tiles.block_features}) exceeds the {_TILE_VALUES} values a tile holds")
    return None


def config(call: Call, tiles: Tiles, interpret: bool) -> Config:
    return Config("triton", tiles.block_rows, tiles.block_features, tiles.rows_per_program,
                  tiles.num_warps, tiles.num_stages, interpret)


def _gelu_grad(x):
    """d/dx of ``0.5 x (1 + tanh(c (x + k x^3)))``."""
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * _CUBIC * x * x)


def _backward_kernel(pre_ref, g_ref, dpre_ref, partial_ref, *, rows, F, BR, BF, R):
    cols = pl.program_id(0) * BF + jax.lax.broadcasted_iota(jnp.int32, (BF,), 0)
    cols_ok = cols < F
    first = pl.program_id(1) * R  # outside the loop: interpret mode has no program_id there

    def step(k, total):
        r = first + k * BR + jax.lax.broadcasted_iota(jnp.int32, (BR,), 0)
        mask = (r < rows)[:, None] & cols_ok[None, :]
        at = lambda ref: ref.at[r[:, None], cols[None, :]]
        x = plgpu.load(at(pre_ref), mask=mask, other=0.0).astype(f32)
        d = plgpu.load(at(g_ref), mask=mask, other=0.0).astype(f32) * _gelu_grad(x)
        plgpu.store(at(dpre_ref), d.astype(dpre_ref.dtype), mask=mask)
        return total + jnp.sum(d, axis=0)  # masked entries: g = 0, so d = 0

    total = jax.lax.fori_loop(0, R // BR, step, jnp.zeros((BF,), f32))
    plgpu.store(partial_ref.at[cols], total, mask=cols_ok)


def backward(pre, g, cfg: Config):
    """``(dpre, dbias)`` of ``pre``, ``g`` ``(rows, features)``: ``dpre`` in ``g``'s dtype,
    ``dbias`` float32 ``(features,)``."""
    rows, F = pre.shape
    programs = pl.cdiv(rows, cfg.rows_per_program)
    whole = pl.BlockSpec((rows, F), lambda j, i: (0, 0))
    dpre, partials = pl.pallas_call(
        functools.partial(_backward_kernel, rows=rows, F=F, BR=cfg.block_rows,
                          BF=cfg.block_features, R=cfg.rows_per_program),
        out_shape=(out_type(pre.shape, g.dtype, pre, g), out_type((programs, F), f32, pre, g)),
        grid=(pl.cdiv(F, cfg.block_features), programs),
        in_specs=[whole, whole],
        out_specs=(whole, pl.BlockSpec((None, F), lambda j, i: (i, 0))),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="bias_gelu_bwd",
    )(pre, g)
    return dpre, partials.sum(0)
