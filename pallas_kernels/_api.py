"""Argument checks, lowering loading and the scan kernels' custom VJP that the ``api`` modules
share."""

from __future__ import annotations

import functools
import importlib
import numbers

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values


def is_int(x) -> bool:
    """A static Python integer (``bool`` excluded: ``True`` is not a block size)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def shape_of(x):
    """``x.shape``, or the type name of a non-array, for error messages."""
    return getattr(x, "shape", type(x).__name__)


@functools.cache
def load_lowering(package: str, name: str):
    """``(module, None)`` or ``(None, why)`` for ``package.name``; cached so a failing import is
    tried once."""
    try:
        return importlib.import_module(f"{package}.{name}"), None
    except Exception as e:  # noqa: BLE001 - any import failure just makes the lowering unavailable
        return None, f"{type(e).__name__}: {e}"


def unvary_like(g, primal):
    """``g`` summed over the mesh axes it varies over and ``primal`` does not (None stays None).

    Inside ``shard_map`` an input replicated over mesh axes (A, D, a bias next to a sharded batch)
    gets the sum of every shard's gradient, as autodiff of the implicit ``pvary`` would."""
    if g is None:
        return None
    extra = tuple(jax.typeof(g).mat.varying - jax.typeof(primal).mat.varying)
    return jax.lax.psum(g, extra) if extra else g


def checkpointed_scan(package: str):
    """A custom-VJP ``scan(cfg, *args) -> (y, final_state)`` over the lowering module
    ``package.<cfg.implementation>`` (the selective scan's and SSD's; ``cfg`` is static).

    The module's ``forward(*args, cfg, save_checkpoints)`` returns ``(y, final_state,
    checkpoints)``; under differentiation it saves the per-chunk states, from which
    ``backward(dy, dh_final, *args, checkpoints, cfg)`` recomputes the rest (one gradient per
    argument, None for absent ones). An unused output's cotangent arrives as zeros (``dy``) or
    None (``dh_final``).
    """

    def module(cfg):
        return load_lowering(package, cfg.implementation)[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def scan(cfg, *args):
        y, h_final, _ = module(cfg).forward(*args, cfg, save_checkpoints=False)
        return y, h_final

    def scan_fwd(cfg, *primals):
        args = custom_vjp_primal_tree_values(primals)
        y, h_final, ckpt = module(cfg).forward(*args, cfg, save_checkpoints=True)
        return (y, h_final), (args, ckpt)

    def scan_bwd(cfg, residuals, cotangents):
        args, ckpt = residuals
        dy, dh_final = cotangents
        x = args[0]
        dy = jnp.zeros_like(x) if isinstance(dy, SymbolicZero) else dy.astype(x.dtype)
        dh_final = None if isinstance(dh_final, SymbolicZero) else dh_final.astype(jnp.float32)
        grads = module(cfg).backward(dy, dh_final, *args, ckpt, cfg)
        return tuple(map(unvary_like, grads, args))

    scan.defvjp(scan_fwd, scan_bwd, symbolic_zeros=True)
    return scan
