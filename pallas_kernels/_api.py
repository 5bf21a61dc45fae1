"""Argument checks and lowering loading that every operation's ``api`` module shares."""

from __future__ import annotations

import functools
import importlib
import numbers

import jax


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
