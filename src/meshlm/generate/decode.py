"""Autoregressive sampling with a cache: one jitted prefill + while-loop decode.

The prompt fills the cache in one call (prefill); each later step feeds the last sampled token at
its position and reads one row of logits, so a step costs O(length) instead of O(length^2). The
loop (``sampling_loop``) takes any step function, so seq2seq decoding reuses it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.generate.sampling import SamplingParams, sample


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_id"))
def generate(
    model: nn.Module,
    params,
    prompt: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    eos_id: int | None = None,
) -> jax.Array:
    """Continue each row of ``prompt`` (batch, prompt_len) int32 by ``max_new_tokens`` tokens.

    Returns the new tokens, (batch, max_new_tokens) int32. A row that emits ``eos_id`` keeps
    emitting it, and the loop ends early once every row has.
    """
    batch, prompt_len = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cache = model.config.init_cache(model, batch, prompt_len + max_new_tokens)

    def step(cache, tokens):  # positions: the model continues from the tokens it has cached
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"],
        )
        return logits[:, -1], mutated["cache"]

    logits, cache = step(cache, prompt)
    return sampling_loop(step, logits, cache, rng, max_new_tokens=max_new_tokens,
                         sampling=sampling, eos_id=eos_id)


def sampling_loop(step, logits: jax.Array, cache, rng: jax.Array, *, max_new_tokens: int,
                  sampling: SamplingParams, eos_id: int | None) -> jax.Array:
    """Sample ``max_new_tokens`` tokens per row from the first step's ``logits`` (batch, vocab)
    and the ``cache`` that produced them; ``step(cache, tokens (batch, 1)) -> (logits, cache)``
    decodes one more token (any model: decoder-only, or a seq2seq decoder). Traceable."""
    batch = logits.shape[0]
    rng, key = jax.random.split(rng)
    first = sample(logits, key, sampling)
    # With an EOS, slots the loop never writes (every row stopped early) already hold it.
    fill = 0 if eos_id is None else eos_id
    out = jnp.full((batch, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((batch,), bool) if eos_id is None else first == eos_id

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, out, done, rng = carry
        logits, cache = step(cache, token[:, None])
        rng, key = jax.random.split(rng)
        nxt = sample(logits, key, sampling)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        return i + 1, nxt, cache, out.at[:, i].set(nxt), done, rng

    *_, out, _, _ = jax.lax.while_loop(cond, body, (1, first, cache, out, done, rng))
    return out
