"""Beam search: width 1 is greedy, wider beams score at least greedy's log-probability, a beam as
wide as every hypothesis finds exactly the brute-force ranking (with and without an
end-of-sequence token, under several length penalties), the length penalty's direction, exact
early stopping, and the cache gathered by beam for attention and recurrent families alike (each
returned score equals a full forward's log-probability of its tokens)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from meshlm.config import model_config
from meshlm.generate import SamplingParams, beam_search, generate
from meshlm.generate.beam import (
    beam_search_loop,
    cache_batch_axes,
    length_penalty_factor,
)

VOCAB = 4
TOL = 1e-4  # float32: cached decoding vs one full forward, summed over a few tokens
FAMILIES = {
    "gpt": dict(n_heads=2, d_ff=32, position="rope"),
    "mamba": dict(d_state=4),
    "retnet": dict(n_heads=2, d_ff=32, chunk_size=4),
}


@functools.cache
def model_and_params(name: str = "gpt", vocab: int = VOCAB):
    cfg = model_config(name, vocab_size=vocab, d_model=16, n_layers=1, max_seq_len=16,
                       dtype="float32", init_std=0.3, **FAMILIES[name])
    model = cfg.build()
    params = meta.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
                        ["params"])
    # Wide weights, every parameter perturbed (on the host): varied next-token distributions.
    rng = np.random.default_rng(2)
    return model, jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
                               params)


def prompts(batch=2, length=3, vocab=VOCAB):
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(model, params, prompt, new):
    """log p(new[..., i] | prompt, new[..., :i]) from one full forward, (batch, n_new)."""
    seq = jnp.concatenate([prompt, new], axis=1)
    logp = jax.nn.log_softmax(model.apply({"params": params}, seq), axis=-1)
    p = prompt.shape[1]
    return jnp.take_along_axis(logp[:, p - 1:-1], new[..., None], axis=-1)[..., 0]


def hypothesis_score(logps, tokens, eos_id, alpha):
    """Score of one hypothesis: log-probs up to and including the first eos, over the penalty."""
    n = len(tokens)
    if eos_id is not None and eos_id in tokens:
        n = tokens.index(eos_id) + 1
    return float(np.sum(logps[:n]) / length_penalty_factor(n, alpha)), tuple(tokens[:n])


@functools.cache
def greedy(eos_id):
    model, params = model_and_params()
    return generate(model, params, prompts(3), jax.random.key(0), max_new_tokens=6,
                    sampling=SamplingParams(temperature=0.0), eos_id=eos_id)


@pytest.mark.parametrize("with_eos", [False, True])
def test_width_one_equals_greedy(with_eos):
    model, params = model_and_params()
    # With an end-of-sequence token: one that greedy emits mid-way, so that row stops early.
    eos_id = int(np.asarray(greedy(None))[0, 2]) if with_eos else None
    want = greedy(eos_id)
    if with_eos:
        assert (np.asarray(want)[:, :-1] == eos_id).any()
    got = beam_search(model, params, prompts(3), beam_width=1, max_new_tokens=6,
                      length_penalty=0.0, eos_id=eos_id)
    np.testing.assert_array_equal(got.tokens[:, 0], want)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_beam_scores_are_the_log_probs_of_their_tokens_and_beat_greedy(name):
    """Every beam's score is its tokens' log-probability from a full forward, which holds only
    if each beam's cache rows followed it through the reordering (attention KV caches, Mamba's
    conv and SSM states, RetNet's retention state); GPT's best beam beats greedy."""
    model, params = model_and_params(name)
    prompt = prompts(2)
    got = beam_search(model, params, prompt, beam_width=3, max_new_tokens=5, length_penalty=0.0)
    for k in range(3):
        want = token_logprobs(model, params, prompt, got.tokens[:, k]).sum(-1)
        np.testing.assert_allclose(got.scores[:, k], want, atol=TOL, rtol=TOL)
    assert (np.diff(np.asarray(got.scores), axis=1) <= 0).all()  # best first
    if name != "gpt":
        return  # the cache check above is what differs by family
    greedy = generate(model, params, prompt, jax.random.key(0), max_new_tokens=5,
                      sampling=SamplingParams(temperature=0.0))
    greedy_logp = token_logprobs(model, params, prompt, greedy).sum(-1)
    assert (got.scores[:, 0] >= greedy_logp - TOL).all()


@pytest.mark.parametrize("eos_id,alpha", [(None, 0.0), (0, 0.0), (0, 0.6), (0, 2.0), (0, -1.0)])
def test_full_width_beam_equals_brute_force(eos_id, alpha):
    """A beam of vocab^length keeps every hypothesis: its ranking is the exhaustive one."""
    model, params = model_and_params()
    n_new, width = 3, VOCAB ** 3
    prompt = prompts(1)
    every = jnp.asarray(list(itertools.product(range(VOCAB), repeat=n_new)), jnp.int32)
    logps = np.asarray(token_logprobs(model, params, jnp.repeat(prompt, len(every), 0), every))
    want = dict(hypothesis_score(lp, list(map(int, s)), eos_id, alpha)[::-1]
                for lp, s in zip(logps, np.asarray(every)))
    want = sorted(want.items(), key=lambda kv: -kv[1])
    got = beam_search(model, params, prompt, beam_width=width, max_new_tokens=n_new,
                      length_penalty=alpha, eos_id=eos_id)
    scores, tokens = np.asarray(got.scores[0]), np.asarray(got.tokens[0])
    assert np.isfinite(scores).sum() == len(want)  # 64 without eos; 1 + 3 + 9 + 27 with it
    np.testing.assert_allclose(scores[:len(want)], [s for _, s in want], atol=TOL, rtol=TOL)
    got_hyps = [hypothesis_score(np.zeros(n_new), list(map(int, t)), eos_id, 0)[1]
                for t in tokens[:len(want)]]
    assert got_hyps[0] == want[0][0]  # the best (near-ties below it may swap places)
    assert set(got_hyps) == {h for h, _ in want}


def markov_step(table):
    """A toy decoder: next-token logits depend on the last token only (the cache holds it) and
    a call counter, a cache leaf without a batch axis."""
    def step(cache, tokens):
        last = tokens[:, 0]
        return table[last], {"last": last, "calls": cache["calls"] + 1}
    return step


def toy_cache(n):
    return {"last": jnp.zeros((n,), jnp.int32), "calls": jnp.zeros((), jnp.int32)}


def run_toy(table, first, *, beam_width, max_new_tokens, alpha, eos_id=0):
    logits = jnp.log(jnp.asarray(first, jnp.float32))[None]
    run = jax.jit(lambda logits, cache: beam_search_loop(
        markov_step(jnp.log(jnp.asarray(table, jnp.float32))), logits, cache,
        cache_batch_axes(toy_cache), beam_width=beam_width, max_new_tokens=max_new_tokens,
        length_penalty=alpha, eos_id=eos_id))
    return run(logits, toy_cache(1))


def test_length_penalty_trades_log_prob_for_length():
    """eos at once: log 0.4 = -0.92; "1 eos": log 0.6 + log 0.6 = -1.02. Unpenalised the short
    one wins; at alpha = 3 the long one scores -1.02 / (7/6)^3 = -0.64 and wins."""
    first = [0.4, 0.6, 0.0]
    table = [[1.0, 0.0, 0.0], [0.6, 0.0, 0.4], [0.5, 0.5, 0.0]]
    short = run_toy(table, first, beam_width=2, max_new_tokens=2, alpha=0.0)
    np.testing.assert_array_equal(short.tokens[0, 0], [0, 0])
    np.testing.assert_allclose(short.scores[0, 0], np.log(0.4), rtol=1e-6)
    long = run_toy(table, first, beam_width=2, max_new_tokens=2, alpha=3.0)
    np.testing.assert_array_equal(long.tokens[0, 0], [1, 0])
    np.testing.assert_allclose(long.scores[0, 0], 2 * np.log(0.6) / (7 / 6) ** 3, rtol=1e-6)


def test_longer_hypotheses_win_as_alpha_grows():
    """Exact search (full width): the best hypothesis' length never falls as alpha grows."""
    model, params = model_and_params()
    prompt = prompts(2)
    lengths = []
    for alpha in (0.0, 1.0, 3.0, 10.0):
        got = beam_search(model, params, prompt, beam_width=VOCAB ** 3, max_new_tokens=3,
                          length_penalty=alpha, eos_id=1)
        best = np.asarray(got.tokens[:, 0])
        lengths.append([list(r).index(1) + 1 if 1 in r else 3 for r in best])
    lengths = np.array(lengths)
    assert (np.diff(lengths, axis=0) >= 0).all() and (lengths[-1] > lengths[0]).any()


def test_search_stops_once_no_alive_beam_can_win():
    """eos is 0.9 likely everywhere: after two steps both finished hypotheses beat every alive
    one, and the loop stops there instead of running all 20 steps."""
    table = jnp.log(jnp.asarray([[0.9, 0.05, 0.05]] * 3))
    steps = []

    def step(cache, tokens):  # the toy decoder, reporting its call count from inside the loop
        logits, cache = markov_step(table)(cache, tokens)
        jax.debug.callback(lambda c: steps.append(int(c)), cache["calls"])
        return logits, cache

    got = jax.jit(lambda: beam_search_loop(
        step, table[:1], toy_cache(1), cache_batch_axes(toy_cache), beam_width=2,
        max_new_tokens=20, length_penalty=0.0, eos_id=0))()
    jax.block_until_ready(got)
    assert max(steps) == 2
    np.testing.assert_array_equal(got.tokens[0, 0], np.zeros(20))
    np.testing.assert_allclose(got.scores[0], [np.log(0.9), np.log(0.05 * 0.9)], rtol=1e-6)


def test_cache_batch_axes_of_a_scanned_gpt():
    model, _ = model_and_params()
    axes = cache_batch_axes(lambda n: model.config.init_cache(model, n, 8))
    shapes = jax.tree.leaves(model.config.init_cache(model, 3, 8))
    got = {s.shape: ax for s, ax in zip(shapes, axes)}
    # layers first, then batch; cache indices (per layer) and the position index have none
    assert got == {(1, 3, 8, 2, 8): 1, (1, 3, 8): 1, (1,): None, (): None}


@pytest.mark.parametrize("kwargs,match", [
    (dict(beam_width=0), "beam_width must be >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
])
def test_bad_arguments(kwargs, match):
    model, params = model_and_params()
    args = dict(beam_width=2, max_new_tokens=2, length_penalty=0.6) | kwargs
    with pytest.raises(ValueError, match=match):
        beam_search(model, params, prompts(1), **args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory of an untrained tiny GPT with a trained byte-level tokenizer."""
    from meshlm.config import Config, DataConfig
    from meshlm.convert.hf import write_run
    from meshlm.data.tokenizer import train_tokenizer

    where = tmp_path_factory.mktemp("beam_run")
    texts = ["def main(argv):\n    return sorted(argv)\n"] * 4
    train_tokenizer(texts, len(texts), 300, where, {"root": "inline"})
    model = model_config("gpt", vocab_size=300, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                         max_seq_len=24, dtype="float32", init_std=0.3)
    params = jax.jit(model.build().init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    write_run(where, Config(model=model, data=DataConfig(seq_len=16)), meta.unbox(params))
    return where


def test_cli_beam_search_prints_the_best_hypothesis(run_dir, capsys):
    from meshlm.cli import main
    from meshlm.data import load_run_tokenizer
    from meshlm.data.tokenizer import eos_id
    from meshlm.train.checkpoint import restore_params

    argv = ["generate", "--run-dir", str(run_dir), "--prompt", "def", "--max-new-tokens", "6",
            "--beam-width", "3", "--length-penalty", "0.0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cfg, params = restore_params(run_dir)
    tokenizer = load_run_tokenizer(run_dir)
    eos = eos_id(tokenizer, "test")
    prompt = jnp.asarray([[eos] + tokenizer.encode("def").ids], jnp.int32)
    best = beam_search(cfg.model.build(), params, prompt, beam_width=3, max_new_tokens=6,
                       length_penalty=0.0, eos_id=eos).tokens[0, 0].tolist()
    best = best[: best.index(eos)] if eos in best else best
    assert out == "def" + tokenizer.decode(best) + "\n"


@pytest.mark.parametrize("flags,message", [
    (["--beam-width", "0"], "--beam-width must be >= 1 (1 = sample, > 1 = beam search), got 0"),
    (["--beam-width", "2", "--length-penalty", "nan"], "--length-penalty must be a finite number"),
    (["--length-penalty", "1.0"], "--length-penalty ranks beam search's hypotheses; it needs "
                                  "--beam-width > 1"),
    (["--beam-width", "2", "--temperature", "0.5", "--top-p", "0.9"],
     "--temperature, --top-p choose how to sample, but --beam-width 2 searches instead"),
])
def test_cli_bad_beam_flags_exit_2_with_one_message(run_dir, capsys, flags, message):
    from meshlm.cli import EXIT_BAD_INPUT, main

    assert main(["generate", "--run-dir", str(run_dir), *flags]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshlm: error: ") and message in err and "\n" not in err, err
