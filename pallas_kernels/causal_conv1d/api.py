"""``causal_conv1d``: argument validation, choice of implementation, and the custom VJP.

The Triton lowering is imported lazily: if its module fails to import, ``"auto"`` skips it and
naming it raises a ``ValueError``; the policy is ``_api.Dispatch``'s, the same for every op.
``"xla"`` is the plain-JAX form (``reference.causal_conv1d``), also the kernels' test oracle.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._api import Dispatch, Lowering, load_lowering, recomputing_op, shape_of
from pallas_kernels.causal_conv1d import reference
from pallas_kernels.causal_conv1d.common import Call

# Fastest first: "auto" takes the first that runs natively on the target and supports the call.
DISPATCH = Dispatch("pallas_kernels.causal_conv1d", (Lowering("triton", "gpu"),))
IMPLEMENTATIONS = DISPATCH.names
ACTIVATIONS = (None, "silu")
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def causal_conv1d(x, kernel, bias=None, doc_pos=None, *, activation=None,
                  implementation: str = "auto", interpret: bool = False, tiles=None):
    """Depthwise causal convolution over the steps of ``x``, ``activation`` fused.

    Args:
      x: ``(batch, length, channels)``, bfloat16, float16 or float32.
      kernel: ``(K, channels)`` float; ``kernel[K - 1]`` weighs the current step, ``kernel[k]``
        the step ``K - 1 - k`` before (PyTorch's ``Conv1d(groups=channels, padding=K - 1)``).
      bias: ``(channels,)`` float or None.
      doc_pos: ``(batch, length)`` int, steps since the start of the token's document: a tap
        reaching further back reads zero, so packed documents do not see each other. None: one
        document per row. Steps before the row's start read zero either way.
      activation: None or ``"silu"``, applied to the float32 sum before the cast.
      implementation: ``"auto"``, ``"xla"`` (plain JAX, autodiff gradients) or ``"triton"``.
        ``"auto"`` is ``"triton"`` on a GPU (forward and backward measured faster than XLA's
        fusions), else ``"xla"``.
      interpret: run ``"triton"`` in interpret mode (CI on CPU); never changes what ``"auto"``
        picks.
      tiles: ``triton.Tiles(block_t, block_c, num_warps)`` with ``implementation="triton"``;
        None takes the target device's default.

    Returns:
      ``y`` like ``x``, computed in float32. Gradients flow to ``x``, ``kernel`` and ``bias``.

    Raises:
      ValueError: naming the violated constraint.
    """
    _check(x, kernel, bias, doc_pos, activation)
    call = Call(tuple(x.shape), kernel.shape[0], bias is not None, doc_pos is not None,
                activation)
    name, tiles = DISPATCH.choose(implementation, call, interpret=bool(interpret), tiles=tiles)
    if name == "xla":
        return reference.causal_conv1d(x, kernel, bias, doc_pos, activation=activation)
    cfg = load_lowering(DISPATCH.package, name)[0].config(call, tiles, bool(interpret))
    if doc_pos is not None:
        doc_pos = doc_pos.astype(jnp.int32)
    return _kernel_conv(cfg, x, kernel, bias, doc_pos)


def _check(x, kernel, bias, doc_pos, activation):
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must be (batch, length, channels), got shape {shape_of(x)}")
    if min(x.shape) < 1:
        raise ValueError(f"all dimensions of x must be >= 1, got {x.shape}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    channels = x.shape[2]
    if (getattr(kernel, "ndim", None) != 2 or kernel.shape[1] != channels
            or kernel.shape[0] < 1):
        raise ValueError(f"kernel must be (K, channels) with K >= 1 and channels = {channels}, "
                         f"got {shape_of(kernel)}")
    if bias is not None and getattr(bias, "shape", None) != (channels,):
        raise ValueError(f"bias must be (channels,) = ({channels},), got {shape_of(bias)}")
    for name, v in (("kernel", kernel), ("bias", bias)):
        if v is not None and not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got {v.dtype}")
    if doc_pos is not None and (getattr(doc_pos, "shape", None) != x.shape[:2]
                                or not jnp.issubdtype(doc_pos.dtype, jnp.integer)):
        raise ValueError(f"doc_pos must be an int (batch, length) = {x.shape[:2]} array, got "
                         f"{getattr(doc_pos, 'dtype', '')}{shape_of(doc_pos)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


_kernel_conv = recomputing_op(DISPATCH.package)
