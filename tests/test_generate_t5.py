"""Sequence-to-sequence generation with T5: cached decoding (self-attention K/V appended per
step, cross-attention K/V computed once from the encoder output) equals full recomputation,
greedy is the argmax of the full forward, beam width 1 is greedy, beam scores are their tokens'
log-probabilities, padded input rows decode as they do alone, and ``meshlm generate`` on a T5
run directory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from meshlm.config import model_config
from meshlm.generate import SamplingParams
from meshlm.generate.seq2seq import decoder_start, seq2seq_beam_search, seq2seq_generate

TOL = 1e-4  # float32: one cached step vs one full forward; log-probs summed over a few tokens
START, N_NEW = 1, 6
GREEDY = SamplingParams(temperature=0.0)


def t5_config(vocab):
    return model_config("t5", vocab_size=vocab, d_model=16, n_layers=1, n_decoder_layers=2,
                        n_heads=2, d_kv=8, d_ff=32, max_seq_len=12, dtype="float32", extra_ids=2,
                        relative_buckets=8, relative_max_distance=12, init_std=2.0)


@functools.cache
def model_and_params():
    model = t5_config(24).build()
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens, tokens)["params"])
    rng = np.random.default_rng(2)  # perturbed (on the host): no parameter at its initial value
    return model, jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
                               params)


def inputs():
    """Two encoder rows of 7 tokens; the second is 5 tokens and 2 of padding (segment id 0)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 24, (2, 7)), jnp.int32)
    segments = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2], jnp.int32)
    return tokens, segments


@functools.partial(jax.jit, static_argnums=0)
def full_logits(model, params, tokens, segments, out):
    """Teacher-forced decoder logits for ``[start] + out`` in one uncached pass."""
    enc_out = model.apply({"params": params}, tokens, None, segments, method="encode")
    dec = jnp.concatenate([jnp.full((out.shape[0], 1), START, jnp.int32), out], axis=1)
    return model.apply({"params": params}, enc_out, dec, segments, method="decode")


def out_logprob(model, params, tokens, segments, out):
    logp = jax.nn.log_softmax(full_logits(model, params, tokens, segments, out)[:, :-1], -1)
    return jnp.take_along_axis(logp, out[..., None], -1)[..., 0].sum(-1)


def test_cached_steps_equal_full_recomputation():
    """The logits of every step of the generation path (start token, then one token at a time
    against the caches) equal one uncached pass over the same decoder tokens; after the first
    step the cross-attention reads its cache, not the encoder output."""
    model, params = model_and_params()
    tokens, segments = inputs()
    out = jnp.asarray(np.random.default_rng(1).integers(0, 24, (2, N_NEW)), jnp.int32)
    junk = jax.random.normal(jax.random.key(3), (2, 7, 16))

    @jax.jit
    def steps():
        step, first, cache, _ = decoder_start(model, params, tokens, segments, START, N_NEW + 1)
        cache, rest = jax.lax.scan(lambda c, tok: step(c, tok[:, None])[::-1], cache, out.T)
        # Another encoder output changes nothing once the cross K/V are cached.
        again, _ = model.apply({"params": params, "cache": cache}, junk, out[:, :1], segments,
                               decode=True, method="decode", mutable=["cache"])
        got = jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], axis=1)
        return got, again[:, -1], step(cache, out[:, :1])[0]

    got, again, same = steps()
    np.testing.assert_allclose(got, full_logits(model, params, tokens, segments, out),
                               atol=TOL, rtol=TOL)
    np.testing.assert_allclose(again, same, atol=1e-6)


def test_greedy_is_the_argmax_of_the_full_forward():
    model, params = model_and_params()
    tokens, segments = inputs()
    out = seq2seq_generate(model, params, tokens, jax.random.key(0), start_id=START,
                           max_new_tokens=N_NEW, sampling=GREEDY, segment_ids=segments)
    want = jnp.argmax(full_logits(model, params, tokens, segments, out)[:, :-1], -1)
    np.testing.assert_array_equal(out, want)
    assert len(np.unique(np.asarray(out))) > 2  # not a degenerate repetition
    top1 = seq2seq_generate(model, params, tokens, jax.random.key(5), start_id=START,
                            max_new_tokens=N_NEW, sampling=SamplingParams(top_k=1),
                            segment_ids=segments)
    np.testing.assert_array_equal(top1, out)  # sampling from the top-1 filter is greedy


@functools.cache
def greedy_and_beams(eos_id, beam_width, alpha=0.0):
    model, params = model_and_params()
    tokens, segments = inputs()
    greedy = seq2seq_generate(model, params, tokens, jax.random.key(0), start_id=START,
                              max_new_tokens=N_NEW, sampling=GREEDY, eos_id=eos_id,
                              segment_ids=segments)
    beams = seq2seq_beam_search(model, params, tokens, start_id=START, beam_width=beam_width,
                                max_new_tokens=N_NEW, length_penalty=alpha, eos_id=eos_id,
                                segment_ids=segments)
    return greedy, beams


def test_width_one_equals_greedy():
    """With an end-of-sequence token that greedy emits mid-way in a row (so that row stops)."""
    eos_id = int(np.asarray(greedy_and_beams(None, 3)[0])[0, 2])
    greedy, beams = greedy_and_beams(eos_id, 1)
    assert (np.asarray(greedy)[:, :-1] == eos_id).any()
    np.testing.assert_array_equal(beams.tokens[:, 0], greedy)


def test_beam_scores_are_log_probs_and_beat_greedy():
    """Each beam's score is its output's log-probability from a full forward, which needs every
    cache row (self K/V, cross K/V) to follow its beam."""
    model, params = model_and_params()
    tokens, segments = inputs()
    greedy, beams = greedy_and_beams(None, 3)
    assert (np.asarray(beams.tokens[:, 0]) != np.asarray(greedy)).any()  # the search mattered
    for k in range(3):
        want = out_logprob(model, params, tokens, segments, beams.tokens[:, k])
        np.testing.assert_allclose(beams.scores[:, k], want, atol=TOL, rtol=TOL)
    assert (beams.scores[:, 0] >= out_logprob(model, params, tokens, segments, greedy) - TOL).all()


def test_padded_input_row_decodes_as_it_does_alone():
    model, params = model_and_params()
    tokens, _ = inputs()
    greedy, beams = greedy_and_beams(None, 3)
    alone = tokens[1:, :5]
    np.testing.assert_array_equal(
        seq2seq_generate(model, params, alone, jax.random.key(0), start_id=START,
                         max_new_tokens=N_NEW, sampling=GREEDY)[0], greedy[1])
    beams_alone = seq2seq_beam_search(model, params, alone, start_id=START, beam_width=3,
                                      max_new_tokens=N_NEW, length_penalty=0.0)
    np.testing.assert_array_equal(beams_alone.tokens[0], beams.tokens[1])
    np.testing.assert_allclose(beams_alone.scores[0], beams.scores[1], atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """An untrained tiny T5 run directory whose BPE starts the decoder from end-of-text."""
    import dataclasses

    from meshlm.config import Config, DataConfig
    from meshlm.convert.hf import write_run
    from meshlm.data.tokenizer import train_tokenizer

    where = tmp_path_factory.mktemp("t5_run")
    texts = ["def main(argv):\n    return sorted(argv)\n"] * 4
    train_tokenizer(texts, len(texts), 290, where, {"root": "inline"})
    model = dataclasses.replace(t5_config(300), decoder_start_token="<|endoftext|>",
                                extra_ids=10)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.build().init)(jax.random.key(0), tokens, tokens)["params"]
    write_run(where, Config(model=model, data=DataConfig(seq_len=12)), meta.unbox(params))
    return where


def decoded(run_dir, text, beam_width):
    """What the generate command should print: the output for ``text``, decoded directly."""
    from meshlm.data import load_run_tokenizer
    from meshlm.data.tokenizer import eos_id
    from meshlm.train.checkpoint import restore_params

    cfg, params = restore_params(run_dir)
    tokenizer = load_run_tokenizer(run_dir)
    eos = eos_id(tokenizer, "test")
    inputs = jnp.asarray([tokenizer.encode(text).ids + [eos]], jnp.int32)
    model = cfg.model.build()
    if beam_width == 1:
        out = seq2seq_generate(model, params, inputs, jax.random.key(0), start_id=eos,
                               max_new_tokens=12, sampling=GREEDY, eos_id=eos)[0]
    else:
        out = seq2seq_beam_search(model, params, inputs, start_id=eos, beam_width=beam_width,
                                  max_new_tokens=12, length_penalty=0.6, eos_id=eos).tokens[0, 0]
    out = out.tolist()
    return tokenizer.decode(out[: out.index(eos)] if eos in out else out)


@pytest.mark.parametrize("flags,beam_width", [(["--temperature", "0"], 1),
                                              (["--beam-width", "2"], 2)])
def test_cli_prints_the_output_for_the_input(t5_run, capsys, flags, beam_width):
    from meshlm.cli import main

    argv = ["generate", "--run-dir", str(t5_run), "--prompt", "def main", "--max-new-tokens",
            "13", *flags]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == decoded(t5_run, "def main", beam_width) + "\n"
    assert err.strip() == ("meshlm: note: the model's context is 12 tokens (model.max_seq_len), "
                           "so generating at most 12 output tokens")


def test_cli_input_longer_than_the_encoder_is_one_error(t5_run, capsys):
    from meshlm.cli import EXIT_BAD_INPUT, main

    argv = ["generate", "--run-dir", str(t5_run), "--prompt", "x " * 20]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshlm: error: the input is ") and "\n" not in err, err
    assert "more than the encoder's model.max_seq_len=12; shorten it" in err, err
