"""Beam search over any decoding cache: the model-agnostic loop and its decoder-LM entry point.

The loop keeps, per batch row, ``beam_width`` *alive* hypotheses (no end-of-sequence yet) and
the ``beam_width`` best *finished* ones. Each step scores every (alive beam, token) extension,
moves those ending in ``eos_id`` to the finished set (scored with the length penalty) and keeps
the best others alive; the cache is then gathered by each new beam's source beam. The cache is
any pytree whose leaves carry the batch on some axis (KV caches, recurrent states, stacked over
layers or not) or carry no batch at all (cache indices): ``cache_batch_axes`` finds which.

Length penalty: GNMT's ``((5 + length) / 6) ** alpha`` (Wu et al. 2016, as in T5X), where
``length`` counts the generated tokens including the end-of-sequence token. A finished
hypothesis scores ``sum of token log-probs / penalty``; ``alpha = 0`` ranks by log-probability
alone, ``alpha > 0`` favours longer outputs.

Early stopping is exact: a row is done once its finished set is full and no alive beam can
reach its worst finished score (log-probs only fall as a hypothesis grows, so an alive beam's
best reachable score is its log-prob over the largest penalty still ahead). Stopping never
changes the result; the loop ends when every row is done or ``max_new_tokens`` are generated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# (cache, tokens (n, 1) int32) -> (logits (n, vocab), cache): one decoding step of n rows.
StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


class BeamResult(NamedTuple):
    """Per batch row, ``beam_width`` hypotheses best first. ``tokens`` (batch, beam,
    max_new_tokens) int32: after an ``eos_id`` every slot holds ``eos_id``. ``scores`` (batch,
    beam) float32: log-probability over the length penalty (-inf where fewer hypotheses exist
    than beams, e.g. a tiny vocabulary)."""

    tokens: jax.Array
    scores: jax.Array


def length_penalty_factor(length, alpha: float):
    """GNMT's ``((5 + length) / 6) ** alpha``: the divisor of a hypothesis' log-probability."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def check_beam_args(beam_width: int, max_new_tokens: int, length_penalty: float) -> None:
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(length_penalty):
        raise ValueError(
            f"length_penalty must be a finite number (0 = rank by log-probability alone), got "
            f"{length_penalty}"
        )


def cache_batch_axes(make_cache: Callable[[int], Any]) -> list[int | None]:
    """The batch axis of each leaf (in ``jax.tree.leaves`` order) of the caches that
    ``make_cache(batch_size)`` builds, None for a leaf without one: the axis whose size follows
    the batch size (shapes only, nothing is computed)."""
    one, two = (jax.tree.leaves(jax.eval_shape(functools.partial(make_cache, n)))
                for n in (1, 2))
    axes = []
    for a, b in zip(one, two):
        differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(differ) > 1:
            raise ValueError(f"a cache leaf {a.shape} -> {b.shape} has more than one batch axis")
        axes.append(differ[0] if differ else None)
    return axes


def gather_rows(cache: Any, batch_axes: list[int | None], rows: jax.Array) -> Any:
    """``cache`` with each leaf's batch axis indexed by ``rows`` (n,) (repeats allowed, so the
    result may have another batch size); leaves without a batch axis are kept."""
    leaves, tree = jax.tree.flatten(cache)
    return tree.unflatten([leaf if ax is None else jnp.take(leaf, rows, axis=ax)
                           for leaf, ax in zip(leaves, batch_axes)])


def beam_search_loop(step: StepFn, logits: jax.Array, cache: Any, batch_axes: list[int | None],
                     *, beam_width: int, max_new_tokens: int,
                     length_penalty: float | jax.Array, eos_id: int | None) -> BeamResult:
    """Beam search from the first step's ``logits`` (batch, vocab) and the ``cache`` (batch
    rows) that produced them; ``step`` decodes ``batch * beam_width`` rows (row ``b * beam_width
    + k`` is beam ``k`` of batch row ``b``). Traceable: call it inside ``jit``."""
    batch, vocab = logits.shape
    beam = beam_width
    n_cand = min(2 * beam, beam * vocab)  # 2 * beam: >= beam of them do not end the sequence
    neg_inf = jnp.array(-jnp.inf, jnp.float32)
    fill = 0 if eos_id is None else eos_id
    row = jnp.arange(batch)[:, None]

    def penalised(logp, length):
        return logp / length_penalty_factor(length, length_penalty)

    def cond(carry):
        t, done = carry[0], carry[-1]
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, logits, cache, seqs, logp, fin_seqs, fin_scores, _ = carry
        # Every (beam, token) extension, flattened; the n_cand best by log-probability.
        total = logp[:, :, None] + jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        cand_logp, flat = jax.lax.top_k(total.reshape(batch, beam * vocab), n_cand)
        source, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        # (batch, n_cand, max_new); the slots after t still hold the fill (eos_id).
        cand_seqs = seqs[row, source].at[:, :, t].set(token)
        ends = (token == eos_id) if eos_id is not None else jnp.zeros_like(token, bool)
        # An end among the best ``beam`` candidates finishes a hypothesis; one ranked below
        # them is dropped (as fairseq and HF do): a search of width 1 is greedy search.
        finishes = ends & (jnp.arange(n_cand) < beam)

        # Finished: the old ones and the candidates that end here, the best beam of them.
        new_scores = jnp.where(finishes, penalised(cand_logp, t + 1), neg_inf)
        pool_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
        fin_scores, pick = jax.lax.top_k(pool_scores, beam)
        fin_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)[row, pick]

        # Alive: the best beam of the candidates that do not end (top_k is stable, so ties keep
        # the lower candidate: beam width 1 picks greedy's argmax token).
        logp, pick = jax.lax.top_k(jnp.where(ends, neg_inf, cand_logp), beam)
        seqs, source = cand_seqs[row, pick], source[row, pick]
        cache = gather_rows(cache, batch_axes, (row * beam + source).reshape(-1))
        # The next step's logits, unless this was the last token (its step would need one more
        # cache slot than the tokens fed, and compute logits nobody reads).
        logits, cache = jax.lax.cond(
            t + 1 < max_new_tokens,
            lambda c: step(c, seqs[:, :, t].reshape(batch * beam, 1)),
            lambda c: (logits.reshape(batch * beam, vocab), c), cache)
        logits = logits.reshape(batch, beam, vocab)

        # Done: a full finished set that no alive beam can still beat.
        best_ahead = jnp.maximum(length_penalty_factor(t + 1, length_penalty),
                                 length_penalty_factor(max_new_tokens, length_penalty))
        reachable = logp[:, 0] / best_ahead
        done = jnp.all(fin_scores > neg_inf, axis=1) & (fin_scores[:, -1] >= reachable)
        return t + 1, logits, cache, seqs, logp, fin_seqs, fin_scores, done

    # All beams start as the same row; only beam 0 is live, so the first step expands one.
    cache = gather_rows(cache, batch_axes, jnp.repeat(jnp.arange(batch), beam))
    logits = jnp.broadcast_to(logits[:, None], (batch, beam, vocab))
    seqs = jnp.full((batch, beam, max_new_tokens), fill, jnp.int32)
    logp = jnp.where(jnp.arange(beam) == 0, 0.0, neg_inf) * jnp.ones((batch, 1))
    fin_scores = jnp.full((batch, beam), neg_inf)
    carry = (0, logits, cache, seqs, logp, seqs, fin_scores, jnp.zeros((batch,), bool))
    t, _, _, seqs, logp, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, carry)

    # Hypotheses still alive after max_new_tokens compete as they are (if the loop stopped
    # early, every row's finished set already beats them).
    alive_scores = jnp.where(t == max_new_tokens, penalised(logp, max_new_tokens), neg_inf)
    scores, pick = jax.lax.top_k(jnp.concatenate([fin_scores, alive_scores], 1), beam)
    return BeamResult(jnp.concatenate([fin_seqs, seqs], 1)[row, pick], scores)


def beam_search(model: nn.Module, params, prompt: jax.Array, *, beam_width: int,
                max_new_tokens: int, length_penalty: float = 0.6,
                eos_id: int | None = None) -> BeamResult:
    """Beam search continuing each row of ``prompt`` (batch, prompt_len) int32 with a
    decoder-only model of any family (its ``config.init_cache``). The prompt is prefilled
    once per row and its cache copied to the beams. ``length_penalty`` is GNMT's alpha."""
    check_beam_args(beam_width, max_new_tokens, length_penalty)
    return _beam_search(model, params, prompt, jnp.float32(length_penalty),
                        beam_width=beam_width, max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("model", "beam_width", "max_new_tokens", "eos_id"))
def _beam_search(model, params, prompt, length_penalty, *, beam_width, max_new_tokens, eos_id):
    batch, prompt_len = prompt.shape
    make_cache = functools.partial(model.config.init_cache, model,
                                   max_len=prompt_len + max_new_tokens - 1)

    def step(cache, tokens):
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"],
        )
        return logits[:, -1], mutated["cache"]

    logits, cache = step(make_cache(batch), prompt)
    return beam_search_loop(step, logits, cache, cache_batch_axes(make_cache),
                            beam_width=beam_width, max_new_tokens=max_new_tokens,
                            length_penalty=length_penalty, eos_id=eos_id)
