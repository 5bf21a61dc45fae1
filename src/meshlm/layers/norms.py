"""Normalisation layers: LayerNorm and RMSNorm over the features, on ``pallas_kernels.layer_norm``.

Statistics are computed in float32 whatever the compute dtype (bfloat16 has too few mantissa bits
for a mean of squares over thousands of features), the variance as the mean of squared deviations
rather than ``E[x^2] - E[x]^2`` (which cancels catastrophically when the mean is large): the math
of Flax's ``LayerNorm(use_fast_variance=False)`` and ``RMSNorm``, whose parameter names and shapes
``Norm`` keeps (``scale``, ``bias``: ``(features,)``), so checkpoints and the HuggingFace mappings
are unchanged. The scale and bias carry the logical axis ``embed`` so the rule table shards them
with the residual stream. On a GPU the Triton kernels (named, or "auto" for LayerNorm) run per
device on its rows (``per_shard``), each holding whole feature vectors.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from meshlm.layers import per_shard
from pallas_kernels.layer_norm import layer_norm
from pallas_kernels.layer_norm.api import DISPATCH
from pallas_kernels.layer_norm.common import Call


def _embed_axis(init):
    return nn.with_logical_partitioning(init, ("embed",))


class Norm(nn.Module):
    """LayerNorm (``subtract_mean``, with a bias if ``use_bias``) or RMSNorm over the last axis,
    returned in ``dtype``."""

    subtract_mean: bool
    use_bias: bool
    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str = "auto"  # layer_norm's: "auto", "xla", "triton"
    interpret: bool = False

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param("scale", _embed_axis(nn.initializers.ones), features, self.param_dtype)
        bias = self.param("bias", _embed_axis(nn.initializers.zeros), features,
                          self.param_dtype) if self.use_bias else None

        impl = self.implementation
        if impl == "auto":  # resolved here: what "auto" keeps needs no shard_map
            call = Call(math.prod(x.shape[:-1]), 1, x.shape[-1], self.subtract_mean)
            impl = DISPATCH.choose(impl, call, interpret=False)[0]

        def norm(x, scale, bias):
            return layer_norm(x, scale, bias, subtract_mean=self.subtract_mean,
                              epsilon=self.epsilon, dtype=self.dtype, implementation=impl,
                              interpret=self.interpret)

        if not per_shard.runs_a_kernel(impl):
            return norm(x, scale, bias)
        # Rows split over the batch (and sequence) shards; each device holds whole features.
        rows = (("activation_batch", "activation_length") + (None,) * x.ndim)[:x.ndim - 1]
        return per_shard.per_shard(norm, [(x, (*rows, None)), (scale, (None,)), (bias, (None,))],
                                   (*rows, None))


def make_norm(kind: str, *, epsilon: float, use_bias: bool, dtype, param_dtype, name: str,
              implementation: str = "auto") -> nn.Module:
    """``kind`` is ``"layernorm"`` (GPT-2; bias follows ``use_bias``) or ``"rmsnorm"`` (LLaMA; no
    centring, no bias)."""
    if kind not in ("layernorm", "rmsnorm"):
        raise ValueError(f"unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'")
    layernorm = kind == "layernorm"
    return Norm(subtract_mean=layernorm, use_bias=layernorm and use_bias, epsilon=epsilon,
                dtype=dtype, param_dtype=param_dtype, implementation=implementation, name=name)
