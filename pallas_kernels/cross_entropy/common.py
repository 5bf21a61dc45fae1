"""What the cross-entropy implementations share: the call's static shape, the kernel
configuration and the backward's value (one elementwise pass: XLA's, and the reference of each
lowering's backward kernel)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp


class Call(NamedTuple):
    rows: int  # every axis but the last, flattened
    vocab: int


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) description of one call; the custom VJP's nondiff argument."""

    implementation: str
    block_v: int = 0  # Triton: vocabulary entries per loop step
    num_warps: int = 0
    num_stages: int = 1
    interpret: bool = False


def backward(logits, lse, targets, g):
    """``d ce / d logits * g = (softmax(logits) - onehot(target)) * g`` in ``logits``' dtype, from
    the forward's float32 log-sum-exp (one pass over the logits, nothing else kept)."""
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return ((probs - onehot) * g[..., None]).astype(logits.dtype)
