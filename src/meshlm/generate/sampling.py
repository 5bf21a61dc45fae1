"""Token sampling from logits: greedy, temperature, top-k and nucleus (top-p), composable."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # NaN compares false with everything, so "< 0" alone would let it through to sample
        # NaN logits; infinity would divide every logit to 0 (a uniform draw, never intended).
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k / the top-p nucleus at -inf."""
    if params.top_k > logits.shape[-1]:
        raise ValueError(
            f"top_k={params.top_k} exceeds the vocabulary of {logits.shape[-1]} tokens "
            "(0 = off)"
        )
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Mass strictly before each token: a token is kept while that is below p, so the most
        # likely token always survives.
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(before < params.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, rng: jax.Array, params: SamplingParams) -> jax.Array:
    """Draw one token id per row of ``logits`` (..., vocab) -> (...) int32."""
    if params.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, params), axis=-1).astype(jnp.int32)
