"""The GPT family: a decoder-only pre-norm transformer (``models.base.DecoderLM`` with an
attention + MLP block).

``GPTConfig`` picks the variant: GPT-2 (learned positions, LayerNorm, GELU, biases, tied
embeddings) or LLaMA (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied), with
LLaMA's relatives: Llama-3 RoPE scaling, Mistral's sliding window, Qwen2's q/k/v biases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp

from meshlm.config import ConfigError, register_family
from meshlm.convert.mapping import (HFTensor, conv1d, hf_option, linear, reshaped, same,
                                    split)
from meshlm.layers import Attention, LearnedPositions, Mlp
from meshlm.layers.embeddings import RopeScaling
from meshlm.models.base import ACTIVATION_EMBED, DecoderLMConfig


@register_family("gpt")
@dataclasses.dataclass(frozen=True)
class GPTConfig(DecoderLMConfig):
    """GPT-2 = learned positions + LayerNorm + GELU + tied embeddings; LLaMA = RoPE + RMSNorm +
    SwiGLU + grouped-query attention + untied embeddings."""

    family: str = "gpt"
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 1024
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    # RoPE frequency scaling (see layers.embeddings.RopeScaling): "linear" uses rope_factor;
    # "llama3" also the low/high frequency factors and the pre-training context length.
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    sliding_window: int | None = None  # a token sees the latest w tokens (itself included)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); use_bias puts them everywhere
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True
    dropout: float = 0.0
    attention: Literal["auto", "xla", "cudnn", "triton", "mosaic_gpu", "tpu"] = "auto"
    # attention over a sequence-sharded length (mesh.sequence > 1): layers/ring_attention.py
    context_parallel: Literal["ring", "ulysses"] = "ring"
    # One q/k/v product whose (batch, len, heads, 3, head_dim) output the attention kernels read
    # in place (flash_attention_qkv), when there is no RoPE and n_kv_heads = n_heads; the
    # parameters stay the three projections'. On in the GPT-2 125M / 350M and 1.3B configs, where
    # it was timed (1.042x / 1.040x / 1.018x the step on an H200, BENCHMARKS.md session 18); a
    # model that cannot take it (RoPE, grouped kv heads) must leave it off.
    fuse_qkv: bool = False
    # The GELU MLP's pallas_kernels.bias_gelu implementation: "triton" runs its backward as one
    # Triton kernel (the pre-activation's and the bias's gradients in one pass); "auto" keeps
    # XLA's fusion until the kernel is timed against it.
    mlp_implementation: Literal["auto", "xla", "triton"] = "auto"

    kernel_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.kernel_fields,
                                               "attention": "flash_attention",
                                               "mlp_implementation": "bias_gelu"}
    # field -> the logical axis its dimension is split by (validate_mesh checks divisibility)
    sharded_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.sharded_fields,
                                                "n_heads": "heads", "kv_heads": "kv_heads",
                                                "d_ff": "mlp"}
    supports_context_parallel: ClassVar[bool] = True

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def validate(self) -> None:
        super().validate()
        self.require_positive("n_heads", "d_ff")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly"
            )
        if self.position == "rope" and self.dim_per_head % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.fuse_qkv and (self.position == "rope" or self.kv_heads != self.n_heads):
            raise ConfigError(
                f"model.fuse_qkv needs model.position='learned' and model.n_kv_heads = n_heads "
                f"(the attention kernels read q, k and v unchanged from one product), got "
                f"position={self.position!r}, n_kv_heads={self.kv_heads}, n_heads={self.n_heads}")
        if self.rope_scaling != "none":
            if self.position != "rope":
                raise ConfigError(f"model.rope_scaling={self.rope_scaling!r} needs "
                                  f"model.position='rope', got {self.position!r}")
            try:
                self.rope_scaling_spec
            except ValueError as e:
                raise ConfigError(f"model.rope_*: {e}") from None
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(
                f"model.sliding_window must be null (whole context) or >= 1, got "
                f"{self.sliding_window}")
        if self.qkv_bias and self.use_bias:
            raise ConfigError("model.qkv_bias=true with model.use_bias=true: use_bias already "
                              "gives q/k/v their biases; set one of them")

    def validate_mesh(self, axis_size) -> None:
        super().validate_mesh(axis_size)
        shards = axis_size("activation_length")
        if shards > 1 and self.sliding_window is not None:
            raise ConfigError(f"model.sliding_window={self.sliding_window} has no context "
                              f"parallelism (mesh.sequence={shards}); use mesh.sequence=1")
        if shards > 1 and self.context_parallel == "ulysses":
            for name, heads, logical in (("n_heads", self.n_heads, "activation_heads"),
                                         ("kv_heads", self.kv_heads, "activation_kv_heads")):
                if (heads // axis_size(logical)) % shards:
                    raise ConfigError(
                        f"model.context_parallel=ulysses splits heads over the {shards} sequence "
                        f"shards, but model.{name}={heads} over {axis_size(logical)} tensor "
                        f"shards leaves {heads // axis_size(logical)} per device; use "
                        "model.context_parallel=ring")

    @property
    def rope_scaling_spec(self) -> RopeScaling | None:
        if self.rope_scaling == "none":
            return None
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_low_freq_factor,
                           self.rope_high_freq_factor, self.rope_original_max_len)

    def block(self) -> type[nn.Module]:
        return Block

    def feed_forward(self, x, segment_ids, **layer_kwargs):
        """The block's position-wise layer on the normalised ``x`` (called inside ``Block``, so it
        creates the block's parameters): the dense MLP here; the MoE family swaps in experts."""
        return Mlp(d_ff=self.d_ff, kind=self.mlp, use_bias=self.use_bias, name="mlp",
                   implementation=self.mlp_implementation, **layer_kwargs)(x)

    @property
    def norm_bias(self) -> bool:
        return self.use_bias

    @property
    def uses_dropout(self) -> bool:
        return self.dropout > 0

    @property
    def context_length(self) -> int | None:
        return self.max_seq_len if self.position == "learned" else None

    def add_positions(self, x, positions):
        if self.position != "learned":
            return x
        return x + LearnedPositions(self.max_seq_len, self.d_model, init_std=self.init_std,
                                    dtype=jnp.dtype(self.dtype),
                                    param_dtype=jnp.dtype(self.param_dtype),
                                    name="position_embed")(positions)

    def flops_per_token(self, seq_len: int) -> float:
        """PaLM appendix B convention: ``6 * N`` for the matmul parameters N (attention q/k/v/out
        and MLP kernels of every layer, plus the ``d_model * vocab`` LM head, counted even when
        tied because the product is computed), plus attention scores and the weighted sum:
        ``2 * 2 * seq_len * n_heads * head_dim`` forward per layer, times 3 for the backward,
        halved because causal attention needs only the lower triangle (with a sliding window
        ``w < seq_len``, ``seq_len`` becomes ``2w - w^2 / seq_len``: twice the mean number of
        keys a query sees). Embedding lookups, norms, biases and activations are not counted
        (not matmuls)."""
        d, hd = self.d_model, self.dim_per_head
        attention = d * self.n_heads * hd * 2 + d * self.kv_heads * hd * 2
        mlp = d * self.d_ff * (3 if self.mlp == "swiglu" else 2)
        matmul_params = self.n_layers * (attention + mlp) + d * self.vocab_size
        w = self.sliding_window
        span = seq_len if w is None or w >= seq_len else 2 * w - w * w / seq_len
        return 6.0 * matmul_params + 6.0 * self.n_layers * span * self.n_heads * hd


    # ------------------------------------------------------------------ HuggingFace mapping
    # GPT-2 (``GPT2LMHeadModel``) and LLaMA / Mistral / Qwen2 (``LlamaForCausalLM``,
    # ``MistralForCausalLM``, ``Qwen2ForCausalLM``). HF LLaMA's RoPE is the rotate-half form of
    # ``apply_rope`` (feature i pairs with i + D/2, same frequencies), so q/k rows are copied
    # unpermuted. Written back, a rope model is Qwen2 when it has q/k/v biases only, Mistral when
    # it has a sliding window, else LLaMA.

    hf_model_types: ClassVar[tuple[str, ...]] = ("gpt2", "llama", "mistral", "qwen2")
    # GPT-2's cached causal mask buffers; LLaMA's cached RoPE frequencies (older checkpoints)
    hf_ignored: ClassVar[tuple[str, ...]] = (r"\.attn\.(masked_)?bias$", r"rotary_emb\.inv_freq$")

    @classmethod
    def from_hf_config(cls, hf: dict) -> "GPTConfig":
        if hf["model_type"] == "gpt2":
            hf_option(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
            for key, default in (("scale_attn_by_inverse_layer_idx", False),
                                 ("add_cross_attention", False), ("scale_attn_weights", True)):
                hf_option(hf, key, (default,), default)
            d = hf["n_embd"]
            return cls(vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], d_model=d,
                       n_layers=hf["n_layer"], n_heads=hf["n_head"],
                       d_ff=hf.get("n_inner") or 4 * d, position="learned", norm="layernorm",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", use_bias=True,
                       tie_embeddings=hf.get("tie_word_embeddings", True))
        hf_option(hf, "hidden_act", ("silu",), "silu")
        bias, qkv_bias = hf.get("attention_bias", False), False
        if hf["model_type"] == "qwen2":  # q/k/v always biased, o_proj and the MLP never
            bias, qkv_bias = False, True
        elif hf.get("mlp_bias", False) != bias:
            raise ConfigError(f"config.json: attention_bias={bias} with mlp_bias="
                              f"{hf.get('mlp_bias')} is not supported (meshlm's use_bias is both)")
        heads = hf["num_attention_heads"]
        return cls(vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
                   d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
                   n_kv_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                   d_ff=hf["intermediate_size"], position="rope", **_rope_from_hf(hf),
                   sliding_window=_window_from_hf(hf), norm="rmsnorm",
                   norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", use_bias=bias,
                   qkv_bias=qkv_bias, tie_embeddings=hf.get("tie_word_embeddings", False))

    def _hf_model_type(self) -> str:
        variant = (self.position, self.norm, self.mlp)
        if (variant == ("learned", "layernorm", "gelu") and self.use_bias
                and self.sliding_window is None):
            return "gpt2"
        if variant == ("rope", "rmsnorm", "swiglu"):
            if self.qkv_bias:
                return "qwen2"
            if self.sliding_window is None:
                return "llama"
            if not self.use_bias:
                return "mistral"
        raise ConfigError(
            f"no HuggingFace model_type has position={self.position!r}, norm={self.norm!r}, "
            f"mlp={self.mlp!r}, use_bias={self.use_bias}, sliding_window={self.sliding_window} "
            "(gpt2: learned, layernorm, gelu, biases, no window; llama: rope, rmsnorm, swiglu, "
            "no window; mistral: llama's without biases, a window; qwen2: llama's with qkv_bias)")

    def to_hf_config(self) -> dict:
        model_type = self._hf_model_type()
        if model_type == "gpt2":
            return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                        vocab_size=self.vocab_size, n_positions=self.max_seq_len,
                        n_embd=self.d_model, n_layer=self.n_layers, n_head=self.n_heads,
                        n_inner=self.d_ff, activation_function="gelu_new",
                        layer_norm_epsilon=self.norm_eps, tie_word_embeddings=self.tie_embeddings)
        rope = {"rope_type": "default" if self.rope_scaling == "none" else self.rope_scaling,
                "rope_theta": self.rope_theta}
        if self.rope_scaling != "none":
            rope["factor"] = self.rope_factor
        if self.rope_scaling == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_len)
        architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM"}[model_type]
        out = dict(model_type=model_type, architectures=[architecture],
                   vocab_size=self.vocab_size, max_position_embeddings=self.max_seq_len,
                   hidden_size=self.d_model, num_hidden_layers=self.n_layers,
                   num_attention_heads=self.n_heads, num_key_value_heads=self.kv_heads,
                   head_dim=self.dim_per_head, intermediate_size=self.d_ff, hidden_act="silu",
                   rms_norm_eps=self.norm_eps, rope_parameters=rope,
                   tie_word_embeddings=self.tie_embeddings)
        if model_type == "llama":
            out.update(attention_bias=self.use_bias, mlp_bias=self.use_bias)
        elif model_type == "mistral":
            out.update(sliding_window=self.sliding_window)
        else:  # every layer slides (max_window_layers=0) or none does
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window, max_window_layers=0)
        return out

    def hf_tensors(self) -> list[HFTensor]:
        h, kv, d, e = self.n_heads, self.kv_heads, self.dim_per_head, self.d_model
        if self._hf_model_type() == "gpt2":
            return self._gpt2_tensors(h, d, e)
        layer, bias = "model.layers.{i}.", self.use_bias
        table = [same("model.embed_tokens.weight", "embed/embedding"),
                 same("model.norm.weight", "final_norm/scale"),
                 same(layer + "input_layernorm.weight", "attention_norm/scale"),
                 same(layer + "post_attention_layernorm.weight", "mlp_norm/scale"),
                 linear(layer + "self_attn.o_proj.weight", "attention/out/kernel", in_shape=(h, d))]
        for name, param, heads in (("q", "query", h), ("k", "key", kv), ("v", "value", kv)):
            table.append(linear(f"{layer}self_attn.{name}_proj.weight",
                                f"attention/{param}/kernel", out_shape=(heads, d)))
            if bias or self.qkv_bias:
                table.append(reshaped(f"{layer}self_attn.{name}_proj.bias",
                                      f"attention/{param}/bias", (heads, d)))
        for name, param in (("gate", "wi_gate"), ("up", "wi_up"), ("down", "wo")):
            table.append(linear(f"{layer}mlp.{name}_proj.weight", f"mlp/{param}/kernel"))
            if bias:
                table.append(same(f"{layer}mlp.{name}_proj.bias", f"mlp/{param}/bias"))
        if bias:
            table.append(same(layer + "self_attn.o_proj.bias", "attention/out/bias"))
        if not self.tie_embeddings:
            table.append(linear("lm_head.weight", "lm_head"))
        return table

    def _gpt2_tensors(self, h: int, d: int, e: int) -> list[HFTensor]:
        """GPT-2's ``Conv1D`` weights are already ``(in, out)``; ``c_attn`` fuses q, k, v."""
        layer = "transformer.h.{i}."
        qkv = tuple(f"attention/{n}/kernel" for n in ("query", "key", "value"))
        table = [
            same("transformer.wte.weight", "embed/embedding"),
            same("transformer.wpe.weight", "position_embed/embedding"),
            split(layer + "attn.c_attn.weight", qkv, (h * d,) * 3, axis=1,
                  to_parts=lambda w, _: w.reshape(e, h, d),
                  from_parts=lambda k, _: k.reshape(e, -1)),
            split(layer + "attn.c_attn.bias", tuple(p.replace("kernel", "bias") for p in qkv),
                  (h * d,) * 3, axis=0, to_parts=lambda b, _: b.reshape(h, d),
                  from_parts=lambda b, _: b.reshape(-1)),
            conv1d(layer + "attn.c_proj.weight", "attention/out/kernel", in_shape=(h, d)),
            same(layer + "attn.c_proj.bias", "attention/out/bias"),
            conv1d(layer + "mlp.c_fc.weight", "mlp/wi/kernel"),
            same(layer + "mlp.c_fc.bias", "mlp/wi/bias"),
            conv1d(layer + "mlp.c_proj.weight", "mlp/wo/kernel"),
            same(layer + "mlp.c_proj.bias", "mlp/wo/bias"),
        ]
        for hf_norm, norm in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
            table += [same(f"{layer}{hf_norm}.weight", f"{norm}/scale"),
                      same(f"{layer}{hf_norm}.bias", f"{norm}/bias")]
        table += [same("transformer.ln_f.weight", "final_norm/scale"),
                  same("transformer.ln_f.bias", "final_norm/bias")]
        if not self.tie_embeddings:
            table.append(linear("lm_head.weight", "lm_head"))
        return table


_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_from_hf(hf: dict) -> dict:
    """``GPTConfig``'s rope fields from ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling`` + top-level ``rope_theta``."""
    kind_of = lambda r: r.get("rope_type", r.get("type", "default"))
    rope, old = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if rope and old and kind_of(rope) != kind_of(old):
        raise ConfigError(f"config.json: rope_parameters (rope_type {kind_of(rope)!r}) and "
                          f"rope_scaling (type {kind_of(old)!r}) disagree")
    rope = rope or old
    kind = kind_of(rope)
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"config.json: rope scaling type {kind!r} (rope_parameters/"
                          f"rope_scaling) is not supported (supported: "
                          f"{', '.join(repr(t) for t in _ROPE_TYPES)})")
    hf_option(rope, "partial_rotary_factor", (1.0,), 1.0)
    out = dict(rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if kind == "default":
        return out
    out.update(rope_scaling=kind, rope_factor=float(rope["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_len=int(rope.get("original_max_position_embeddings",
                                                      hf["max_position_embeddings"])))
    return out


def _window_from_hf(hf: dict) -> int | None:
    """Mistral's ``sliding_window`` (null: none), or Qwen2's where every layer slides (its
    ``layer_types``, by default the layers from ``max_window_layers`` on when
    ``use_sliding_window``); a mix of sliding and full layers is refused."""
    if hf["model_type"] == "mistral":
        return hf.get("sliding_window")
    if hf["model_type"] != "qwen2":
        return None
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    if window is None:
        return None
    n, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                      for i in range(n)]
    if len(set(types)) > 1:
        raise ConfigError(
            f"config.json: use_sliding_window=true with layer_types {types} (max_window_layers="
            f"{first}) is not supported: meshlm's sliding_window applies to every layer or none")
    return window if types[0] == "sliding_attention" else None


class Block(nn.Module):
    """``x + drop(attn(norm(x)))`` then ``x + drop(mlp(norm(x)))``; returns ``(x, None)`` so the
    same module is a ``nn.scan`` body."""

    config: GPTConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.init_std)
        # GPT-2: residual-branch output projections scaled by 1/sqrt(2 * n_layers) so the
        # residual stream's variance does not grow with depth.
        out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))

        h = Attention(
            num_heads=cfg.n_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
            use_bias=cfg.use_bias, qkv_bias=cfg.qkv_bias, rope=cfg.position == "rope",
            rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling_spec,
            sliding_window=cfg.sliding_window, implementation=cfg.attention,
            context_parallel=cfg.context_parallel, fuse_qkv=cfg.fuse_qkv, decode=self.decode,
            dtype=dtype, param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init,
            name="attention",
        )(cfg.make_norm("attention_norm")(x), positions, segment_ids)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = cfg.feed_forward(cfg.make_norm("mlp_norm")(x), segment_ids, dtype=dtype,
                             param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_EMBED), None
