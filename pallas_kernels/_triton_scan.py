"""``linear_recurrence``: ``h_t = a_t * h_{t-1} + b_t`` along one axis of a tile, inside a
Pallas Triton kernel, as one parallel scan (Triton's ``tt.scan``, what ``tl.associative_scan``
emits) with the combine ``(a1, b1), (a2, b2) -> (a1 * a2, a2 * b1 + b2)``.

Pallas lowers only ``cumsum`` to ``tt.scan``. This registers one more primitive with Pallas'
Triton lowering, through its lowering table and its scan builder (jax internals, at the pinned
jax), so that a kernel that needs the scan keeps the rest of Pallas. jax-triton would take the
scan as Triton source, but its 0.4 line needs triton >= 3.7 and the GPU image has 3.6. Outside a
Triton kernel (interpret mode, any backend) the primitive is ``lax.associative_scan``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax._src.pallas.triton import lowering as triton_lowering
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

linear_recurrence_p = Primitive("linear_recurrence")
linear_recurrence_p.multiple_results = True


def _combine(earlier, later):
    (a1, b1), (a2, b2) = earlier, later
    return a1 * a2, a2 * b1 + b2


def linear_recurrence(a, b, axis: int = 0):
    """``(prod, h)``: along ``axis``, ``prod_t = a_0 ... a_t`` and ``h_t = a_t h_{t-1} + b_t``
    from ``h_{-1} = 0`` (a state carried in adds ``prod_t * h_in``). ``a`` and ``b`` share one
    shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a and b must share shape and dtype, got {a.dtype}{a.shape} and "
                         f"{b.dtype}{b.shape}")
    return linear_recurrence_p.bind(a, b, axis=axis % a.ndim)


def _reference(a, b, *, axis):
    return lax.associative_scan(_combine, (a, b), axis=axis)


def _batched(args, dims, *, axis):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    a, b = (jnp.broadcast_to(x, (size, *x.shape)) if d is None
            else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims))
    return linear_recurrence_p.bind(a, b, axis=axis + 1), (0, 0)


def _triton_rule(ctx, a, b, *, axis):
    return triton_lowering._associative_scan_lowering(_combine, ctx, (a, b), (axis,))


linear_recurrence_p.def_impl(_reference)
linear_recurrence_p.def_abstract_eval(lambda a, b, *, axis: (a, b))
batching.primitive_batchers[linear_recurrence_p] = _batched
mlir.register_lowering(linear_recurrence_p, mlir.lower_fun(_reference, multiple_results=True))
triton_lowering.register_lowering(linear_recurrence_p)(_triton_rule)
