"""T5's bucketed relative position bias (Raffel et al. 2020, section 2.1).

Each head learns one scalar per bucket of the key-minus-query offset: offsets below
``num_buckets / 2`` (per direction when bidirectional) get a bucket each, larger ones share
logarithmically wider buckets up to ``max_distance``, beyond which all offsets share the last.
One table serves every layer of a stack; the bias is added to the attention scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """Bucket (int32) of each ``key_position - query_position``.

    Bidirectional: half the buckets for keys after the query, half for keys at or before it.
    Unidirectional (causal): keys after the query share bucket 0 (they are masked anyway). The
    logarithm is taken in float32, as T5's Mesh TensorFlow and HuggingFace implementations do, so
    bucket edges agree with their checkpoints.
    """
    rel = relative_position.astype(jnp.int32)
    bucket = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(rel)
    else:
        distance = jnp.maximum(-rel, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Clamped to 1 inside the log only to avoid log(0) in the branch ``is_small`` discards.
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """A ``(num_buckets, heads)`` table -> the float32 bias ``(batch, heads, q_len, k_len)`` for
    query positions ``(batch, q_len)`` and key positions ``(batch, k_len)`` (positions restart
    in every packed segment, so offsets are taken within a document)."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    param_dtype: Any = jnp.float32
    embedding_init: Callable[..., jax.Array] = nn.initializers.normal(1.0)

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        table = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, (None, "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)
        rel = k_positions[:, None, :] - q_positions[:, :, None]
        buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # (B, Lq, Lk, H)
        return jnp.transpose(bias, (0, 3, 1, 2))
