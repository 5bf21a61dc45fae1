"""The causal depthwise convolution of the Mamba mixers, with a decoding state and document resets.

Output step ``t`` of channel ``c`` is ``bias[c] + sum_k kernel[k, c] * x[t - (K - 1) + k, c]``:
``kernel[K - 1]`` weighs the current step, as PyTorch's ``Conv1d(groups=channels,
padding=K - 1)`` truncated to the input length does (HF's ``conv1d.weight[c, 0, k]`` is
``kernel[k, c]``). ``K`` is small (4), so the convolution is ``K`` shifted multiply-adds:
elementwise over channels, hence sharded like its input with no communication. The math is
``pallas_kernels.causal_conv1d``'s: its Triton kernel on a GPU (``"auto"``, or named), its
plain-JAX form elsewhere and for a decoding call continuing a state."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.layers import per_shard
from meshlm.sharding import ACTIVATION_AXES
from pallas_kernels.causal_conv1d import causal_conv1d, reference


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

    ``activation`` (None or ``"silu"``) is applied to the float32 sum, fused. Without a ``state``
    the convolution runs ``pallas_kernels.causal_conv1d`` with ``implementation`` /
    ``interpret`` (a named kernel runs per device on sharded activations; ``"auto"`` is the
    plain-JAX form); a call with a ``state`` (a decoding continuation) always takes the
    plain-JAX form.

    Params: ``kernel (K, *channels)`` with logical axes ``("conv", *channel_axes)`` and ``bias
    (*channels)`` with ``channel_axes``. Computed in float32, returned in ``dtype``.
    """

    kernel_size: int
    channel_axes: tuple[str | None, ...]
    use_bias: bool = True
    activation: str | None = None
    implementation: str = "auto"  # causal_conv1d's: "auto", "xla", "triton"
    interpret: bool = False
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
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(init, self.channel_axes),
                              channels, self.param_dtype)
        if state is None:
            y = self._convolve(x, kernel, bias, doc_pos)
            state = jnp.zeros((x.shape[0], K - 1, *channels), x.dtype)
        else:
            y = reference.causal_conv1d(x, kernel, bias, doc_pos, state=state,
                                        activation=self.activation)

        per_step = lambda mask: mask.reshape(mask.shape + (1,) * len(channels))
        # The last K - 1 inputs; entry j is K - 2 - j steps back.
        new_state = jnp.concatenate([state.astype(x.dtype), x], axis=1)[:, x.shape[1]:]
        if doc_pos is not None:
            keep = doc_pos[:, -1:] >= jnp.arange(K - 2, -1, -1)[None, :]  # (batch, K - 1)
            new_state = jnp.where(per_step(keep), new_state, jnp.zeros_like(new_state))
        return y.astype(self.dtype), new_state

    def _convolve(self, x, kernel, bias, doc_pos):
        """``causal_conv1d`` over the channels flattened to one axis; per device (``per_shard``)
        when it may run a kernel, each device convolving its own rows and channels."""
        channels = x.shape[2:]

        def conv(x, kernel, bias, doc_pos):
            flat = lambda v: None if v is None else v.reshape(*v.shape[:v.ndim - len(channels)], -1)
            y = causal_conv1d(flat(x), flat(kernel), flat(bias), doc_pos,
                              activation=self.activation, implementation=self.implementation,
                              interpret=self.interpret)
            return y.reshape(x.shape)

        if not per_shard.runs_a_kernel(self.implementation):
            return conv(x, kernel, bias, doc_pos)
        # The activations' logical names of the channel axes ("inner" -> "activation_inner").
        act = tuple(a if f"activation_{a}" not in ACTIVATION_AXES else f"activation_{a}"
                    for a in self.channel_axes)
        rows = ("activation_batch", None, *act)
        return per_shard.per_shard(conv, [
            (x, rows), (kernel, (None, *act)), (bias, act), (doc_pos, ("activation_batch", None))],
            rows)
