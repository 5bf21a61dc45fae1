"""HuggingFace checkpoints <-> meshlm run directories (``meshlm.convert``).

The HF checkpoints here are written by the tests themselves: random float32 tensors (never zeros
or ones) under the names and torch layouts of ``GPT2LMHeadModel``, ``LlamaForCausalLM`` (also
with Llama-3 RoPE scaling), ``MistralForCausalLM`` (a sliding window), ``Qwen2ForCausalLM`` (q/k/v
biases), ``MambaForCausalLM`` and ``Mamba2ForCausalLM``, transcribed from the transformers sources
and independent of the families' tables. Checked: HF -> Orbax -> HF -> Orbax is bit-exact; the
converted GPT-2 and LLaMA (Llama-3, Mistral, Qwen2) give the logits of a plain-numpy forward
written from HF's math over the HF tensors themselves, as do Mamba and Mamba-2 against sequential
scans of HF's slow paths (so a mislaid tensor shows); conversion onto an 8-device FSDP x tensor
mesh places every parameter with the rule table's sharding; bad input is one clear error. Parity
with the torch implementation at real shapes needs torch: ``scripts/check_hf_parity.py`` (GPU
machine); the committed fixtures under ``tests/fixtures/hf/`` carry transformers' own outputs.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_same_tensors, llama3_frequencies, read_safetensors
from safetensors.numpy import save_file

from meshlm.cli import main
from meshlm.config import ConfigError, MeshConfig
from meshlm.convert.hf import abstract_params, hf_to_orbax, orbax_to_hf, run_config
from meshlm.convert.mapping import ConversionError
from meshlm.models import build_model
from meshlm.train.checkpoint import restore_params

pytestmark = pytest.mark.usefixtures("fast_compile")

ATOL = 2e-5
RTOL = 2e-4

GPT2 = dict(model_type="gpt2", vocab_size=61, n_positions=24, n_embd=32, n_layer=2, n_head=4,
            n_inner=48, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            tie_word_embeddings=True)
LLAMA = dict(model_type="llama", vocab_size=61, max_position_embeddings=64, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             intermediate_size=40, hidden_act="silu", rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0},
             tie_word_embeddings=False)
MAMBA = dict(model_type="mamba", vocab_size=61, hidden_size=32, intermediate_size=64,
             state_size=4, num_hidden_layers=2, conv_kernel=4, expand=2, time_step_rank=3,
             use_bias=True, use_conv_bias=True, layer_norm_epsilon=1e-5,
             tie_word_embeddings=True)
MAMBA2 = dict(model_type="mamba2", vocab_size=61, hidden_size=32, num_heads=8, head_dim=8,
              state_size=4, n_groups=2, num_hidden_layers=2, conv_kernel=4, expand=2,
              chunk_size=8, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
              tie_word_embeddings=False)
# Llama 3.1's scaling with a short original context, so that the tiny head's frequencies fall
# in all three bands (kept, interpolated, divided by factor).
LLAMA3 = {**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 32}}
MISTRAL = {**LLAMA, "model_type": "mistral", "sliding_window": 4}  # shorter than the 16 tokens
QWEN2 = dict(model_type="qwen2", vocab_size=61, max_position_embeddings=64, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=40, hidden_act="silu", rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
             use_sliding_window=False, tie_word_embeddings=True)
CONFIGS = {"gpt2": GPT2, "llama": LLAMA, "llama3": LLAMA3, "mistral": MISTRAL, "qwen2": QWEN2,
           "mamba": MAMBA, "mamba2": MAMBA2}


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The HF state dict's names and torch shapes (transformers' modeling_<type>.py)."""
    v, t = c["vocab_size"], c["model_type"]
    if t == "gpt2":
        e, f = c["n_embd"], c["n_inner"]
        out = {"transformer.wte.weight": (v, e), "transformer.wpe.weight": (c["n_positions"], e),
               "transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)}
        for i in range(c["n_layer"]):
            p = f"transformer.h.{i}."
            out.update({p + "ln_1.weight": (e,), p + "ln_1.bias": (e,), p + "ln_2.weight": (e,),
                        p + "ln_2.bias": (e,), p + "attn.c_attn.weight": (e, 3 * e),
                        p + "attn.c_attn.bias": (3 * e,), p + "attn.c_proj.weight": (e, e),
                        p + "attn.c_proj.bias": (e,), p + "mlp.c_fc.weight": (e, f),
                        p + "mlp.c_fc.bias": (f,), p + "mlp.c_proj.weight": (f, e),
                        p + "mlp.c_proj.bias": (e,)})
        return out
    if t in ("llama", "mistral", "qwen2"):
        e, f, h, k = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                      c["num_key_value_heads"])
        d = c.get("head_dim") or e // h
        out = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
        if not c["tie_word_embeddings"]:
            out["lm_head.weight"] = (v, e)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            out.update({p + "input_layernorm.weight": (e,),
                        p + "post_attention_layernorm.weight": (e,),
                        p + "self_attn.q_proj.weight": (h * d, e),
                        p + "self_attn.k_proj.weight": (k * d, e),
                        p + "self_attn.v_proj.weight": (k * d, e),
                        p + "self_attn.o_proj.weight": (e, h * d),
                        p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
                        p + "mlp.down_proj.weight": (e, f)})
            if t == "qwen2":
                out.update({p + "self_attn.q_proj.bias": (h * d,),
                            p + "self_attn.k_proj.bias": (k * d,),
                            p + "self_attn.v_proj.bias": (k * d,)})
        return out
    e, n, k = c["hidden_size"], c["state_size"], c["conv_kernel"]
    i_ = c["expand"] * e
    out = {"backbone.embeddings.weight": (v, e), "backbone.norm_f.weight": (e,)}
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, e)
    for layer in range(c["num_hidden_layers"]):
        p = f"backbone.layers.{layer}."
        m = p + "mixer."
        out[p + "norm.weight"] = (e,)
        out[m + "out_proj.weight"] = (e, i_)
        if t == "mamba":
            r = c["time_step_rank"]
            out.update({m + "in_proj.weight": (2 * i_, e), m + "in_proj.bias": (2 * i_,),
                        m + "conv1d.weight": (i_, 1, k), m + "conv1d.bias": (i_,),
                        m + "x_proj.weight": (r + 2 * n, i_), m + "dt_proj.weight": (i_, r),
                        m + "dt_proj.bias": (i_,), m + "A_log": (i_, n), m + "D": (i_,),
                        m + "out_proj.bias": (e,)})
        else:
            g, h = c["n_groups"], c["num_heads"]
            conv = i_ + 2 * g * n
            out.update({m + "in_proj.weight": (2 * i_ + 2 * g * n + h, e),
                        m + "conv1d.weight": (conv, 1, k), m + "conv1d.bias": (conv,),
                        m + "dt_bias": (h,), m + "A_log": (h,), m + "D": (h,),
                        m + "norm.weight": (i_,)})
    return out


def _random_state(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in _shapes(c).items():
        scale = 0.3 if len(shape) > 1 else 0.1
        base = 1.0 if "norm" in name or "ln_" in name else 0.0  # norm scales around one
        state[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return state


def _write_hf(path: pathlib.Path, c: dict, state: dict, shards: int = 1) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    names = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


# --------------------------------------------------------------- HF math over the HF tensors


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _attention(q, k, v, window=None):
    """Causal softmax attention, ``q (B, L, H, D)``, ``k, v (B, L, Hkv, D)``; with ``window``
    query i sees keys ``i - window < j <= i`` (transformers' sliding_window_overlay)."""
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    v = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    length = q.shape[1]
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    s = np.where((j <= i) & (j > i - (window or length)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v).reshape(q.shape[0], length, -1)


def _gpt2_forward(c, w, tokens):
    """``GPT2LMHeadModel``: Conv1D is ``x @ W + b`` with ``W (in, out)``; gelu_new; tied head."""
    e, h = c["n_embd"], c["n_head"]
    b, length = tokens.shape
    x = w["transformer.wte.weight"][tokens] + w["transformer.wpe.weight"][np.arange(length)]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        y = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], c["layer_norm_epsilon"])
        qkv = y @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (a.reshape(b, length, h, e // h) for a in np.split(qkv, 3, axis=-1))
        x = x + _attention(q, k, v) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        y = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], c["layer_norm_epsilon"])
        u = y @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = x + u @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"],
                    c["layer_norm_epsilon"])
    return x @ w["transformer.wte.weight"].T


def _rotate_half_rope(x, rope):
    """HF LLaMA: ``x * cos + rotate_half(x) * sin`` with ``cos = cat(cos f, cos f)``."""
    d, length = x.shape[-1], x.shape[1]
    freq = 1.0 / rope["rope_theta"] ** (np.arange(0, d, 2) / d)
    if rope["rope_type"] == "llama3":
        freq = llama3_frequencies(freq, rope["factor"], rope["low_freq_factor"],
                                  rope["high_freq_factor"],
                                  rope["original_max_position_embeddings"])
    angle = np.concatenate([np.arange(length)[:, None] * freq] * 2, -1)[None, :, None, :]
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(angle) + rotated * np.sin(angle)


def _llama_forward(c, w, tokens):
    """``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``: Linear is
    ``x @ W.T (+ b)``; SwiGLU; Mistral's sliding window; Qwen2's q/k/v biases."""
    h, kv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    d = c.get("head_dim") or c["hidden_size"] // h
    rope = c["rope_parameters"]
    b, length = tokens.shape
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = ((y @ w[f"{p}self_attn.{n}_proj.weight"].T
                    + w.get(f"{p}self_attn.{n}_proj.bias", 0.0)).reshape(b, length, heads, d)
                   for n, heads in (("q", h), ("k", kv), ("v", kv)))
        q, k = _rotate_half_rope(q, rope), _rotate_half_rope(k, rope)
        x = x + (_attention(q, k, v, c.get("sliding_window"))
                 @ w[p + "self_attn.o_proj.weight"].T)
        y = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = y @ w[p + "mlp.gate_proj.weight"].T
        u = gate / (1 + np.exp(-gate)) * (y @ w[p + "mlp.up_proj.weight"].T)
        x = x + u @ w[p + "mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return _rms_norm(x, w["model.norm.weight"], eps) @ head.T


def _causal_conv(u, w, b):
    """HF's depthwise ``Conv1d(padding=K-1)`` cut to the input length: ``u (B, L, C)``, ``w (C,
    1, K)``; output ``t`` is ``b + sum_k w[:, 0, k] * u[t - (K - 1) + k]``."""
    k = w.shape[-1]
    padded = np.concatenate([np.zeros((u.shape[0], k - 1, u.shape[2])), u], axis=1)
    return b + sum(padded[:, j:j + u.shape[1]] * w[:, 0, j] for j in range(k))


def _silu(x):
    return x / (1 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(x))


def _mamba_mixer(c, w, p, x):
    """HF ``MambaMixer.slow_forward`` (no cache) as a sequential scan."""
    i_, n, r = c["expand"] * c["hidden_size"], c["state_size"], c["time_step_rank"]
    xz = x @ w[p + "in_proj.weight"].T + w[p + "in_proj.bias"]
    u, gate = xz[..., :i_], xz[..., i_:]
    u = _silu(_causal_conv(u, w[p + "conv1d.weight"], w[p + "conv1d.bias"]))
    dbc = u @ w[p + "x_proj.weight"].T
    dt, bb, cc = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
    dt = _softplus(dt @ w[p + "dt_proj.weight"].T + w[p + "dt_proj.bias"])  # (B, L, I)
    a = -np.exp(w[p + "A_log"])  # (I, N)
    h = np.zeros((x.shape[0], i_, n))
    ys = []
    for t in range(x.shape[1]):
        h = np.exp(a * dt[:, t, :, None]) * h + (dt[:, t] * u[:, t])[..., None] * bb[:, t, None]
        ys.append(np.einsum("bin,bn->bi", h, cc[:, t]))
    y = (np.stack(ys, 1) + u * w[p + "D"]) * _silu(gate)
    return y @ w[p + "out_proj.weight"].T + w[p + "out_proj.bias"]


def _mamba2_mixer(c, w, p, x):
    """HF ``Mamba2Mixer.torch_forward`` (no cache) as a sequential scan; group ``g`` of B/C
    serves heads ``g * H/G ..`` (``repeat_interleave``); the gated norm spans all of d_inner."""
    i_, n, g, h, hd = (c["expand"] * c["hidden_size"], c["state_size"], c["n_groups"],
                       c["num_heads"], c["head_dim"])
    proj = x @ w[p + "in_proj.weight"].T
    gate, xbc, dt = proj[..., :i_], proj[..., i_:2 * i_ + 2 * g * n], proj[..., 2 * i_ + 2 * g * n:]
    xbc = _silu(_causal_conv(xbc, w[p + "conv1d.weight"], w[p + "conv1d.bias"]))
    b_, length = x.shape[:2]
    u = xbc[..., :i_].reshape(b_, length, h, hd)
    bb = np.repeat(xbc[..., i_:i_ + g * n].reshape(b_, length, g, n), h // g, axis=2)
    cc = np.repeat(xbc[..., i_ + g * n:].reshape(b_, length, g, n), h // g, axis=2)
    dt = _softplus(dt + w[p + "dt_bias"])  # (B, L, H)
    a = -np.exp(w[p + "A_log"])
    state = np.zeros((b_, h, hd, n))
    ys = []
    for t in range(length):
        state = (np.exp(dt[:, t] * a)[..., None, None] * state
                 + (dt[:, t, :, None] * u[:, t])[..., None] * bb[:, t, :, None, :])
        ys.append(np.einsum("bhpn,bhn->bhp", state, cc[:, t]))
    y = (np.stack(ys, 1) + u * w[p + "D"][:, None]).reshape(b_, length, i_)
    y = y * _silu(gate)
    y = y / np.sqrt((y * y).mean(-1, keepdims=True) + c["layer_norm_epsilon"])
    return (y * w[p + "norm.weight"]) @ w[p + "out_proj.weight"].T


def _mamba_forward(c, w, tokens):
    """``MambaForCausalLM`` / ``Mamba2ForCausalLM``: ``x + mixer(RMSNorm(x))`` per layer."""
    mixer = _mamba_mixer if c["model_type"] == "mamba" else _mamba2_mixer
    eps = c["layer_norm_epsilon"]
    x = w["backbone.embeddings.weight"][tokens]
    for i in range(c["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        x = x + mixer(c, w, p + "mixer.", _rms_norm(x, w[p + "norm.weight"], eps))
    x = _rms_norm(x, w["backbone.norm_f.weight"], eps)
    head = w["backbone.embeddings.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("model_type", [t for t in CONFIGS if t != "llama3"])  # llama's table
def test_round_trip_is_bit_exact(tmp_path, model_type):
    c = CONFIGS[model_type]
    state = _random_state(c)
    hf = _write_hf(tmp_path / "hf", c, state, shards=2)
    (hf / "tokenizer.json").write_text('{"stand-in": true}')
    cfg = hf_to_orbax(hf, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").read_text() == '{"stand-in": true}'
    back = orbax_to_hf(tmp_path / "run", tmp_path / "back", max_shard_bytes=4096)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()  # sharded at 4 KiB
    assert_same_tensors(read_safetensors(tmp_path / "back"), state)
    assert back["model_type"] == c["model_type"]
    # the written directory converts again to the same model and bit-identical parameters
    assert hf_to_orbax(tmp_path / "back", tmp_path / "again").model == cfg.model
    first, second = restore_params(tmp_path / "run")[1], restore_params(tmp_path / "again")[1]
    assert jax.tree.structure(first) == jax.tree.structure(second)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("model_type,forward,scan", [
    ("gpt2", _gpt2_forward, True), ("gpt2", _gpt2_forward, False),
    ("llama", _llama_forward, True), ("llama", _llama_forward, False),
    ("llama3", _llama_forward, True), ("mistral", _llama_forward, True),
    ("qwen2", _llama_forward, False),
    ("mamba", _mamba_forward, True), ("mamba2", _mamba_forward, True)])
def test_converted_logits_match_hf_math(tmp_path, model_type, forward, scan, monkeypatch):
    c = CONFIGS[model_type]
    state = _random_state(c, seed=1)
    hf = _write_hf(tmp_path / "hf", c, state)
    if not scan:  # the run config built from config.json, with unrolled layers
        import dataclasses

        import meshlm.convert.hf as hf_module

        real = hf_module.run_config
        monkeypatch.setattr(hf_module, "run_config", lambda *a, **k: dataclasses.replace(
            real(*a, **k), model=dataclasses.replace(real(*a, **k).model, scan_layers=False)))
    hf_to_orbax(hf, tmp_path / "run")
    cfg, params = restore_params(tmp_path / "run")
    assert cfg.model.scan_layers == scan and ("layers" in params) == scan
    tokens = np.random.default_rng(2).integers(0, c["vocab_size"], (2, 16))
    logits = build_model(cfg.model).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    expected = forward(c, {k: v.astype(np.float64) for k, v in state.items()}, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("model_type", ["llama", "mamba2"])
def test_sharded_placement_follows_the_rules(tmp_path, model_type):
    c = {**CONFIGS[model_type], "vocab_size": 64}  # divisible by the tensor shards
    hf = _write_hf(tmp_path / "hf", c, _random_state(c, seed=3))
    mesh = MeshConfig(data=1, fsdp=4, tensor=2)
    cfg = hf_to_orbax(hf, tmp_path / "run", mesh=mesh)
    from meshlm.convert.hf import load_hf_params
    from meshlm.convert.safetensors_dir import HFCheckpoint

    abstract = abstract_params(cfg)
    params = load_hf_params(HFCheckpoint(hf), cfg.model, abstract)
    _, restored = restore_params(tmp_path / "run")  # one device, from the written checkpoint
    sharded = 0
    for (path, a), s, r in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(abstract), jax.tree.leaves(restored)):
        assert a.sharding == s.sharding, jax.tree_util.keystr(path)
        assert len(a.sharding.device_set) == 8
        sharded += not a.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    assert sharded >= 5  # embeddings, projections and out kernels are split, not replicated


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        hf_to_orbax(tmp_path, tmp_path / "run")
    hf = _write_hf(tmp_path / "hf", GPT2, _random_state(GPT2))

    def convert(config=None, state=None, out="run", **kw):
        d = _write_hf(tmp_path / f"hf_{out}", config or GPT2, state or _random_state(GPT2))
        return hf_to_orbax(d, tmp_path / out, **kw)

    with pytest.raises(ConfigError, match="model_type 'bert' is not supported; supported: "
                                          "gpt2, llama, mamba, mamba2, mistral"):
        convert({**GPT2, "model_type": "bert"}, out="a")
    with pytest.raises(ConfigError, match="rope scaling type 'yarn' .*supported: 'default', "
                                          "'linear', 'llama3'"):
        convert({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5,
                                              "factor": 8.0}}, _random_state(LLAMA), out="b")
    with pytest.raises(ConfigError, match="use_sliding_window=true with layer_types .*"
                                          "max_window_layers=1"):
        convert({**QWEN2, "use_sliding_window": True, "sliding_window": 4,
                 "max_window_layers": 1}, _random_state(QWEN2), out="b")
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5 is not supported"):
        convert({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5,
                                              "partial_rotary_factor": 0.5}},
                _random_state(LLAMA), out="b")
    with pytest.raises(ConfigError, match="activation_function='relu' is not supported"):
        convert({**GPT2, "activation_function": "relu"}, out="c")
    state = _random_state(GPT2)
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ConversionError, match="tensor 'transformer.h.1.mlp.c_fc.bias' missing"):
        convert(state=state, out="d")
    state = _random_state(GPT2)
    name = "transformer.h.0.attn.c_attn.weight"
    state[name] = state[name][:, :64]
    with pytest.raises(ConversionError, match=r"'transformer.h.0.attn.c_attn.weight' has shape "
                                              r"\[32, 64\], this model needs \[32, 96\]"):
        convert(state=state, out="e")
    state = {**_random_state(GPT2), "transformer.h.0.extra.weight": np.ones(3, np.float32)}
    with pytest.raises(ConversionError, match="no parameter for: transformer.h.0.extra.weight"):
        convert(state=state, out="f")
    (tmp_path / "hf_empty").mkdir()
    (tmp_path / "hf_empty" / "config.json").write_text(json.dumps(GPT2))
    with pytest.raises(ConversionError, match="has no \\*.safetensors weights"):
        hf_to_orbax(tmp_path / "hf_empty", tmp_path / "h")
    truncated = tmp_path / "hf_trunc"
    _write_hf(truncated, GPT2, _random_state(GPT2))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        hf_to_orbax(truncated, tmp_path / "g")
    hf_to_orbax(hf, tmp_path / "run")
    with pytest.raises(ConversionError, match="already exists; .* --overwrite"):
        hf_to_orbax(hf, tmp_path / "run")
    hf_to_orbax(hf, tmp_path / "run", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # failures left no debris
    for name in "abcdefgh":
        assert not (tmp_path / name).exists()


def test_a_family_without_a_table_is_refused(tmp_path):
    """orbax-to-hf of a RetNet run (no HF model_type) names the families that have one."""
    from flax.core import meta

    from meshlm.config import Config, model_config
    from meshlm.convert.hf import write_run

    model = model_config("retnet", vocab_size=64, d_model=32, n_layers=1, dtype="float32")
    params = build_model(model).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    write_run(tmp_path / "run", Config(model=model), meta.unbox(params))
    with pytest.raises(ConversionError, match="model.family='retnet' has no HuggingFace "
                                              "conversion; families that have one: gpt, mamba, "
                                              "mamba2, moe, t5"):
        orbax_to_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_converts_both_ways(tmp_path, capsys):
    """Both directions through ``meshlm convert``, then ``meshlm generate`` on the result with the
    tokenizer.json copied from the HF directory."""
    import tokenizers

    hf = _write_hf(tmp_path / "hf", LLAMA, _random_state(LLAMA))
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate("abcdefgh ")}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tokenizer.save(str(hf / "tokenizer.json"))
    assert main(["convert", "hf-to-orbax", "--hf", str(hf), "--out", str(tmp_path / "run"),
                 "--dtype", "bfloat16"]) == 0
    cfg, params = restore_params(tmp_path / "run")
    assert cfg.model.param_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert main(["convert", "orbax-to-hf", "--run-dir", str(tmp_path / "run"),
                 "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(tmp_path / "run"), "--prompt", "ab",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["convert", "hf-to-orbax", "--hf", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshlm: error: ") and err.count("\n") == 1 and "not a directory" in err


def test_train_starts_from_converted_params(tmp_path):
    """``checkpoint.init_from``: step 0 from the converted parameters, a fresh optimizer (with a
    learning rate of 1e-30 the one step leaves them unchanged), and a misfit refused before
    compute."""
    from meshlm.config import load_config
    from meshlm.train.checkpoint import CheckpointError
    from meshlm.train.loop import train

    c = {**GPT2, "vocab_size": 384, "n_positions": 32}
    hf_to_orbax(_write_hf(tmp_path / "hf", c, _random_state(c, seed=4)), tmp_path / "hf_run")
    settings = ["data.batch_size=8", "data.max_files=30", "train.steps=1", "train.log_every=1",
                "train.eval_batches=1", "train.progress_bar=false", "optimizer.lr=1e-30",
                "optimizer.warmup_steps=0", f"checkpoint.init_from={tmp_path / 'hf_run'}"]
    cfg = load_config(tmp_path / "hf_run" / "config.yaml",
                      settings + [f"train.run_dir={tmp_path / 'ft'}"])
    assert train(cfg)["checkpoint_step"] == 1
    _, converted = restore_params(tmp_path / "hf_run")
    _, trained = restore_params(tmp_path / "ft")
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = load_config(tmp_path / "hf_run" / "config.yaml",
                        settings + [f"train.run_dir={tmp_path / 'bad'}", "model.d_ff=96"])
    with pytest.raises(CheckpointError, match="parameters of another model .*mlp/wi/kernel"):
        train(other)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_transformers_configs_translate_both_ways(model_type):
    """``config.json`` as transformers writes it (its defaults, JSON infinity included) gives the
    model of the same sizes, and ``to_hf_config()`` is read by transformers' config class back to
    that model. (Configs need no torch; the models do: scripts/check_hf_parity.py.)"""
    transformers = pytest.importorskip("transformers")

    spec = {k: v for k, v in CONFIGS[model_type].items() if k != "model_type"}
    hf_type = CONFIGS[model_type]["model_type"]
    written = json.loads(transformers.AutoConfig.for_model(hf_type, **spec).to_json_string())
    cfg = run_config(written).model
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers) == (61, 32, 2)
    back = cfg.to_hf_config()
    assert back["model_type"] == hf_type
    assert back["architectures"][0] in ("GPT2LMHeadModel", "LlamaForCausalLM",
                                        "MistralForCausalLM", "Qwen2ForCausalLM",
                                        "MambaForCausalLM", "Mamba2ForCausalLM")
    reread = transformers.AutoConfig.for_model(back.pop("model_type"), **back)
    assert run_config(json.loads(reread.to_json_string())).model == cfg


def test_rope_scaling_in_either_config_format():
    """Llama 3.1's config.json as first published (``rope_scaling`` + a top-level
    ``rope_theta``) and transformers 5's ``rope_parameters`` give the same model; so does
    ``linear`` (old key ``type``)."""
    old = {**LLAMA, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}
    del old["rope_parameters"]
    new = {**LLAMA, "rope_parameters": {**old["rope_scaling"], "rope_theta": 5e5}}
    cfg = run_config(new).model
    assert run_config(old).model == cfg
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_len, cfg.rope_theta) == (
        "llama3", 8.0, 1.0, 4.0, 32, 5e5)
    linear = {**old, "rope_scaling": {"type": "linear", "factor": 2.0}}
    linear = run_config(linear).model
    assert (linear.rope_scaling, linear.rope_factor, linear.rope_theta) == ("linear", 2.0, 5e5)
    assert run_config(linear.to_hf_config()).model == linear
    with pytest.raises(ConfigError, match="rope_parameters .*'default'.* and rope_scaling "
                                          "\\(type 'linear'\\) disagree"):
        run_config({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_qwen2_sliding_window_options():
    """Qwen2's window applies where ``layer_types`` (from ``use_sliding_window`` and
    ``max_window_layers``) says: every layer -> ``sliding_window``; none -> no window; the
    written config is read back by transformers to the same layer types."""
    transformers = pytest.importorskip("transformers")

    def translate(**options):
        spec = {k: v for k, v in QWEN2.items() if k != "model_type"} | options
        written = transformers.AutoConfig.for_model("qwen2", **spec).to_json_string()
        return run_config(json.loads(written)).model

    every = translate(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert every.sliding_window == 4 and every.qkv_bias and not every.use_bias
    assert translate(use_sliding_window=True, sliding_window=4, max_window_layers=2) \
        .sliding_window is None
    assert translate(use_sliding_window=False, sliding_window=4).sliding_window is None
    back = every.to_hf_config()
    reread = transformers.AutoConfig.for_model(back.pop("model_type"), **back)
    assert reread.layer_types == ["sliding_attention"] * 2 and reread.sliding_window == 4
    assert run_config(json.loads(reread.to_json_string())).model == every


FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "llama3", "mistral", "qwen2", "mamba",
                                        "mamba2"])
def test_transformers_fixture(tmp_path, model_type):
    """A model made and run by transformers itself (scripts/make_hf_fixtures.py, torch): the
    converted model's logits within 1e-4, its 20 greedy tokens identical, and the round trip
    back to safetensors bit-exact."""
    from meshlm.generate import SamplingParams, generate

    hf = FIXTURES / model_type
    if not hf.is_dir():
        pytest.skip(f"no fixture {hf} (scripts/make_hf_fixtures.py makes them, with torch)")
    ref = np.load(hf / "reference.npz")
    hf_to_orbax(hf, tmp_path / "run")
    cfg, params = restore_params(tmp_path / "run")
    model = build_model(cfg.model)
    logits = model.apply({"params": params}, jnp.asarray(ref["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    greedy = generate(model, params, jnp.asarray(ref["prompt"]), jax.random.key(0),
                      max_new_tokens=ref["greedy"].shape[1],
                      sampling=SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(greedy), ref["greedy"])
    orbax_to_hf(tmp_path / "run", tmp_path / "back")
    assert_same_tensors(read_safetensors(tmp_path / "back"), read_safetensors(hf))
