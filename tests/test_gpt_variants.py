"""The GPT family's LLaMA relatives: Llama-3 / linear RoPE scaling, Mistral's sliding window (in
training and in decoding with the KV cache) and Qwen2's q/k/v biases, each against a plain
numpy / JAX float32 reference on random inputs. Their HF conversion: tests/test_convert.py."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import llama3_frequencies

from meshlm.config import ConfigError, model_config
from meshlm.layers import Attention
from meshlm.layers.embeddings import RopeScaling, apply_rope, rope_inv_freq

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_rope_scaling_frequencies():
    """Llama-3.1-8B's settings: all three bands occur; linear divides every frequency."""
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    got = np.asarray(rope_inv_freq(128, 500000.0, scaling))
    want = llama3_frequencies(1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128), 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    ratio = plain / want
    assert np.any(ratio == 1.0) and np.any(np.isclose(ratio, 8.0))
    assert np.any((ratio > 1.01) & (ratio < 7.9))  # the interpolated band
    np.testing.assert_allclose(np.asarray(rope_inv_freq(16, 1e4, RopeScaling("linear", 4.0))),
                               1.0 / 1e4 ** (np.arange(0, 16, 2) / 16) / 4.0, rtol=2e-6)
    # apply_rope rotates by the scaled frequencies
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 128))
    pos = jnp.arange(5)[None] * 1000
    angle = np.asarray(pos)[0, :, None] * want  # (5, 64)
    x64 = np.asarray(x, np.float64)
    a, b = x64[..., :64], x64[..., 64:]
    c, s = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    np.testing.assert_allclose(np.asarray(apply_rope(x, pos, 500000.0, scaling)),
                               np.concatenate([a * c - b * s, b * c + a * s], -1), atol=2e-3)
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RopeScaling("llama3", 8.0, 4.0, 1.0, 8192)


def _dense_attention(params, x, window, heads, kv_heads, qkv_bias):
    """The layer's math written out: projections (+ q/k/v biases), RoPE, a dense causal softmax
    with the window mask ``i - window < j <= i``, the output projection."""
    p = params["params"]

    def proj(name):
        y = jnp.einsum("ble,ehd->blhd", x, p[name]["kernel"])
        return y + p[name]["bias"] if qkv_bias else y

    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    q, k, v = apply_rope(proj("query"), pos, 1e4), apply_rope(proj("key"), pos, 1e4), proj("value")
    k, v = (jnp.repeat(a, heads // kv_heads, axis=2) for a in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    i, j = jnp.arange(x.shape[1])[:, None], jnp.arange(x.shape[1])[None, :]
    s = jnp.where((j <= i) & (j > i - window), s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    return jnp.einsum("blhd,hde->ble", o, p["out"]["kernel"])


def _layer(**kw):
    return Attention(num_heads=4, num_kv_heads=2, head_dim=8, use_bias=False, rope=True,
                     implementation="xla", **kw)


def test_sliding_window_and_qkv_bias_match_dense_reference():
    """Forward and gradients (input and every parameter) against the dense masked reference."""
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    layer = _layer(sliding_window=3, qkv_bias=True)
    params = layer.init(jax.random.key(2), x, pos)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape),
                          nn.meta.unbox(params))  # biases not zero
    assert set(params["params"]["query"]) == {"kernel", "bias"}
    assert set(params["params"]["out"]) == {"kernel"}

    def loss(fn, params, x):
        return jnp.sum(fn(params, x) * jnp.cos(jnp.arange(16.0)))

    ours = lambda p, x: layer.apply(p, x, pos)
    ref = lambda p, x: _dense_attention(p, x, 3, 4, 2, True)
    np.testing.assert_allclose(ours(params, x), ref(params, x), atol=2e-5, rtol=2e-5)
    full = _layer(qkv_bias=True).apply(params, x, pos)
    assert not np.allclose(full, ours(params, x), atol=1e-3)  # the window changes the output
    got = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
    want = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_sliding_window_decoding_matches_the_full_forward():
    """A prompt of 5, one token, a chunk of 3, then single tokens through the KV cache give
    the outputs of one forward over the whole sequence: the window counts back over the cached
    keys (which stay in the cache), both in the one-token and the multi-token path."""
    x = jax.random.normal(jax.random.key(4), (2, 12, 16))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    params = nn.meta.unbox(_layer(sliding_window=3).init(jax.random.key(5), x, pos))
    want = _layer(sliding_window=3).apply(params, x, pos)
    decoder = _layer(sliding_window=3, decode=True)
    cache = decoder.init(jax.random.key(5), x, pos)["cache"]
    outs, start = [], 0
    for length in (5, 1, 3, 1, 1, 1):
        sl = slice(start, start + length)
        out, mutated = decoder.apply({**params, "cache": cache}, x[:, sl], pos[:, sl],
                                     mutable=["cache"])
        cache, start = mutated["cache"], start + length
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=2e-5, rtol=2e-5)


def test_config_fields_are_checked():
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, vocab_size=64,
                 d_model=32, n_layers=1)
    cfg = model_config("gpt", **llama, rope_scaling="llama3", rope_factor=8.0,
                       sliding_window=4, qkv_bias=True)
    assert cfg.rope_scaling_spec == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    for bad, match in (
        (dict(rope_scaling="yarn"), "rope_scaling: 'yarn' is not allowed"),
        (dict(rope_scaling="linear", position="learned"), "needs model.position='rope'"),
        (dict(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=2.0),
         "low_freq_factor < high_freq_factor"),
        (dict(sliding_window=0), "model.sliding_window must be null"),
        (dict(qkv_bias=True, use_bias=True), "use_bias already gives q/k/v"),
    ):
        with pytest.raises(ConfigError, match=match):
            model_config("gpt", **{**llama, **bad})
    # attention FLOPs: a window of 4 over 16 tokens spans 2 * 4 - 4 * 4 / 16 = 7 keys, not 16
    windowed = model_config("gpt", **llama, sliding_window=4)
    full = model_config("gpt", **llama)
    assert windowed.flops_per_token(16) - full.flops_per_token(16) == 6.0 * (7 - 16) * 4 * 8


def test_windowed_model_generates_its_own_greedy_continuation():
    """``generate`` (prompt through the cache, then one token at a time) on a 2-layer model with
    a window of 3, RoPE scaling and q/k/v biases picks, at each step, the argmax of a full
    forward (no cache) over the tokens so far."""
    from meshlm.generate import SamplingParams, generate
    from meshlm.models import build_model

    cfg = model_config("gpt", position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
                       qkv_bias=True, sliding_window=3, rope_scaling="linear", rope_factor=2.0,
                       vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                       max_seq_len=32, dtype="float32", attention="xla")
    model = build_model(cfg)
    prompt = jax.random.randint(jax.random.key(6), (1, 5), 0, 32)
    params = nn.meta.unbox(model.init(jax.random.key(7), prompt))["params"]
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(8), a.shape),
                          params)  # sharper logits, non-zero biases
    got = generate(model, params, prompt, jax.random.key(0), max_new_tokens=5,
                   sampling=SamplingParams(temperature=0.0))
    # causal: one forward over prompt + continuation has each step's logits
    logits = model.apply({"params": params}, jnp.concatenate([prompt, got], axis=1))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(logits[:, 4:-1], -1)))
