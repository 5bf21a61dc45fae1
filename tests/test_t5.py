"""T5: the model against a plain-JAX float32 reference of T5's math (relative position buckets
against the published bucketing in plain Python), gradients, packing, cached decoding, DP / FSDP
/ TP on 8 fake devices, span corruption and text pairs, and the bad inputs that must fail
before compiling."""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from _helpers import assert_same_tensors, read_safetensors
from kernel_checks import t5_relative_bucket
from flax.core import meta

from meshlm.config import ConfigError, load_config, model_config
from meshlm.data import build_data
from meshlm.data.batches import DECODER_SIDE, SEQ2SEQ, batch_shapes
from meshlm.data.seq2seq import (
    SpanCorruptionRows,
    TextPairRows,
    check_sentinels,
    chunk_length,
    decoder_start_id,
    encode_pairs,
    noise_mask,
    span_counts,
    span_target_length,
    target_length,
)
from meshlm.models import build_model, t5
from meshlm.train.setup import build

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny shapes: compiling dominates

SIZES = dict(vocab_size=64, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=4, d_kv=8,
             d_ff=48, max_seq_len=16, dtype="float32", extra_ids=8, relative_buckets=8,
             relative_max_distance=12)
VARIANTS = {"t5": dict(feed_forward="relu", tie_embeddings=True),
            "v1.1": dict(feed_forward="gated-gelu", tie_embeddings=False)}


# ------------------------------------------------------------------------- reference forward


def _bias(table, q_len, k_len, bidirectional, cfg):
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    buckets = t5_relative_bucket(rel, bidirectional, cfg.relative_buckets,
                                 cfg.relative_max_distance)
    return jnp.transpose(table[buckets], (2, 0, 1))  # (H, q, k)


def _rms(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def _attention(x, kv, p, bias, mask=None):
    q, k, v = (jnp.einsum("ld,dhk->hlk", a, p[n]) for a, n in
               ((x, "query"), (kv, "key"), (kv, "value")))
    scores = q @ jnp.swapaxes(k, -1, -2) + bias
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.einsum("hlk,hkd->ld", jax.nn.softmax(scores, -1) @ v, p["out"])


def _ffn(x, p, kind):
    if kind == "relu":
        return jax.nn.relu(x @ p["wi"]) @ p["wo"]
    return (jax.nn.gelu(x @ p["wi_0"], approximate=True) * (x @ p["wi_1"])) @ p["wo"]


def reference_logits(cfg, params, enc, dec):
    """T5's forward for one unpacked example (no batch axis), float32, written from the paper
    and the published code rather than from meshlm's modules."""
    layer = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    emb, eps = params["embed"]["embedding"], cfg.norm_eps
    x = emb[enc]
    p = params["encoder"]
    bias = _bias(p["relative_bias"]["embedding"], len(enc), len(enc), True, cfg)
    for i in range(cfg.n_layers):
        lp = layer(p["layers"], i)
        h = _rms(x, lp["attention_norm"]["scale"], eps)
        x = x + _attention(h, h, lp["attention"], bias)
        x = x + _ffn(_rms(x, lp["mlp_norm"]["scale"], eps), lp["mlp"], cfg.feed_forward)
    enc_out = _rms(x, p["final_norm"]["scale"], eps)
    y, p = emb[dec], params["decoder"]
    bias = _bias(p["relative_bias"]["embedding"], len(dec), len(dec), False, cfg)
    causal = np.tril(np.ones((len(dec), len(dec)), bool))
    for i in range(cfg.decoder_layers):
        lp = layer(p["layers"], i)
        h = _rms(y, lp["self_attention_norm"]["scale"], eps)
        y = y + _attention(h, h, lp["self_attention"], bias, causal)
        h = _rms(y, lp["cross_attention_norm"]["scale"], eps)
        y = y + _attention(h, enc_out, lp["cross_attention"], 0.0)
        y = y + _ffn(_rms(y, lp["mlp_norm"]["scale"], eps), lp["mlp"], cfg.feed_forward)
    y = _rms(y, p["final_norm"]["scale"], eps)
    if cfg.tie_embeddings:
        return (y * cfg.d_model ** -0.5) @ emb.T
    return y @ params["lm_head"]


@functools.cache
def _model(variant):
    """(config, module, params, encoder tokens (2, 11), decoder tokens (2, 7)); everything is
    jitted in these tests (eager dispatch of a whole T5 costs more than compiling it)."""
    cfg = model_config("t5", **SIZES, **VARIANTS[variant])
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    dec = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    params = meta.unbox(jax.jit(model.init)(jax.random.key(1), enc, dec)["params"])
    return cfg, model, params, enc, dec


def _apply(model, params, *args, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))({"params": params}, *args)


def _batch(enc, dec, targets):
    ones = lambda x: jnp.ones(x.shape, jnp.int32)
    pos = lambda x: jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
    return {"encoder_tokens": enc, "encoder_positions": pos(enc), "encoder_segment_ids": ones(enc),
            "decoder_tokens": dec, "decoder_positions": pos(dec), "decoder_segment_ids": ones(dec),
            "targets": targets, "loss_mask": jnp.ones(dec.shape, jnp.float32)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_gradients_match_reference(variant):
    """Logits, and the parameter gradients of a random cotangent on them (a vector-Jacobian
    product through the whole model), against the reference."""
    cfg, model, params, enc, dec = _model(variant)
    cotangent = jax.random.normal(jax.random.key(2), enc.shape[:1] + dec.shape[1:]
                                  + (cfg.vocab_size,))

    def forward_and_vjp(logits_of):
        out, vjp = jax.vjp(logits_of, params)
        return out, vjp(cotangent)[0]

    got, grads = jax.jit(lambda: forward_and_vjp(
        lambda p: model.apply({"params": p}, enc, dec)))()
    want, want_grads = jax.jit(lambda: forward_and_vjp(
        lambda p: jax.vmap(lambda e, d: reference_logits(cfg, p, e, d))(enc, dec)))()
    assert float(jnp.std(want)) > 0.1  # logits are not degenerate
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(want_grads)):
        assert np.all(np.isfinite(g)), path
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(g, w, atol=1e-4 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_packed_forward_equals_separate_forwards():
    _, model, params, _, _ = _model("v1.1")
    rng = np.random.default_rng(3)
    docs = [(rng.integers(0, 64, 5), rng.integers(0, 64, 4)),
            (rng.integers(0, 64, 6), rng.integers(0, 64, 3))]
    row = {k: np.zeros((1, 13), np.int32) for k in SEQ2SEQ}
    enc_at = dec_at = 0
    for seg, (e, d) in enumerate(docs, start=1):
        for side, tokens, at in (("encoder", e, enc_at), ("decoder", d, dec_at)):
            row[f"{side}_tokens"][0, at:at + len(tokens)] = tokens
            row[f"{side}_positions"][0, at:at + len(tokens)] = np.arange(len(tokens))
            row[f"{side}_segment_ids"][0, at:at + len(tokens)] = seg
        enc_at, dec_at = enc_at + len(e), dec_at + len(d)
    packed = _apply(model, params, row["encoder_tokens"], row["decoder_tokens"],
                    enc_positions=row["encoder_positions"],
                    enc_segment_ids=row["encoder_segment_ids"],
                    dec_positions=row["decoder_positions"],
                    dec_segment_ids=row["decoder_segment_ids"])
    at = 0
    for e, d in docs:
        alone = _apply(model, params, jnp.asarray(e)[None], jnp.asarray(d)[None])
        np.testing.assert_allclose(packed[0, at:at + len(d)], alone[0], rtol=1e-5, atol=1e-5)
        at += len(d)


def test_cached_decoding_equals_full_forward():
    cfg, model, params, enc, dec = _model("t5")
    enc_segments = jnp.asarray(np.array([[1] * 11, [1] * 8 + [0] * 3]), jnp.int32)  # padding
    enc_out = jax.jit(lambda e: t5.encode(model, params, e, segment_ids=enc_segments))(enc)
    full, _ = jax.jit(lambda d: t5.decode(model, params, enc_out, d,
                                          enc_segment_ids=enc_segments))(dec)
    cache = cfg.init_cache(model, 2, dec.shape[1], encoder_len=enc.shape[1])
    step = jax.jit(lambda c, d: t5.decode(model, params, enc_out, d,
                                          enc_segment_ids=enc_segments, cache=c))
    steps = []
    for i in range(dec.shape[1]):
        logits, cache = step(cache, dec[:, i:i + 1])
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_flops_per_token_counts_every_matmul_parameter():
    cfg, _, params, _, _ = _model("v1.1")
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    matmul = sum(v.size for k, v in flat.items()
                 if "norm" not in k and "relative_bias" not in k and "embed" not in k)
    scores = 12.0 * 16 * cfg.n_heads * cfg.d_kv * (cfg.n_layers + 1.5 * cfg.decoder_layers)
    assert cfg.flops_per_token(16) == 6.0 * matmul + scores
    # 16 encoder / 4 decoder tokens: the decoder's matmuls (LM head included) and scores count
    # for 4 of every 16 encoder tokens; its self-attention sees 4 keys, cross-attention 16
    encoder = sum(v.size for k, v in flat.items() if "'encoder'" in k and "norm" not in k
                  and "relative_bias" not in k)
    inner = cfg.n_heads * cfg.d_kv
    per_decoder_token = (6.0 * (matmul - encoder)
                         + 12.0 * inner * cfg.decoder_layers * (0.5 * 4 + 16))
    expected = 6.0 * encoder + 12.0 * 16 * inner * cfg.n_layers + per_decoder_token * 4 / 16
    assert math.isclose(cfg.flops_per_token(16, target_len=4), expected, rel_tol=1e-12)


# ------------------------------------------------------------------------- parallelism, training

TINY = [f"model.{k}={v}" for k, v in SIZES.items()] + [
    "model.family=t5", "data.seq_len=16", "data.batch_size=8", "train.steps=20",
    "optimizer.warmup_steps=2", "optimizer.lr=1e-2"]


def _random_batch(cfg):
    """Random rows at the run's lengths: encoder ``data.seq_len``, decoder ``data.target_len``
    (TINY derives 5 from its 16 encoder tokens)."""
    rng = np.random.default_rng(0)
    shapes, v = batch_shapes(cfg), cfg.model.vocab_size
    (b, enc_len), dec_len = shapes["encoder_tokens"], shapes["targets"][1]
    dec = rng.integers(0, v, (b, dec_len + 1), dtype=np.int32)
    batch = jax.tree.map(np.array, _batch(
        jnp.asarray(rng.integers(0, v, (b, enc_len), dtype=np.int32)), jnp.asarray(dec[:, :-1]),
        jnp.asarray(dec[:, 1:])))
    batch["loss_mask"][:, -2:] = 0  # some padding
    return batch


def _losses(overrides, devices, steps=3):
    cfg = load_config(None, TINY + overrides)
    run = build(cfg, devices)
    state, batch = run.init_state(0), run.put(_random_batch(cfg))
    losses = []
    for _ in range(steps):
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.fixture(scope="module")
def single_device_losses():
    return _losses(["mesh.data=1"], jax.devices()[:1])


def test_training_steps_reduce_the_loss(single_device_losses):
    assert np.all(np.isfinite(single_device_losses))
    assert single_device_losses[-1] < single_device_losses[0] - 0.1, single_device_losses


def test_encoder_and_decoder_lengths_differ():
    """TINY's 16 encoder tokens need 5 decoder positions (derived); an explicit
    ``data.target_len`` wins; a batch of other lengths is refused before it reaches the step."""
    run = build(load_config(None, TINY + ["mesh.data=1"]), jax.devices()[:1])
    assert run.batch_shapes["encoder_tokens"] == (8, 16)
    assert {run.batch_shapes[k] for k in DECODER_SIDE} == {(8, 5)}
    batch = _random_batch(run.cfg)
    batch["targets"] = np.zeros((8, 16), np.int32)
    with pytest.raises(ValueError, match=r"'targets': \(8, 16\)"):
        run.put(batch)
    cfg = load_config(None, TINY + ["data.target_len=8"])
    assert batch_shapes(cfg)["loss_mask"] == (8, 8) and target_length(cfg) == 8
    pairs = load_config(None, TINY + ["data.source=pairs"])
    assert target_length(pairs) == 16  # pairs: the encoder's length unless set
    with pytest.raises(ConfigError, match=r"data.target_len=17 must be in \[1, "
                                          r"model.max_seq_len=16\]"):
        build(load_config(None, TINY + ["data.target_len=17"]), jax.devices()[:1])
    with pytest.raises(ConfigError, match="model.family='gpt' has none"):
        batch_shapes(load_config(None, ["data.target_len=8"]))


def test_dp_fsdp_tp_losses_equal_single_device(single_device_losses):
    """Data, FSDP and tensor parallelism at once (one compile covers the three)."""
    losses = _losses(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], jax.devices()[:8])
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)


# ------------------------------------------------------------------------- span corruption


def _reconstruct(inputs, targets, vocab, n_sentinels):
    """The original chunk from (inputs, targets) without end-of-text: each sentinel in the
    inputs is replaced by what follows the same sentinel in the targets."""
    is_sentinel = lambda t: t >= vocab - n_sentinels
    spans, current = {}, None
    for t in targets:
        if is_sentinel(t):
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    out = []
    for t in inputs:
        out.extend(spans.pop(int(t)) if is_sentinel(t) else [int(t)])
    assert not spans
    return out


def test_span_corruption_statistics_sentinels_and_inverse():
    vocab, eos, start, seq_len = 2048, 1, 0, 128
    stream = np.random.default_rng(0).integers(2, 1900, 40_000).astype(np.uint16)
    rows = SpanCorruptionRows(stream, seq_len, vocab_size=vocab, eos_id=eos, start_id=start,
                              seed=5)
    n = rows.chunk
    assert n == chunk_length(seq_len, 0.15, 3.0) and len(rows) == len(stream) // n
    noise_total = spans_total = 0
    span_lengths = []
    for r in range(len(rows)):
        row = rows[r]
        enc_len = int(row["encoder_segment_ids"].sum())
        dec_len = int(row["loss_mask"].sum())
        inputs, targets = row["encoder_tokens"][:enc_len], row["targets"][:dec_len]
        assert inputs[-1] == eos and targets[-1] == eos and enc_len >= seq_len - 1
        sentinels = targets[targets >= vocab - 64]
        # sentinels count down from the vocabulary's last id, in the same order on both sides
        np.testing.assert_array_equal(sentinels, vocab - 1 - np.arange(len(sentinels)))
        np.testing.assert_array_equal(inputs[inputs >= vocab - 64], sentinels)
        assert _reconstruct(inputs[:-1], targets[:-1], vocab, 64) == list(stream[r * n:(r + 1) * n])
        # the decoder reads the targets shifted right behind the start token
        np.testing.assert_array_equal(row["decoder_tokens"][:dec_len],
                                      np.concatenate([[start], targets[:-1]]))
        noise_total += dec_len - 1 - len(sentinels)
        spans_total += len(sentinels)
        cuts = np.flatnonzero(targets[:-1] >= vocab - 64)
        span_lengths += list(np.diff(np.append(cuts, dec_len - 1)) - 1)
    assert abs(noise_total / (n * len(rows)) - 0.15) < 0.005
    assert abs(noise_total / spans_total - 3.0) < 0.1
    assert min(span_lengths) == 1 and max(span_lengths) >= 8  # random lengths, not all 3
    again = SpanCorruptionRows(stream, seq_len, vocab_size=vocab, eos_id=eos, start_id=start,
                               seed=5)
    np.testing.assert_array_equal(again[3]["encoder_tokens"], rows[3]["encoder_tokens"])
    assert not np.array_equal(rows[3]["targets"], rows[4]["targets"])


def test_derived_target_length_is_t5s():
    """T5's ``random_spans_helper`` at 512 inputs, density 0.15, mean span 3: chunks of 568
    tokens, 114 targets (the T5 paper's pre-training lengths)."""
    assert chunk_length(512, 0.15, 3.0) == 568
    assert span_target_length(512, 0.15, 3.0) == 114
    assert chunk_length(512, 0.15, 3.0, target_len=114) == 568


@pytest.mark.parametrize("target_len", [None, 20])
def test_span_corrupted_examples_fit_exactly(target_len):
    """Every row's example is whole on both sides (end-of-text last, every sentinel of the
    inputs followed by its span in the targets); at the derived length full chunks fill the
    decoder side exactly, and a shorter ``target_len`` shrinks the chunk instead of cutting."""
    vocab, eos, seq_len = 2048, 1, 128
    stream = np.random.default_rng(1).integers(2, 1900, 3_000).astype(np.uint16)
    rows = SpanCorruptionRows(stream, seq_len, vocab_size=vocab, eos_id=eos, start_id=0, seed=2,
                              target_len=target_len)
    assert rows.target_len == (29 if target_len is None else target_len)
    n = rows.chunk
    dec_lens = []
    for r in range(len(rows)):
        row = rows[r]
        assert row["encoder_tokens"].shape == (seq_len,)
        assert all(row[k].shape == (rows.target_len,) for k in DECODER_SIDE)
        enc_len, dec_len = int(row["encoder_segment_ids"].sum()), int(row["loss_mask"].sum())
        inputs, targets = row["encoder_tokens"][:enc_len], row["targets"][:dec_len]
        assert inputs[-1] == eos and targets[-1] == eos
        assert _reconstruct(inputs[:-1], targets[:-1], vocab, 64) == list(stream[r * n:(r + 1) * n])
        dec_lens.append(dec_len)
    assert max(dec_lens) == rows.target_len  # the noise count is fixed per chunk
    if target_len is not None:
        assert n < chunk_length(seq_len, 0.15, 3.0)


@pytest.mark.parametrize("length", [2, 3, 10, 57, 500])
def test_noise_mask_shape(length):
    mask = noise_mask(length, 0.15, 3.0, np.random.default_rng(length))
    noise, spans = span_counts(length, 0.15, 3.0)
    runs = np.count_nonzero(np.diff(mask.astype(int))) + 1
    assert mask.sum() == noise and not mask[0] and mask[-1] and runs == 2 * spans


def _word_tokenizer():
    words = ["<|endoftext|>", "<pad>"] + [f"w{i}" for i in range(40)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<pad>"])
    return tok


def test_text_pairs_pack_both_sides():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(2, 40, rng.integers(1, 9)), rng.integers(2, 40, rng.integers(1, 6)))
             for _ in range(30)]
    rows = TextPairRows(pairs, 12, start_id=7)
    seen = []
    for r in range(len(rows)):
        row = rows[r]
        for seg in range(1, row["encoder_segment_ids"].max() + 1):
            enc = row["encoder_tokens"][row["encoder_segment_ids"] == seg]
            dec_at = row["decoder_segment_ids"] == seg
            np.testing.assert_array_equal(row["encoder_positions"][row["encoder_segment_ids"]
                                                                   == seg], np.arange(len(enc)))
            assert row["decoder_tokens"][dec_at][0] == 7
            seen.append((list(enc), list(row["targets"][dec_at])))
    assert seen == [(list(a), list(b)) for a, b in pairs]
    assert len(rows) < len(pairs)  # several pairs share a row


def test_pairs_source_end_to_end(tmp_path):
    words = [" ".join(f"w{i % 40}" for i in range(k, k + 3)) for k in range(10)]
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(
            json.dumps({"src": w, "tgt": w.upper().lower()}) for w in words) + "\n")
    _word_tokenizer().save(str(tmp_path / "tok.json"))
    cfg = load_config(None, TINY + [
        "data.source=pairs", f"data.paths=[{tmp_path}/*.jsonl]", "data.pair_fields=[src, tgt]",
        f"data.tokenizer={tmp_path}/tok.json", "model.decoder_start_token=<pad>",
        "data.batch_size=2"])
    data = build_data(cfg, tmp_path / "run")
    batch = next(data.train_iterator())
    assert set(batch) == set(SEQ2SEQ) and batch["encoder_tokens"].shape == (2, 16)
    assert data.val_batches(1)[0]["targets"].shape == (2, 16)


def test_text_files_become_span_corrupted_batches(tmp_path):
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 20)
    cfg = load_config(None, TINY + [
        "data.source=files", f"data.paths=[{tmp_path}/*.txt]", "model.vocab_size=300",
        "model.decoder_start_token=<|endoftext|>", "data.batch_size=2"])
    data = build_data(cfg, tmp_path / "run")
    assert data.vocab_size <= 300 - cfg.model.extra_ids  # the sentinel ids stay free
    batch = next(data.train_iterator())
    assert set(batch) == set(SEQ2SEQ)
    sentinels = batch["encoder_tokens"][batch["encoder_tokens"] >= 300 - cfg.model.extra_ids]
    assert sentinels.size and sentinels.max() == 299


# ------------------------------------------------------------------------- bad input


def test_encoder_input_longer_than_max_seq_len_is_an_error():
    cfg, model, params, _, dec = _model("v1.1")
    too_long = jnp.zeros((2, cfg.max_seq_len + 1), jnp.int32)
    with pytest.raises(ValueError, match="encoder length 17 exceeds model.max_seq_len=16"):
        jax.eval_shape(lambda: model.apply({"params": params}, too_long, dec))
    tok = _word_tokenizer()
    with pytest.raises(ConfigError, match=r"ex:1: the input has 6 tokens .* data.seq_len=5 "
                                          r"\(the encoder length\)"):
        encode_pairs(tok, [("w1 w2 w3 w4 w5", "w1")], 0, 5, ["ex:1"])
    with pytest.raises(ConfigError, match=r"ex:2: the target has 4 tokens .* "
                                          r"data.target_len=3 \(the decoder length\)"):
        encode_pairs(tok, [("w1", "w1 w2 w3")], 0, 5, ["ex:2"], target_len=3)


def test_vocabulary_too_small_for_sentinels_is_an_error():
    tok = _word_tokenizer()  # 42 tokens
    with pytest.raises(ConfigError, match=r"42 tokens and model.extra_ids=30 sentinels need "
                                          r"model.vocab_size >= 72, got 64"):
        check_sentinels(tok, 64, 30, 5)
    with pytest.raises(ConfigError, match="22 noise spans but only model.extra_ids=8"):
        check_sentinels(tok, 64, 8, 22)


def test_missing_decoder_start_token_is_an_error():
    with pytest.raises(ConfigError, match=r"model.decoder_start_token='<s>' is not a token"):
        decoder_start_id(_word_tokenizer(), "<s>")


def test_pairs_source_needs_a_seq2seq_family(tmp_path):
    cfg = load_config(None, ["data.source=pairs", f"data.paths=[{tmp_path}/*.jsonl]"])
    with pytest.raises(ConfigError, match="data.source='pairs' feeds a sequence-to-sequence"):
        build_data(cfg, tmp_path / "run")


# ------------------------------------------------------------------------- HuggingFace


def _hf_checkpoint(tmp_path, gated: bool):
    """A random tiny ``T5ForConditionalGeneration`` directory (config.json + safetensors)."""
    from safetensors.numpy import save_file

    c = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=40,
             d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=2,
             relative_attention_num_buckets=8, relative_attention_max_distance=20,
             layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu" if gated else "relu",
             tie_word_embeddings=not gated, decoder_start_token_id=0, n_positions=32)
    d, inner, ff, v = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"], c["vocab_size"]
    shapes = {"shared.weight": (v, d), "encoder.final_layer_norm.weight": (d,),
              "decoder.final_layer_norm.weight": (d,)}
    wi = ("wi_0", "wi_1") if gated else ("wi",)
    for stack, n, sub in (("encoder", 2, ["SelfAttention"]),
                          ("decoder", 3, ["SelfAttention", "EncDecAttention"])):
        shapes[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (8, 2)
        for i in range(n):
            for j, module in enumerate(sub + ["DenseReluDense"]):
                pre = f"{stack}.block.{i}.layer.{j}"
                shapes[f"{pre}.layer_norm.weight"] = (d,)
                if module == "DenseReluDense":
                    shapes.update({f"{pre}.{module}.{w}.weight": (ff, d) for w in wi})
                    shapes[f"{pre}.{module}.wo.weight"] = (d, ff)
                else:
                    shapes.update({f"{pre}.{module}.{w}.weight": (inner, d) for w in "qkv"})
                    shapes[f"{pre}.{module}.o.weight"] = (d, inner)
    if gated:
        shapes["lm_head.weight"] = (v, d)
    rng = np.random.default_rng(7)
    state = {k: (1 + 0.1 * rng.standard_normal(s) if "norm" in k else
                 0.4 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(state, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(c))
    return hf, c, state


def _hf_logits(c, w, enc, dec):
    """HF ``T5ForConditionalGeneration``'s forward in numpy float32, from its tensor names."""
    eps, heads, gated = c["layer_norm_epsilon"], c["num_heads"], c["feed_forward_proj"] != "relu"

    def norm(x, name):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w[name]

    def bias(stack, q, k, bidirectional):
        table = w[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        rel = np.arange(k)[None, :] - np.arange(q)[:, None]
        buckets = t5_relative_bucket(rel, bidirectional, 8, 20)
        return table[buckets].transpose(2, 0, 1)

    def attention(x, kv, pre, b):
        split = lambda t: t.reshape(len(t), heads, -1).transpose(1, 0, 2)
        q, k, v = (split(a @ w[f"{pre}.{n}.weight"].T) for a, n in ((x, "q"), (kv, "k"),
                                                                     (kv, "v")))
        s = q @ k.transpose(0, 2, 1) + b
        p = np.exp(s - s.max(-1, keepdims=True))
        out = (p / p.sum(-1, keepdims=True)) @ v
        return out.transpose(1, 0, 2).reshape(len(x), -1) @ w[f"{pre}.o.weight"].T

    def ffn(x, pre):
        g = lambda n: x @ w[f"{pre}.DenseReluDense.{n}.weight"].T
        if gated:
            a = g("wi_0")
            h = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3))) * g("wi_1")
        else:
            h = np.maximum(g("wi"), 0)
        return h @ w[f"{pre}.DenseReluDense.wo.weight"].T

    x, b = w["shared.weight"][enc], bias("encoder", len(enc), len(enc), True)
    for i in range(c["num_layers"]):
        pre = f"encoder.block.{i}.layer"
        x = x + attention(norm(x, f"{pre}.0.layer_norm.weight"),
                          norm(x, f"{pre}.0.layer_norm.weight"), f"{pre}.0.SelfAttention", b)
        x = x + ffn(norm(x, f"{pre}.1.layer_norm.weight"), f"{pre}.1")
    enc_out = norm(x, "encoder.final_layer_norm.weight")
    y = w["shared.weight"][dec]
    b = bias("decoder", len(dec), len(dec), False)
    b = np.where(np.tril(np.ones((len(dec),) * 2, bool)), b, -np.inf)
    for i in range(c["num_decoder_layers"]):
        pre = f"decoder.block.{i}.layer"
        h = norm(y, f"{pre}.0.layer_norm.weight")
        y = y + attention(h, h, f"{pre}.0.SelfAttention", b)
        y = y + attention(norm(y, f"{pre}.1.layer_norm.weight"), enc_out,
                          f"{pre}.1.EncDecAttention", 0.0)
        y = y + ffn(norm(y, f"{pre}.2.layer_norm.weight"), f"{pre}.2")
    y = norm(y, "decoder.final_layer_norm.weight")
    if not gated:
        return (y * c["d_model"] ** -0.5) @ w["shared.weight"].T
    return y @ w["lm_head.weight"].T


@pytest.mark.parametrize("gated", [False, True], ids=["t5", "flan-t5"])
def test_hf_conversion_matches_hf_math_and_round_trips(tmp_path, gated):
    from meshlm.convert.hf import hf_to_orbax, orbax_to_hf
    from meshlm.train.checkpoint import restore_params

    hf, c, state = _hf_checkpoint(tmp_path, gated)
    hf_to_orbax(hf, tmp_path / "run")
    cfg, params = restore_params(tmp_path / "run")
    assert (cfg.model.decoder_layers, cfg.model.tie_embeddings) == (3, not gated)
    rng = np.random.default_rng(1)
    enc, dec = rng.integers(0, 40, (1, 9)), rng.integers(0, 40, (1, 6))
    model = build_model(cfg.model)
    got = _apply(model, params, jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32))
    np.testing.assert_allclose(got[0], _hf_logits(c, state, enc[0], dec[0]), rtol=1e-4,
                               atol=1e-4)
    back = orbax_to_hf(tmp_path / "run", tmp_path / "back")
    assert back["num_decoder_layers"] == 3 and back["feed_forward_proj"] == c["feed_forward_proj"]
    assert_same_tensors(read_safetensors(tmp_path / "back"), state)


FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("name, tied", [("t5", True), ("t5_v1_1", False)])
def test_transformers_t5_configs_translate(name, tied):
    """transformers' own config.json of each fixture's spec: transformers 5 writes
    ``tie_word_embeddings: true`` for T5 v1.1 too and marks v1.1 by ``scale_decoder_outputs``."""
    transformers = pytest.importorskip("transformers")
    from scripts.make_hf_fixtures import SPECS

    spec = {k: v for k, v in SPECS[name].items() if k != "model_type"}
    written = json.loads(transformers.AutoConfig.for_model("t5", **spec).to_json_string())
    cfg = t5.T5Config.from_hf_config(written)
    assert (cfg.tie_embeddings, cfg.feed_forward) == (tied, spec["feed_forward_proj"])
    assert (cfg.relative_buckets, cfg.relative_max_distance, cfg.d_kv) == (8, 16, 8)


@pytest.mark.parametrize("name", ["t5", "t5_v1_1"])
def test_transformers_fixture(tmp_path, name):
    """A T5 made and run by transformers itself (scripts/make_hf_fixtures.py, torch): the
    converted model's encoder output and logits within 1e-4, its 12 greedy tokens identical, and
    the round trip back to safetensors bit-exact. Skips until the fixture exists."""
    from meshlm.convert.hf import hf_to_orbax, orbax_to_hf
    from meshlm.generate import SamplingParams
    from meshlm.generate.seq2seq import seq2seq_generate
    from meshlm.train.checkpoint import restore_params

    hf = FIXTURES / name
    if not hf.is_dir():
        pytest.skip(f"no fixture {hf} (scripts/make_hf_fixtures.py makes them, with torch)")
    ref = np.load(hf / "reference.npz")
    start = json.loads((hf / "config.json").read_text()).get("decoder_start_token_id", 0)
    hf_to_orbax(hf, tmp_path / "run")
    cfg, params = restore_params(tmp_path / "run")
    assert cfg.model.tie_embeddings == (name == "t5")
    model = build_model(cfg.model)
    enc = jnp.asarray(ref["input_ids"])
    enc_out = jax.jit(lambda e: t5.encode(model, params, e))(enc)
    np.testing.assert_allclose(np.asarray(enc_out), ref["encoder_output"], atol=1e-4, rtol=0)
    logits = _apply(model, params, enc, jnp.asarray(ref["decoder_input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    greedy = seq2seq_generate(model, params, jnp.asarray(ref["prompt"]), jax.random.key(0),
                              start_id=start, max_new_tokens=ref["greedy"].shape[1],
                              sampling=SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(greedy), ref["greedy"])
    orbax_to_hf(tmp_path / "run", tmp_path / "back")
    assert_same_tensors(read_safetensors(tmp_path / "back"), read_safetensors(hf))
