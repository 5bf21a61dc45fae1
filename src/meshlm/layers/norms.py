"""Normalisation layers: Flax's ``LayerNorm`` and ``RMSNorm`` with the settings meshlm relies on.

Statistics are computed in float32 whatever the compute dtype (Flax promotes them; bfloat16 has
too few mantissa bits for a mean of squares over thousands of features), the variance as the mean
of squared deviations rather than ``E[x^2] - E[x]^2`` (which cancels catastrophically when the
mean is large), and the scale and bias carry the logical axis ``embed`` so the rule table shards
them with the residual stream.
"""

from __future__ import annotations

import flax.linen as nn


def _embed_axis(init):
    return nn.with_logical_partitioning(init, ("embed",))


def make_norm(kind: str, *, epsilon: float, use_bias: bool, dtype, param_dtype,
              name: str) -> nn.Module:
    """``kind`` is ``"layernorm"`` (GPT-2; bias follows ``use_bias``) or ``"rmsnorm"`` (LLaMA; no
    centring, no bias)."""
    common = dict(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                  scale_init=_embed_axis(nn.initializers.ones), name=name)
    if kind == "layernorm":
        return nn.LayerNorm(use_bias=use_bias, bias_init=_embed_axis(nn.initializers.zeros),
                            use_fast_variance=False, **common)
    if kind == "rmsnorm":
        return nn.RMSNorm(**common)
    raise ValueError(f"unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'")
