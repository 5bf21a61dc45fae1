"""The plain-JAX causal depthwise convolution: the ``"xla"`` implementation, the test oracle of
the kernels, and (with ``state``) the decoding form of ``meshlm``'s ``CausalConv1d``.

Output step ``t`` of channel ``c`` is ``act(bias[c] + sum_k kernel[k, c] * x[t - (K - 1 - k), c])``
in float32: ``kernel[K - 1]`` weighs the current step. A tap reading before the sequence start
reads ``state`` (zeros when None); with ``doc_pos`` (steps since the token's document began) a
tap reaching ``K - 1 - k`` steps back reads zero unless ``doc_pos[t] >= K - 1 - k``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def causal_conv1d(x, kernel, bias=None, doc_pos=None, *, state=None, activation=None):
    """``x (batch, length, *channels)``, ``kernel (K, *channels)``, ``bias (*channels)``,
    ``doc_pos (batch, length)`` int, ``state (batch, K - 1, *channels)`` (the inputs before
    ``x``); returns ``y`` like ``x``, computed in float32."""
    K, (batch, length), channels = kernel.shape[0], x.shape[:2], x.shape[2:]
    if state is None:
        state = jnp.zeros((batch, K - 1, *channels), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # step t at index t + K - 1
    per_step = lambda mask: mask.reshape(mask.shape + (1,) * len(channels))
    y = jnp.zeros(x.shape, f32)
    for k in range(K):  # tap k reads K - 1 - k steps back
        tap = padded[:, k:k + length].astype(f32)
        if doc_pos is not None:
            tap = jnp.where(per_step(doc_pos >= K - 1 - k), tap, 0.0)
        y = y + tap * kernel[k].astype(f32)
    if bias is not None:
        y = y + bias.astype(f32)
    return activate(y, activation).astype(x.dtype)


def activate(y, activation):
    """``silu(y)`` or ``y`` (``activation`` None)."""
    return jax.nn.silu(y) if activation == "silu" else y
