"""``grouped_matmul``: argument validation, choice of implementation, and the custom VJP.

The lowerings (``triton``, ``mosaic_gpu``) are imported lazily and chosen by ``_api.Dispatch``,
the policy every op shares; ``"xla"`` is ``jax.lax.ragged_dot``. Each lowering module provides
``gmm(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, tiles, interpret)`` (the forward, and
with ``transpose_rhs`` the lhs gradient) and ``tgmm(lhs, dout, group_sizes, *, out_dtype, tiles,
interpret)`` (the per-group ``lhs_g^T @ dout_g`` of the rhs gradient); its ``Tiles`` holds one
launch shape per kernel: ``fwd``, ``dlhs``, ``drhs``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._api import Dispatch, Lowering, load_lowering, shape_of, unvary_like

# "auto" takes the first that runs natively on the target and supports the call. Measured on an
# H200 at the MoE shapes (BENCHMARKS.md, session 7), forward + backward over a dense matmul of
# equal FLOPs: the project's Triton kernels 1.19x (n 2304) / 1.26x (n 4608), JAX's Hopper kernels
# 1.30x / 1.31x, jax.lax.ragged_dot 7.6x / 8.1x.
DISPATCH = Dispatch("pallas_kernels.grouped_matmul", (
    Lowering("triton", "gpu"),
    Lowering("mosaic_gpu", "gpu", arch="9."),
))
IMPLEMENTATIONS = DISPATCH.names
_DTYPES = tuple(map(jnp.dtype, (jnp.bfloat16, jnp.float16, jnp.float32)))


class Call(NamedTuple):
    """The static shape of one call: what a lowering's ``supports`` and ``default_tiles`` see."""

    m: int  # rows of lhs
    k: int  # contraction
    n: int  # columns of rhs
    groups: int
    dtype: Any  # of lhs and rhs
    out_dtype: Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) description of one kernel call; the custom_vjp's nondiff argument."""

    implementation: str
    tiles: Any
    interpret: bool
    out_dtype: Any


def grouped_matmul(lhs, rhs, group_sizes, *, implementation: str = "auto",
                   interpret: bool = False, tiles=None, preferred_element_type=None):
    """``out[r] = lhs[r] @ rhs[group of r]`` for rows sorted by group (``jax.lax.ragged_dot``).

    Args:
      lhs: ``(m, k)`` rows, the first ``group_sizes[0]`` in group 0, the next in group 1, ...
      rhs: ``(groups, k, n)``, one matrix per group, lhs's dtype (bfloat16, float16, float32).
      group_sizes: ``(groups,)`` integers summing to at most ``m`` (zero-sized groups allowed);
        rows past the sum get zeros (and zero gradients).
      implementation: ``"auto"``, ``"xla"`` (``jax.lax.ragged_dot``), ``"triton"`` or
        ``"mosaic_gpu"`` (JAX's Hopper kernels, compiled only). ``"auto"`` takes the first Pallas
        lowering that runs natively and supports the call, else ``"xla"``.
      interpret: run ``"triton"`` in interpret mode (how CI tests it on CPU); never changes what
        ``"auto"`` picks.
      tiles: the named lowering's ``Tiles`` (``triton.Tiles(fwd, dlhs, drhs)`` of
        ``triton.KernelTiles``, likewise ``mosaic_gpu``); None takes its device default.
      preferred_element_type: the result's dtype (default lhs's); products accumulate in float32.

    Returns:
      ``(m, n)`` in ``preferred_element_type``. The gradients are kernels too: ``d_lhs`` the
      same grouped matmul of ``d_out`` with each group's rhs transposed (read transposed, never
      copied), ``d_rhs[g] = lhs_g^T @ d_out_g``.

    Raises:
      ValueError: naming the shape, dtype or tile constraint that is violated.
    """
    out_dtype = _check(lhs, rhs, group_sizes, preferred_element_type)
    if implementation == "mosaic_gpu" and interpret:
        raise ValueError("implementation='mosaic_gpu' wraps JAX's compiled Hopper kernels, which "
                         "have no interpret mode (interpret=True); use 'triton' or 'xla'")
    call = Call(lhs.shape[0], lhs.shape[1], rhs.shape[2], rhs.shape[0], lhs.dtype, out_dtype)
    name, tiles = DISPATCH.choose(implementation, call, interpret=bool(interpret), tiles=tiles)
    group_sizes = group_sizes.astype(jnp.int32)
    if name == "xla":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
    cfg = Config(name, tiles, bool(interpret), out_dtype)
    return _kernel_gmm(cfg, lhs, rhs, group_sizes)


def _check(lhs, rhs, group_sizes, preferred_element_type):
    """Validate shapes and dtypes; returns the output dtype."""
    if getattr(lhs, "ndim", None) != 2:
        raise ValueError(f"lhs must be (m, k), got shape {shape_of(lhs)}")
    if getattr(rhs, "ndim", None) != 3:
        raise ValueError(f"rhs must be (groups, k, n), got shape {shape_of(rhs)}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"rhs (groups, k, n) = {rhs.shape} must have lhs's k = {lhs.shape[1]}")
    if getattr(group_sizes, "shape", None) != (rhs.shape[0],):
        raise ValueError(f"group_sizes must be (groups,) = ({rhs.shape[0]},) (rhs's first "
                         f"dimension), got shape {shape_of(group_sizes)}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    if min(lhs.shape) < 1 or min(rhs.shape) < 1:
        raise ValueError(f"every dimension must be >= 1, got lhs {lhs.shape}, rhs {rhs.shape}")
    allowed = ", ".join(map(str, _DTYPES))
    if lhs.dtype not in _DTYPES or rhs.dtype != lhs.dtype:
        raise ValueError(f"lhs and rhs must have the same dtype, one of {allowed}; got "
                         f"{lhs.dtype} and {rhs.dtype}")
    out = jnp.dtype(preferred_element_type or lhs.dtype)
    if out not in _DTYPES:
        raise ValueError(f"preferred_element_type must be one of {allowed}, got {out}")
    return out


# ----------------------------------------------------------------------------- custom VJP


def _module(cfg: Config):
    return load_lowering(DISPATCH.package, cfg.implementation)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_gmm(cfg: Config, lhs, rhs, group_sizes):
    return _module(cfg).gmm(lhs, rhs, group_sizes, transpose_rhs=False, out_dtype=cfg.out_dtype,
                            tiles=cfg.tiles.fwd, interpret=cfg.interpret)


def _gmm_fwd(cfg, lhs, rhs, group_sizes):
    return _kernel_gmm(cfg, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, residuals, dout):
    lhs, rhs, group_sizes = residuals
    module = _module(cfg)
    dout = dout.astype(lhs.dtype)  # the kernels multiply operands of one dtype
    d_lhs = module.gmm(dout, rhs, group_sizes, transpose_rhs=True, out_dtype=lhs.dtype,
                       tiles=cfg.tiles.dlhs, interpret=cfg.interpret)
    d_rhs = module.tgmm(lhs, dout, group_sizes, out_dtype=rhs.dtype, tiles=cfg.tiles.drhs,
                        interpret=cfg.interpret)
    return unvary_like(d_lhs, lhs), unvary_like(d_rhs, rhs), None


_kernel_gmm.defvjp(_gmm_fwd, _gmm_bwd)
