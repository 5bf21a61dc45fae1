"""The GPT family against an independent reference, and its invariances.

The reference below is a plain-``jnp`` float32 transcription of the HuggingFace ``GPT2LMHeadModel``
and ``LlamaForCausalLM`` forward passes (torch and the Flax ports are not available here), written
without meshlm's layers: explicit per-head masks and softmax, K/V heads repeated for GQA, RoPE as
complex rotation of the ``(i, i + D/2)`` feature pairs. It reads meshlm's parameter tree, filled
with random values (biases and norm scales too, not the trivial zeros and ones). Compared in
float32 at ``ATOL``/``RTOL``. Parameters come from ``jax.eval_shape`` of ``init`` and every
forward is jitted per config and shape, which keeps the file's compile time down.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm.config import ConfigError, ModelConfig, model_config
from meshlm.generate import SamplingParams, generate
from meshlm.models import build_model
from meshlm.models.gpt import GPTConfig

ATOL = 2e-5
RTOL = 2e-4
# One token shape for most tests, so that each config's forward is compiled once.
SHAPE = (2, 16)

GPT2 = GPTConfig(
    vocab_size=97, max_seq_len=24, d_model=32, n_layers=2, n_heads=4, d_ff=64,
    position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True,
    dtype="float32", scan_layers=True, attention="xla",
)
LLAMA = dataclasses.replace(
    GPT2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=48, position="rope", rope_theta=500.0,
    norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", use_bias=False, tie_embeddings=False,
)
FAMILIES = {"gpt2": GPT2, "llama": LLAMA}
family = pytest.mark.parametrize("cfg", list(FAMILIES.values()), ids=list(FAMILIES))


# Jitted per config (static) and shape. Tiny graphs run in microseconds either way; XLA's CPU
# backend optimisations only cost compile time (about 3x here).
_jit = functools.partial(jax.jit, static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


def _tokens(seed, shape, vocab):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.cache
def _model(cfg: ModelConfig) -> nn.Module:
    return build_model(cfg)


@functools.cache
def _boxed_shapes(cfg: ModelConfig):
    """``model.init``'s variables as shapes only (nothing compiled or computed)."""
    return jax.eval_shape(_model(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def _params(cfg: ModelConfig, seed: int):
    """Random float32 params in the model's tree: every leaf (biases and norm scales included)
    drawn away from its trivial initial value, so that a dropped or misplaced one shows."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(_boxed_shapes(cfg)["params"])

    def draw(path, s):
        noise = rng.standard_normal(s.shape).astype(np.float32)
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.1 * noise, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@_jit
def _logits(cfg, params, tokens, positions=None, segment_ids=None):
    return _model(cfg).apply({"params": params}, tokens, positions=positions,
                             segment_ids=segment_ids)


@_jit
def _decode(cfg, params, cache, tokens, positions=None):
    return _model(cfg).apply({"params": params, "cache": cache}, tokens, positions=positions,
                             decode=True, mutable=["cache"])


def _unstack(params, n_layers):
    """Scanned params (a ``layers`` subtree with a leading layer axis) -> ``layers_{i}``."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    return out


# ------------------------------------------------------------------------------ reference


def _ref_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _ref_rms_norm(x, p, eps):
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * p["scale"]


def _ref_rope(x, pos, theta):
    """HF LLaMA's rotate-half RoPE written as complex rotation of (x[i], x[i + D/2])."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (np.arange(half) * 2.0 / x.shape[-1])
    angle = pos[:, :, None, None].astype(jnp.float32) * freq  # (B, L, 1, half)
    z = (x[..., :half] + 1j * x[..., half:]) * jnp.exp(1j * angle)
    return jnp.concatenate([z.real, z.imag], -1).astype(jnp.float32)


def _reference(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
    """HF-style forward: tokens (B, L) -> float32 logits (B, L, V)."""
    hi = jax.lax.Precision.HIGHEST
    B, L = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(L), (B, L))
    if segment_ids is None:
        segment_ids = jnp.ones((B, L), jnp.int32)
    p = params if "layers" not in params else _unstack(params, cfg.n_layers)
    norm = (lambda x, q: _ref_layer_norm(x, q, cfg.norm_eps)) if cfg.norm == "layernorm" else (
        lambda x, q: _ref_rms_norm(x, q, cfg.norm_eps))
    bias = (lambda q: q["bias"]) if cfg.use_bias else (lambda q: 0.0)
    H, K, D = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head

    x = p["embed"]["embedding"][tokens]
    if cfg.position == "learned":
        x = x + p["position_embed"]["embedding"][positions]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]
    visible = (same & causal)[:, None]  # (B, 1, L, L)
    for i in range(cfg.n_layers):
        lp = p[f"layers_{i}"]
        a = lp["attention"]
        h = norm(x, lp["attention_norm"])
        q = jnp.einsum("ble,ehd->blhd", h, a["query"]["kernel"], precision=hi) + bias(a["query"])
        k = jnp.einsum("ble,ehd->blhd", h, a["key"]["kernel"], precision=hi) + bias(a["key"])
        v = jnp.einsum("ble,ehd->blhd", h, a["value"]["kernel"], precision=hi) + bias(a["value"])
        if cfg.position == "rope":
            q = _ref_rope(q, positions, cfg.rope_theta)
            k = _ref_rope(k, positions, cfg.rope_theta)
        k = jnp.repeat(k, H // K, axis=2)
        v = jnp.repeat(v, H // K, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) / np.sqrt(D)
        s = jnp.where(visible, s, -1e30)
        w = jnp.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v, precision=hi)
        x = x + jnp.einsum("bqhd,hde->bqe", o, a["out"]["kernel"], precision=hi) + bias(a["out"])
        m = lp["mlp"]
        h = norm(x, lp["mlp_norm"])
        if cfg.mlp == "gelu":
            u = h @ m["wi"]["kernel"] + bias(m["wi"])
            u = 0.5 * u * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))  # gelu_new
        else:
            g = h @ m["wi_gate"]["kernel"]
            u = g / (1 + jnp.exp(-g)) * (h @ m["wi_up"]["kernel"])
        x = x + jnp.matmul(u, m["wo"]["kernel"], precision=hi) + bias(m["wo"])
    x = norm(x, p["final_norm"])
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    return jnp.matmul(x, head, precision=hi)


_ref_forward = _jit(_reference)


def _loss(logits, targets):
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, targets[..., None], -1).mean()


@_jit
def _loss_and_grads(cfg, params, tokens, targets):
    return jax.value_and_grad(
        lambda p: _loss(_model(cfg).apply({"params": p}, tokens), targets))(params)


@_jit
def _ref_loss_and_grads(cfg, params, tokens, targets):
    return jax.value_and_grad(lambda p: _loss(_reference(cfg, p, tokens), targets))(params)


def _assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------- tests


@family
def test_logits_match_reference(cfg):
    params = _params(cfg, seed=1)
    tokens = _tokens(2, SHAPE, cfg.vocab_size)
    logits = _logits(cfg, params, tokens)
    assert logits.shape == (*SHAPE, cfg.vocab_size) and logits.dtype == jnp.float32
    ref = _ref_forward(cfg, params, tokens)
    assert float(jnp.std(ref)) > 0.1  # random params give non-trivial logits
    _assert_close(logits, ref)


@family
def test_grads_match_reference(cfg):
    params = _params(cfg, seed=3)
    tokens, targets = _tokens(4, SHAPE, cfg.vocab_size), _tokens(5, SHAPE, cfg.vocab_size)
    loss, grads = _loss_and_grads(cfg, params, tokens, targets)
    ref_loss, ref_grads = _ref_loss_and_grads(cfg, params, tokens, targets)
    _assert_close(loss, ref_loss)
    # Atol relative to the largest gradient: some are exactly zero in exact arithmetic (the key
    # bias adds the same q.b to every score of a query, which softmax ignores).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(jax.tree.leaves(ref_grads))
    for (path, g), r in zip(flat, jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5 * scale, rtol=1e-3,
                                   err_msg=jax.tree_util.keystr(path))


@family
def test_packed_row_equals_documents_run_separately(cfg):
    params = _params(cfg, seed=6)
    lengths = (5, 8, 2)  # + 1 padding slot = SHAPE[1]
    docs = _tokens(7, (len(lengths), SHAPE[1]), cfg.vocab_size)
    tokens = jnp.concatenate([docs[i, :n] for i, n in enumerate(lengths)] + [jnp.zeros(1, int)])
    segment_ids = np.repeat(np.arange(1, len(lengths) + 2), [*lengths, 1]) % (len(lengths) + 1)
    positions = np.concatenate([np.arange(n) for n in (*lengths, 1)])
    assert segment_ids[-1] == 0 and len(tokens) == SHAPE[1]
    tokens, segment_ids, positions = (jnp.asarray(a, jnp.int32)[None]
                                      for a in (tokens, segment_ids, positions))
    packed = _logits(cfg, params, tokens, positions, segment_ids)
    # Each document alone, in a row of its own: causal attention makes what follows it (other
    # random tokens) irrelevant to its logits.
    alone = _logits(cfg, params, docs)
    start = 0
    for i, n in enumerate(lengths):
        _assert_close(packed[0, start:start + n], alone[i, :n])
        start += n
    _assert_close(packed, _ref_forward(cfg, params, tokens, positions, segment_ids))


@family
def test_scan_and_unrolled_layers_agree(cfg):
    params = _params(cfg, seed=8)
    tokens = _tokens(9, SHAPE, cfg.vocab_size)
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    # The unrolled model's own tree has exactly the restacked structure and shapes.
    restacked = _unstack(params, cfg.n_layers)
    expected = nn.meta.unbox(_boxed_shapes(unrolled)["params"])
    assert jax.tree.structure(expected) == jax.tree.structure(restacked)
    assert all(e.shape == r.shape for e, r in zip(jax.tree.leaves(expected),
                                                  jax.tree.leaves(restacked)))
    _assert_close(_logits(unrolled, restacked, tokens), _logits(cfg, params, tokens),
                  atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "save_attention"])
def test_remat_policies_give_the_same_loss_and_grads(remat):
    params = _params(LLAMA, seed=3)
    tokens, targets = _tokens(4, SHAPE, LLAMA.vocab_size), _tokens(5, SHAPE, LLAMA.vocab_size)
    base_loss, base_grads = _loss_and_grads(LLAMA, params, tokens, targets)
    loss, grads = _loss_and_grads(dataclasses.replace(LLAMA, remat=remat), params, tokens,
                                  targets)
    _assert_close(loss, base_loss, atol=1e-6, rtol=1e-6)
    for g, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        _assert_close(g, b, atol=1e-6, rtol=1e-5)


def test_remat_unrolled_layers():
    """Unrolled layers take the other remat path (``prevent_cse``); compared with the scanned
    model's gradients (the same inputs as test_grads_match_reference, compiled once)."""
    cfg = dataclasses.replace(GPT2, scan_layers=False, remat="dots")
    params = _params(GPT2, seed=3)
    tokens, targets = _tokens(4, SHAPE, GPT2.vocab_size), _tokens(5, SHAPE, GPT2.vocab_size)
    base_loss, base_grads = _loss_and_grads(GPT2, params, tokens, targets)
    loss, grads = _loss_and_grads(cfg, _unstack(params, cfg.n_layers), tokens, targets)
    _assert_close(loss, base_loss, atol=1e-6, rtol=1e-6)
    base_grads = _unstack(base_grads, cfg.n_layers)
    assert jax.tree.structure(grads) == jax.tree.structure(base_grads)
    for g, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        _assert_close(g, b, atol=1e-6, rtol=1e-5)


@family
def test_bf16_compute_keeps_fp32_params_and_logits(cfg):
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    shapes = jax.tree.leaves(nn.meta.unbox(_boxed_shapes(bf16)))
    assert shapes and all(x.dtype == jnp.float32 for x in shapes)
    params = _params(cfg, seed=1)
    tokens = _tokens(2, SHAPE, cfg.vocab_size)
    logits = _logits(bf16, params, tokens)
    assert logits.dtype == jnp.float32
    ref = _logits(cfg, params, tokens)
    err = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert 0 < err < 2e-2, err  # bf16 really ran (err > 0) and stayed close
    # Gradients (through the LM head's bf16 backward too) are float32 and close.
    params = _params(cfg, seed=3)
    tokens, targets = _tokens(4, SHAPE, cfg.vocab_size), _tokens(5, SHAPE, cfg.vocab_size)
    _, grads = _loss_and_grads(bf16, params, tokens, targets)
    _, ref_grads = _loss_and_grads(cfg, params, tokens, targets)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        r = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
        assert g.dtype == jnp.float32
        if float(jnp.linalg.norm(r)) > 1e-3 * max(float(jnp.abs(x).max())
                                                   for x in jax.tree.leaves(ref_grads)):
            err = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
            assert err < 5e-2, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("cfg, explicit_positions", [
    (GPT2, False), (dataclasses.replace(LLAMA, scan_layers=False), True),
], ids=["gpt2-scan-implicit-positions", "llama-unrolled"])
def test_kv_cache_decoding_matches_full_recompute(cfg, explicit_positions):
    params = _params(cfg, seed=13)
    model = _model(cfg)
    batch, prompt_len, new = 2, 5, 7
    total = prompt_len + new
    seq = _tokens(14, (batch, total), cfg.vocab_size)
    full = _logits(cfg, params, seq)

    # Prefill the prompt, append a chunk of 3 tokens, then single tokens.
    cache = cfg.init_cache(model, batch, total)
    chunks = [(0, prompt_len), (prompt_len, prompt_len + 3)]
    chunks += [(t, t + 1) for t in range(prompt_len + 3, total)]
    logits = []
    for start, stop in chunks:
        positions = None  # the model counts the tokens it has cached
        if explicit_positions:
            positions = jnp.broadcast_to(jnp.arange(start, stop), (batch, stop - start))
        out, mutated = _decode(cfg, params, cache, seq[:, start:stop], positions)
        cache = mutated["cache"]
        logits.append(out)
    _assert_close(jnp.concatenate(logits, axis=1), full, atol=5e-5)

    # Greedy generate: every new token is the argmax of a full recompute of what precedes it.
    prompt = seq[:, :prompt_len]
    out = generate(model, params, prompt, jax.random.key(0), max_new_tokens=new,
                   sampling=SamplingParams(temperature=0.0))
    assert out.shape == (batch, new) and out.dtype == jnp.int32
    recomputed = _logits(cfg, params, jnp.concatenate([prompt, out], axis=1))
    np.testing.assert_array_equal(jnp.argmax(recomputed[:, prompt_len - 1:-1], -1), out)


def _expected_axes(cfg):
    """Logical axes of every parameter per the framework contract (before scan's 'layers')."""
    layer = {
        ("attention_norm", "scale"): ("embed",), ("mlp_norm", "scale"): ("embed",),
        ("attention", "query", "kernel"): ("embed", "heads", "head_dim"),
        ("attention", "key", "kernel"): ("embed", "kv_heads", "head_dim"),
        ("attention", "value", "kernel"): ("embed", "kv_heads", "head_dim"),
        ("attention", "out", "kernel"): ("heads", "head_dim", "embed"),
        ("mlp", "wo", "kernel"): ("mlp", "embed"),
    }
    if cfg.mlp == "gelu":
        layer[("mlp", "wi", "kernel")] = ("embed", "mlp")
    else:
        layer[("mlp", "wi_gate", "kernel")] = layer[("mlp", "wi_up", "kernel")] = ("embed", "mlp")
    if cfg.use_bias:
        layer.update({
            ("attention_norm", "bias"): ("embed",), ("mlp_norm", "bias"): ("embed",),
            ("attention", "query", "bias"): ("heads", "head_dim"),
            ("attention", "key", "bias"): ("kv_heads", "head_dim"),
            ("attention", "value", "bias"): ("kv_heads", "head_dim"),
            ("attention", "out", "bias"): ("embed",),
            ("mlp", "wo", "bias"): ("embed",),
        })
        for name in ("wi",) if cfg.mlp == "gelu" else ("wi_gate", "wi_up"):
            layer[("mlp", name, "bias")] = ("mlp",)
    top = {("embed", "embedding"): ("vocab", "embed"), ("final_norm", "scale"): ("embed",)}
    if cfg.use_bias:
        top[("final_norm", "bias")] = ("embed",)
    if cfg.position == "learned":
        top[("position_embed", "embedding")] = (None, "embed")
    if not cfg.tie_embeddings:
        top[("lm_head",)] = ("embed", "vocab")
    if cfg.scan_layers:
        top.update({("layers", *k): ("layers", *v) for k, v in layer.items()})
    else:
        for i in range(cfg.n_layers):
            top.update({(f"layers_{i}", *k): v for k, v in layer.items()})
    return top


@pytest.mark.parametrize("cfg", [GPT2, LLAMA, dataclasses.replace(GPT2, scan_layers=False)],
                         ids=["gpt2", "llama", "gpt2-unrolled"])
def test_every_param_carries_its_logical_axes(cfg):
    variables = _boxed_shapes(cfg)
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    specs = nn.get_partition_spec(variables)["params"]
    got = {
        tuple(k.key for k in path): tuple(spec)
        for path, spec in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    }
    assert got == _expected_axes(cfg)
    shapes = {tuple(k.key for k in path): x.shape for path, x in
              jax.tree_util.tree_flatten_with_path(nn.meta.unbox(variables["params"]))[0]}
    assert all(len(shapes[k]) == len(v) for k, v in got.items())


@family
def test_flops_per_token_counts_every_matmul_parameter(cfg):
    params = nn.meta.unbox(_boxed_shapes(cfg)["params"])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    matmul = sum(x.size for path, x in flat if path[-1].key in ("kernel", "lm_head"))
    if cfg.tie_embeddings:
        matmul += params["embed"]["embedding"].size  # the tied LM head is a matmul too
    seq = 16
    attention = 6 * cfg.n_layers * seq * cfg.n_heads * cfg.dim_per_head
    assert cfg.flops_per_token(seq) == 6 * matmul + attention


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        _logits(GPT2, _params(GPT2, 0), jnp.zeros((1, GPT2.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        GPT2.init_cache(_model(GPT2), 1, GPT2.max_seq_len + 1)
    LLAMA.init_cache(_model(LLAMA), 1, LLAMA.max_seq_len + 1)  # RoPE has no table to run out of
    with pytest.raises(ConfigError, match="unknown family 'nope'; choose one of .*gpt"):
        model_config("nope")
    with pytest.raises(ConfigError, match="unknown key 'model.d_state'; valid keys for "
                                          "model.family 'gpt': .*n_heads"):
        model_config("gpt", d_state=16)
