"""Sequence-to-sequence generation: encode once, then decode with two caches.

A seq2seq family's module has ``encode(tokens, positions, segment_ids) -> enc_out`` and
``decode(enc_out, tokens, enc_segment_ids, positions, segment_ids, decode=True)``, and its
config ``init_cache(model, batch, max_len, encoder_len)``: the decoding cache holds each decoder
layer's self-attention K/V and its cross-attention K/V, which the first cached call computes
from ``enc_out`` and every later call reuses. The decoder starts from the config's start token
and its steps drive the same loops as decoder-only models (``decode.sampling_loop``,
``beam.beam_search_loop``); for beams the cache rows (cross K/V included) are copied per beam.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.generate.beam import BeamResult, beam_search_loop, cache_batch_axes, check_beam_args
from meshlm.generate.decode import sampling_loop
from meshlm.generate.sampling import SamplingParams


def decoder_start(model: nn.Module, params, inputs: jax.Array, segment_ids: jax.Array | None,
                  start_id: int, max_new_tokens: int, rows_per_input: int = 1):
    """Encode ``inputs`` (batch, enc_len) and feed the start token: ``(step, logits, cache,
    make_cache)``. ``logits`` (batch, vocab) are the first new token's; ``step(cache, tokens)``
    decodes ``batch * rows_per_input`` rows (row ``b * rows_per_input + k`` reads input ``b``);
    ``make_cache(n)`` builds an empty cache of ``n`` rows (its leaves' batch axes)."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(inputs)
    batch, enc_len = inputs.shape
    enc_out = model.apply({"params": params}, inputs, None, segment_ids, method="encode")
    # Slots for the start token and every output token but the last (never fed back).
    make_cache = functools.partial(model.config.init_cache, model, max_len=max_new_tokens,
                                   encoder_len=enc_len)

    def decode(cache, tokens, enc_out, enc_segment_ids):
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, enc_out, tokens, enc_segment_ids, decode=True,
            method="decode", mutable=["cache"])
        return logits[:, -1], mutated["cache"]

    start = jnp.full((batch, 1), start_id, jnp.int32)
    logits, cache = decode(make_cache(batch), start, enc_out, segment_ids)  # fills cross K/V
    # Later steps read the cached cross K/V; enc_out only gives the (untaken) branch its shapes.
    rows = functools.partial(jnp.repeat, repeats=rows_per_input, axis=0)
    step = functools.partial(decode, enc_out=rows(enc_out), enc_segment_ids=rows(segment_ids))
    return step, logits, cache, make_cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_id",
                                             "start_id"))
def seq2seq_generate(model: nn.Module, params, inputs: jax.Array, rng: jax.Array, *,
                     start_id: int, max_new_tokens: int,
                     sampling: SamplingParams = SamplingParams(), eos_id: int | None = None,
                     segment_ids: jax.Array | None = None) -> jax.Array:
    """Sample (or, at temperature 0, greedily decode) ``max_new_tokens`` output tokens per row
    of ``inputs`` (batch, enc_len) int32; ``segment_ids`` 0 marks an input row's padding.
    Returns (batch, max_new_tokens) int32; after ``eos_id`` a row holds ``eos_id``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    step, logits, cache, _ = decoder_start(model, params, inputs, segment_ids, start_id,
                                           max_new_tokens)
    return sampling_loop(step, logits, cache, rng, max_new_tokens=max_new_tokens,
                         sampling=sampling, eos_id=eos_id)


def seq2seq_beam_search(model: nn.Module, params, inputs: jax.Array, *, start_id: int,
                        beam_width: int, max_new_tokens: int, length_penalty: float = 0.6,
                        eos_id: int | None = None,
                        segment_ids: jax.Array | None = None) -> BeamResult:
    """Beam search over the outputs of each row of ``inputs`` (see ``beam.py`` for the length
    penalty, the end-of-sequence rule and early stopping)."""
    check_beam_args(beam_width, max_new_tokens, length_penalty)
    return _seq2seq_beam_search(model, params, inputs, segment_ids, jnp.float32(length_penalty),
                                start_id=start_id, beam_width=beam_width,
                                max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("model", "start_id", "beam_width",
                                             "max_new_tokens", "eos_id"))
def _seq2seq_beam_search(model, params, inputs, segment_ids, length_penalty, *, start_id,
                         beam_width, max_new_tokens, eos_id):
    step, logits, cache, make_cache = decoder_start(model, params, inputs, segment_ids,
                                                    start_id, max_new_tokens, beam_width)
    return beam_search_loop(step, logits, cache, cache_batch_axes(make_cache),
                            beam_width=beam_width, max_new_tokens=max_new_tokens,
                            length_penalty=length_penalty, eos_id=eos_id)
