"""The specification: ``log sum exp(logits) - logits[target]`` per row, float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def forward(logits, targets):
    """``(ce, lse)`` per row of ``logits (..., vocab)`` and integer ``targets (...)``."""
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
    return lse - picked, lse
