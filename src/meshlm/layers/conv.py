"""The causal depthwise convolution of the Mamba mixers, with a decoding state and document resets.

Output step ``t`` of channel ``c`` is ``bias[c] + sum_k kernel[k, c] * x[t - (K - 1) + k, c]``:
``kernel[K - 1]`` weighs the current step, as PyTorch's ``Conv1d(groups=channels,
padding=K - 1)`` truncated to the input length does (HF's ``conv1d.weight[c, 0, k]`` is
``kernel[k, c]``). ``K`` is small (4), so the convolution is ``K`` shifted multiply-adds:
elementwise over channels, hence sharded like its input with no communication.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def uniform_init(bound: float):
    """``U(-bound, bound)``, PyTorch's default for ``Conv1d``/``Linear`` with ``bound =
    fan_in**-0.5``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over axis 1 of ``x (batch, length, *channels)``.

    ``__call__(x, state=None, doc_pos=None) -> (y, new_state)``:

    - ``state (batch, K - 1, *channels)``: the inputs of the ``K - 1`` steps before ``x`` (zeros
      when None: the sequence starts here). ``new_state`` is the same for the steps after ``x``,
      what the next call continues from (decoding is then O(1) per token).
    - ``doc_pos (batch, length)`` int: how many steps step ``t`` is past the start of its document
      (0 at the first token; large when the document began before this call). Taps reaching
      further back read zero, so no document sees its predecessor. ``new_state`` has the taps
      before the last token's document zeroed, so a continuation needs no positions from before.

    Params: ``kernel (K, *channels)`` with logical axes ``("conv", *channel_axes)`` and ``bias
    (*channels)`` with ``channel_axes``. Computed in float32, returned in ``dtype``.
    """

    kernel_size: int
    channel_axes: tuple[str | None, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, state=None, doc_pos=None):
        K = self.kernel_size
        channels = x.shape[2:]
        if len(channels) != len(self.channel_axes):
            raise ValueError(
                f"x has channel dims {channels} but channel_axes names {len(self.channel_axes)}"
            )
        init = uniform_init(1.0 / math.sqrt(K))  # fan_in of a depthwise filter is K
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, ("conv", *self.channel_axes)),
            (K, *channels), self.param_dtype)
        batch, length = x.shape[:2]
        if state is None:
            state = jnp.zeros((batch, K - 1, *channels), x.dtype)
        padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # step t at index t + K - 1

        per_step = lambda mask: mask.reshape(mask.shape + (1,) * len(channels))
        y = jnp.zeros(x.shape, jnp.float32)
        for k in range(K):  # tap k reads K - 1 - k steps back
            tap = padded[:, k:k + length].astype(jnp.float32)
            if doc_pos is not None:
                tap = jnp.where(per_step(doc_pos >= K - 1 - k), tap, 0.0)
            y = y + tap * kernel[k].astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(init, self.channel_axes),
                              channels, self.param_dtype)
            y = y + bias.astype(jnp.float32)

        new_state = padded[:, length:]  # the last K - 1 inputs; entry j is K - 2 - j steps back
        if doc_pos is not None:
            keep = doc_pos[:, -1:] >= jnp.arange(K - 2, -1, -1)[None, :]  # (batch, K - 1)
            new_state = jnp.where(per_step(keep), new_state, jnp.zeros_like(new_state))
        return y.astype(self.dtype), new_state
