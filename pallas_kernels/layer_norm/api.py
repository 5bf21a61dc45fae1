"""``layer_norm``: argument validation, choice of implementation, and the custom VJP.

XLA computes a norm's backward in several passes over ``x`` and the output gradient, and writes
``dout * x_hat`` in float32 to reduce it for the scale gradient; the Triton kernels hold a block
of rows in registers and do each direction in one pass. The policy is ``_api.Dispatch``'s, the
same for every op.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._api import (Dispatch, Lowering, check_last_axis, load_lowering,
                                 recomputing_op)
from pallas_kernels.layer_norm import reference
from pallas_kernels.layer_norm.common import Call, check_parameters

DISPATCH = Dispatch("pallas_kernels.layer_norm", (Lowering("triton", "gpu"),))
IMPLEMENTATIONS = DISPATCH.names


def layer_norm(x, scale, bias=None, *, subtract_mean: bool = True, epsilon: float = 1e-5,
               dtype=None, implementation: str = "auto", interpret: bool = False, tiles=None):
    """``scale * (x - mean) / sqrt(var + epsilon) + bias`` over the last axis; with
    ``subtract_mean=False``, RMSNorm: ``scale * x / sqrt(mean(x^2) + epsilon) (+ bias)``.

    Args:
      x: ``(..., features)``, bfloat16, float16 or float32.
      scale: ``(features,)`` float.
      bias: ``(features,)`` float or None.
      subtract_mean: LayerNorm (True) or RMSNorm (False).
      epsilon: added to the variance (the mean square).
      dtype: of the result; None takes x's. Statistics and products are float32.
      implementation: ``"auto"``, ``"xla"`` (``reference``) or ``"triton"``; ``"auto"`` takes
        Triton on a GPU for LayerNorm, else ``"xla"`` (``triton.auto_declines``).
      interpret: run a named Pallas lowering in interpret mode (CPU tests).
      tiles: ``layer_norm.triton.Tiles`` for ``implementation="triton"``.

    Raises:
      ValueError: naming the violated constraint.
    """
    check_last_axis(x, "x", "features")
    features = x.shape[-1]
    check_parameters(features, epsilon, scale, bias=bias)
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    rows = x.size // features
    call = Call(rows, 1, features, bool(subtract_mean))
    name, tiles = DISPATCH.choose(implementation, call, interpret=bool(interpret), tiles=tiles)
    if name == "xla" or rows == 0:
        return reference.layer_norm(x, scale, bias, subtract_mean=bool(subtract_mean),
                                    epsilon=epsilon, dtype=dtype)
    module = load_lowering(DISPATCH.package, name)[0]
    cfg = module.config(call, tiles, float(epsilon), dtype, bool(interpret))
    row = lambda v: None if v is None else v.reshape(1, features)
    out = _kernel_norm(cfg, x.reshape(rows, 1, features), row(scale), row(bias))
    return out.reshape(x.shape)


_kernel_norm = recomputing_op(DISPATCH.package)
