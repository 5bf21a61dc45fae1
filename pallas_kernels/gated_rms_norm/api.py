"""``gated_rms_norm``: argument validation, choice of implementation, and the custom VJP.

XLA computes this norm's backward in several passes over ``y``, ``z`` and the output gradient
(a per-row reduction, then the elementwise gradients with a column reduction for ``scale``); the
Triton kernel holds a block of rows in registers and does each direction in one pass. The
policy is ``_api.Dispatch``'s, the same for every op.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._api import Dispatch, Lowering, load_lowering, recomputing_op, shape_of
from pallas_kernels.gated_rms_norm import reference
from pallas_kernels.layer_norm.common import Call, check_parameters

DISPATCH = Dispatch("pallas_kernels.gated_rms_norm", (Lowering("triton", "gpu"),))
IMPLEMENTATIONS = DISPATCH.names
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def gated_rms_norm(y, z, scale, *, groups: int = 1, epsilon: float = 1e-5, dtype=None,
                   implementation: str = "auto", interpret: bool = False, tiles=None):
    """``scale * rmsnorm(y * silu(z))`` over groups of ``features // groups`` channels.

    Args:
      y, z: ``(..., features)``, same shape and dtype (bfloat16, float16 or float32).
      scale: ``(features,)`` float.
      groups: the last axis splits into this many groups, each normalised on its own (Mamba-2's
        ``norm_before_gate=False`` norm with ``n_groups``).
      epsilon: added to the mean square.
      dtype: of the result; None takes y's. Statistics and products are float32.
      implementation: ``"auto"``, ``"xla"`` (``reference``) or ``"triton"``; ``"auto"`` takes
        Triton on a GPU target, else ``"xla"``.
      interpret: run a named Pallas lowering in interpret mode (CPU tests).
      tiles: ``gated_rms_norm.triton.Tiles`` for ``implementation="triton"``.

    Raises:
      ValueError: naming the violated constraint.
    """
    if getattr(y, "ndim", 0) < 1 or getattr(z, "shape", None) != y.shape:
        raise ValueError(f"y and z must be arrays of one shape (..., features), got "
                         f"{shape_of(y)} and {shape_of(z)}")
    if y.dtype not in _DTYPES or z.dtype != y.dtype:
        raise ValueError(f"y and z must share a dtype among bfloat16, float16, float32, got "
                         f"{y.dtype} and {z.dtype}")
    features = y.shape[-1]
    if features < 1:
        raise ValueError(f"y must have at least one feature (last axis), got shape {y.shape}")
    check_parameters(features, epsilon, scale)
    if not isinstance(groups, int) or groups < 1 or features % groups:
        raise ValueError(f"groups must be a positive int dividing features ({features}), got "
                         f"{groups!r}")
    dtype = jnp.dtype(y.dtype if dtype is None else dtype)
    rows = y.size // features
    call = Call(rows, groups, features // groups)
    name, tiles = DISPATCH.choose(implementation, call, interpret=bool(interpret), tiles=tiles)
    if name == "xla" or rows == 0:
        return reference.gated_rms_norm(y, z, scale, groups=groups, epsilon=epsilon, dtype=dtype)
    module = load_lowering(DISPATCH.package, name)[0]
    cfg = module.config(call, tiles, float(epsilon), dtype, bool(interpret))
    out = _kernel_norm(cfg, y.reshape(rows, groups, -1), z.reshape(rows, groups, -1),
                       scale.reshape(groups, -1))
    return out.reshape(y.shape)


_kernel_norm = recomputing_op(DISPATCH.package)
