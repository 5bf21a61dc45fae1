"""T5's bucketed relative position bias (Raffel et al. 2020, section 2.1).

Each head learns one scalar per bucket of the key-minus-query offset: offsets below
``num_buckets / 2`` (per direction when bidirectional) get a bucket each, larger ones share
logarithmically wider buckets up to ``max_distance``, beyond which all offsets share the last.
One table serves every layer of a stack; the bias is added to the attention scores. The bucket
function is ``pallas_kernels``' (``RelativeBuckets``), which the flash-attention kernels also
compute inside, so the materialised bias here and the kernels' agree bucket for bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import RelativeBuckets


class RelativePositionBias(nn.Module):
    """A ``(num_buckets, heads)`` table -> the float32 bias ``(batch, heads, q_len, k_len)`` for
    query positions ``(batch, q_len)`` and key positions ``(batch, k_len)`` (positions restart
    in every packed segment, so offsets are taken within a document). ``table()`` and
    ``buckets`` are what a flash-attention kernel that adds the bias itself takes instead."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    param_dtype: Any = jnp.float32
    embedding_init: Callable[..., jax.Array] = nn.initializers.normal(1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, (None, "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)

    @property
    def buckets(self) -> RelativeBuckets:
        return RelativeBuckets(self.num_buckets, self.bidirectional, self.max_distance)

    def table(self) -> jax.Array:
        """The float32 ``(num_buckets, heads)`` table."""
        return self.embedding.astype(jnp.float32)

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        rel = k_positions[:, None, :] - q_positions[:, :, None]
        bias = jnp.take(self.table(), self.buckets.bucket(rel), axis=0)  # (B, Lq, Lk, H)
        return jnp.transpose(bias, (0, 3, 1, 2))
