"""``bias_gelu``: argument validation, choice of implementation, and the custom VJP.

The forward is plain JAX (``h + bias``, then the tanh GELU), which XLA folds into the producing
product's cuBLAS epilogue (writing the activation and the pre-activation), and the pre-activation
is the one residual: autodiff of the same ops also saves ``tanh(...)``, one more activation-sized
array written forward and read backward. The backward forms the pre-activation's gradient and
the bias gradient (its sum over rows) in one pass: XLA's fusion of ``reference.backward``, or a
lowering's kernel. The policy is ``_api.Dispatch``'s, the same for every op.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels._api import (Dispatch, Lowering, check_last_axis, load_lowering, shape_of,
                                 unvary_like)
from pallas_kernels.bias_gelu import common, reference

DISPATCH = Dispatch("pallas_kernels.bias_gelu", (Lowering("triton", "gpu"),))
IMPLEMENTATIONS = DISPATCH.names


def bias_gelu(h, bias=None, *, implementation: str = "auto", interpret: bool = False,
              tiles=None):
    """``jax.nn.gelu(h + bias, approximate=True)`` in ``h``'s dtype.

    Args:
      h: ``(..., features)``, bfloat16, float16 or float32 (a product's output).
      bias: ``(features,)`` or None.
      implementation: ``"auto"``, ``"xla"`` (``reference``) or ``"triton"`` (the backward as one
        kernel); ``"auto"`` is XLA until the kernel is timed (``triton.auto_declines``). The
        kernel is a custom call that XLA's partitioner cannot split: with ``h`` sharded, call it
        per device (``meshlm.layers.per_shard``).
      interpret: run a named Pallas lowering in interpret mode (CPU tests).
      tiles: ``bias_gelu.triton.Tiles`` for ``implementation="triton"``.

    Raises:
      ValueError: naming the violated constraint.
    """
    check_last_axis(h, "h", "features")
    features = h.shape[-1]
    if bias is not None and getattr(bias, "shape", None) != (features,):
        raise ValueError(f"bias must have shape (features,) = ({features},), got "
                         f"{shape_of(bias)}")
    call = common.Call(h.size // features, features)
    cfg = DISPATCH.configure(implementation, call, interpret=bool(interpret), tiles=tiles,
                             xla=common.Config("xla"), empty=call.rows == 0)
    return _bias_gelu(cfg, h, bias)


def _pre(h, bias):
    return h if bias is None else h + bias.astype(h.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bias_gelu(cfg, h, bias):
    return reference.gelu(_pre(h, bias))


def _fwd(cfg, h, bias):
    pre = _pre(h, bias)
    return reference.gelu(pre), (pre, bias)


def _bwd(cfg, residuals, g):
    pre, bias = residuals
    if cfg.implementation == "xla":
        dpre, dbias = reference.backward(pre, g)
    else:
        module = load_lowering(DISPATCH.package, cfg.implementation)[0]
        features = pre.shape[-1]
        dpre, dbias = module.backward(pre.reshape(-1, features), g.reshape(-1, features), cfg)
        dpre = dpre.reshape(pre.shape)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return unvary_like(dpre, pre), unvary_like(dbias, bias)


_bias_gelu.defvjp(_fwd, _bwd)
