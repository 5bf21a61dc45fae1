"""The specification: jax's tanh-approximated GELU of ``h + bias`` and its gradients, float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gelu(pre):
    return jax.nn.gelu(pre, approximate=True)


def backward(pre, g):
    """``(dpre, dbias)``: the pre-activation's gradient (``g``'s dtype; jax's GELU derivative in
    float32) and its sum over every axis but the last (float32)."""
    _, vjp = jax.vjp(gelu, pre.astype(jnp.float32))
    dpre = vjp(g.astype(jnp.float32))[0]
    return dpre.astype(g.dtype), dpre.reshape(-1, pre.shape[-1]).sum(0)
