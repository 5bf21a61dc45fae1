"""Flash attention through cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``).

Not a Pallas kernel: cuDNN's fused attention, forward and backward, as JAX exposes it, so it has
no interpret mode and no tiles, and ``"auto"`` never picks it (which calls it supports depends on
the installed cuDNN, found out only when it compiles; the Pallas kernels need no such guess). It
has no segment-id or query-offset argument: those become an explicit boolean mask ``(batch, 1,
q_len, kv_len)``, which cuDNN turns into an additive bias (slower than its built-in causal mask,
but exact). A causal call with ``q_offset = 0`` and equal lengths uses the built-in mask, and a
sliding window its built-in window, unless a mask is needed anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._api import gpu_arch
from pallas_kernels.flash_attention.common import AttentionSpec, Call

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(call: Call, tiles: None) -> str | None:
    """None when cuDNN's fused attention takes the call, as far as it can be told before it
    compiles, else the reason."""
    del tiles
    spec = call.spec
    if jnp.dtype(call.dtype) not in _DTYPES:
        return f"dtype must be bfloat16 or float16, got {jnp.dtype(call.dtype)}"
    arch = gpu_arch() or ""
    max_head_dim = 256 if arch[:1].isdigit() and float(arch) >= 9 else 128
    if call.head_dim % 8 or call.head_dim > max_head_dim:
        return f"head_dim must be a multiple of 8 and <= {max_head_dim}, got {call.head_dim}"
    if spec.has_alibi:
        return "cuDNN takes no ALiBi slopes"
    if spec.has_relative_bias:
        return "cuDNN takes no relative position bias here (the Triton lowering has it)"
    if spec.logits_soft_cap is not None:
        return "cuDNN has no logit soft-capping"
    if call.return_lse:
        return "jax.nn.dot_product_attention returns no log-sum-exp (return_lse)"
    return None


def attention(q, k, v, q_seg, kv_seg, spec: AttentionSpec):
    """``out`` like ``q``; differentiable by JAX (cuDNN's backward kernel). A query that sees no
    key gets zeros (and zero gradients), as from the other implementations."""
    q_len, kv_len = q.shape[1], k.shape[1]
    built_in = spec.causal and spec.q_offset == 0 and q_len == kv_len
    mask = None
    if q_seg is not None:
        mask = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
    window = spec.sliding_window
    if spec.causal and (not built_in or (mask is not None and window is not None)):
        q_pos = spec.q_offset + jnp.arange(q_len)[:, None]
        k_pos = jnp.arange(kv_len)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        mask = visible[None, None] if mask is None else mask & visible
        window = None
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=spec.scale, is_causal=built_in,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn",
    )
    if mask is None:  # every query sees at least itself
        return out
    if built_in:  # the keys a query sees are also under the built-in causal mask
        mask = mask & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])
    sees_a_key = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # (batch, q_len, 1, 1)
    return jnp.where(sees_a_key, out, jnp.zeros_like(out))
