"""HuggingFace Mixtral and Qwen2-MoE checkpoints <-> meshlm MoE run directories.

The checkpoints are written here: random float32 tensors under the names and torch layouts of
``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM`` as the Hub stores them (one Linear per expert),
transcribed from transformers' sources independently of the MoE family's table. Checked:
HF -> Orbax -> HF is bit-exact, and the converted model's logits equal a plain-numpy forward of
HF's math (softmax router, top-k, Mixtral's renormalised weights, Qwen2-MoE's sigmoid-gated
shared expert and q/k/v biases) over the HF tensors themselves.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import test_convert as dense
from _helpers import assert_same_tensors, read_safetensors

from meshlm.config import ConfigError
from meshlm.convert.hf import hf_to_orbax, orbax_to_hf
from meshlm.models import build_model
from meshlm.models.moe import MoEConfig
from meshlm.train.checkpoint import restore_params

BASE = dict(vocab_size=61, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
            tie_word_embeddings=False, router_aux_loss_coef=0.02)
MIXTRAL = {**BASE, "model_type": "mixtral", "intermediate_size": 24, "num_local_experts": 4,
           "num_experts_per_tok": 2, "sliding_window": None}
QWEN2_MOE = {**BASE, "model_type": "qwen2_moe", "intermediate_size": 40,
             "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
             "num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": False,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
             "qkv_bias": True}
CONFIGS = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE}


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The Hub checkpoint's names and torch shapes (modeling_mixtral / modeling_qwen2_moe)."""
    e, v, h, kv = c["hidden_size"], c["vocab_size"], c["num_attention_heads"], \
        c["num_key_value_heads"]
    d = e // h
    out = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,),
           "lm_head.weight": (v, e)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
                    p + "self_attn.q_proj.weight": (h * d, e),
                    p + "self_attn.k_proj.weight": (kv * d, e),
                    p + "self_attn.v_proj.weight": (kv * d, e),
                    p + "self_attn.o_proj.weight": (e, h * d)})
        if c["model_type"] == "mixtral":
            f, n = c["intermediate_size"], c["num_local_experts"]
            out[p + "block_sparse_moe.gate.weight"] = (n, e)
            for j in range(n):
                x = f"{p}block_sparse_moe.experts.{j}."
                out.update({x + "w1.weight": (f, e), x + "w3.weight": (f, e),
                            x + "w2.weight": (e, f)})
            continue
        f, n, s = c["moe_intermediate_size"], c["num_experts"], c["shared_expert_intermediate_size"]
        out.update({p + "self_attn.q_proj.bias": (h * d,), p + "self_attn.k_proj.bias": (kv * d,),
                    p + "self_attn.v_proj.bias": (kv * d,), p + "mlp.gate.weight": (n, e),
                    p + "mlp.shared_expert_gate.weight": (1, e)})
        for name, shape in (("gate_proj", (s, e)), ("up_proj", (s, e)), ("down_proj", (e, s))):
            out[f"{p}mlp.shared_expert.{name}.weight"] = shape
        for j in range(n):
            x = f"{p}mlp.experts.{j}."
            out.update({x + "gate_proj.weight": (f, e), x + "up_proj.weight": (f, e),
                        x + "down_proj.weight": (e, f)})
    return out


def _random_state(c: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: ((1.0 if "norm" in n else 0.0) + (0.3 if len(s) > 1 else 0.1)
                * rng.standard_normal(s)).astype(np.float32) for n, s in _shapes(c).items()}


def _swiglu(x, gate, up, down):
    g = x @ gate.T
    return (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T


def _moe_block(c, w, p, x):
    """HF's sparse MoE block on ``x (tokens, embed)``: softmax router, top-k, Mixtral renormalises
    (Qwen2-MoE when norm_topk_prob), each expert's SwiGLU; Qwen2-MoE adds the shared expert times
    sigmoid(shared_expert_gate)."""
    mixtral = c["model_type"] == "mixtral"
    block = p + ("block_sparse_moe." if mixtral else "mlp.")
    logits = x @ w[block + "gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = c["num_experts_per_tok"]
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weight = np.take_along_axis(probs, top, -1)
    if mixtral or c["norm_topk_prob"]:
        weight /= weight.sum(-1, keepdims=True)
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(k):
            ex = f"{block}experts.{top[t, j]}."
            out[t] += weight[t, j] * _swiglu(x[t], *(w[ex + n + ".weight"] for n in names))
    if not mixtral:
        shared = _swiglu(x, *(w[f"{block}shared_expert.{n}.weight"] for n in names))
        gate = x @ w[block + "shared_expert_gate.weight"].T
        out += shared / (1 + np.exp(-gate))
    return out


def _forward(c, w, tokens):
    """The decoder of ``test_convert._llama_forward`` with the MoE block as the MLP."""
    h, kv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    d = c["hidden_size"] // h
    b, length = tokens.shape
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = dense._rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = ((y @ w[f"{p}self_attn.{n}_proj.weight"].T
                    + w.get(f"{p}self_attn.{n}_proj.bias", 0.0)).reshape(b, length, heads, d)
                   for n, heads in (("q", h), ("k", kv), ("v", kv)))
        rope = c["rope_parameters"]
        q, k = dense._rotate_half_rope(q, rope), dense._rotate_half_rope(k, rope)
        x = x + dense._attention(q, k, v) @ w[p + "self_attn.o_proj.weight"].T
        y = dense._rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + _moe_block(c, w, p, y.reshape(-1, y.shape[-1])).reshape(x.shape)
    return dense._rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_round_trip_is_bit_exact_and_logits_match_hf_math(tmp_path, model_type):
    c = CONFIGS[model_type]
    state = _random_state(c, seed=1)
    hf = dense._write_hf(tmp_path / "hf", c, state, shards=2)
    cfg = hf_to_orbax(hf, tmp_path / "run")
    m = cfg.model
    assert (m.family, m.n_experts, m.top_k) == ("moe", *(
        (4, 2) if model_type == "mixtral" else (6, 3)))
    assert m.load_balance_coef == pytest.approx(0.02 * m.top_k)
    back = orbax_to_hf(tmp_path / "run", tmp_path / "back", max_shard_bytes=8192)
    assert_same_tensors(read_safetensors(tmp_path / "back"), state)
    assert back["model_type"] == model_type
    assert hf_to_orbax(tmp_path / "back", tmp_path / "again").model == m

    _, params = restore_params(tmp_path / "run")
    tokens = np.random.default_rng(2).integers(0, c["vocab_size"], (2, 12))
    logits = build_model(m).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    expected = _forward(c, {k: v.astype(np.float64) for k, v in state.items()}, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=dense.ATOL, rtol=dense.RTOL)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "qwen2_moe", "decoder_sparse_step": 2}, r"decoder_sparse_step=2"),
    ({"model_type": "qwen2_moe", "shared_expert_intermediate_size": 20},
     r"shared_expert_intermediate_size=20 is not supported"),
])
def test_unsupported_hf_options_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        MoEConfig.from_hf_config({**CONFIGS[change["model_type"]], **change})


def test_a_moe_without_a_hf_layout_is_refused():
    m = MoEConfig.from_hf_config(MIXTRAL)
    with pytest.raises(ConfigError, match="no HuggingFace model_type has this MoE"):
        dataclasses.replace(m, router="sigmoid").to_hf_config()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_transformers_configs_translate_both_ways(model_type):
    """transformers' own config.json (defaults filled in) -> MoEConfig -> config.json that
    transformers reads back -> the same MoEConfig."""
    import json

    import transformers

    from scripts.make_hf_fixtures import SPECS

    def through_transformers(spec):
        spec = {k: v for k, v in spec.items() if k != "model_type"}
        return json.loads(transformers.AutoConfig.for_model(model_type, **spec).to_json_string())

    m = MoEConfig.from_hf_config(through_transformers(SPECS[model_type]))
    assert MoEConfig.from_hf_config(through_transformers(m.to_hf_config())) == m


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_transformers_fixture(tmp_path, model_type):
    """``test_convert.test_transformers_fixture`` (logits, greedy tokens, round trip) on the
    fixtures scripts/make_hf_fixtures.py makes with torch; skips until they exist."""
    dense.test_transformers_fixture(tmp_path, model_type)
