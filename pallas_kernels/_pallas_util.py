"""Small ``pallas_call`` plumbing that the kernels of every operation share."""

from __future__ import annotations

import jax
from jax.sharding import ManualAxisType


class Refs:
    """Names a kernel's positional refs; absent optional operands are None."""

    def __init__(self, refs, names):
        refs = iter(refs)
        for name, present in names:
            setattr(self, name, next(refs) if present else None)
        assert next(refs, None) is None, "more refs than names"


def operands(named):
    """``(flags, arrays, specs)`` from ``[(name, array or None, spec)]``: only present operands
    are passed to the kernel, and the static ``flags`` tell ``Refs`` which ones those were."""
    flags = tuple((name, a is not None) for name, a, _ in named)
    present = [(a, s) for _, a, s in named if a is not None]
    return flags, [a for a, _ in present], [s for _, s in present]


def out_type(shape, dtype, *inputs):
    """A ``pallas_call`` result type; inside ``shard_map`` it must name the mesh axes it varies
    over: every axis that any input varies over."""
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=varying))
