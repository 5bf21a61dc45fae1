"""The GPT family: a decoder-only pre-norm transformer.

``GPTConfig`` picks the variant: GPT-2 (learned positions, LayerNorm, GELU, biases, tied
embeddings) or LLaMA (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied). Layers
are stacked by ``layers.stack.apply_stack`` (scanned or unrolled, optionally rematerialised).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp

from meshlm.config import ConfigError, register_family
from meshlm.layers import Attention, Embed, LearnedPositions, Mlp, make_norm
from meshlm.layers.embeddings import logits_matmul
from meshlm.layers.stack import apply_stack
from meshlm.models.base import DecoderLMConfig


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
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention: Literal["auto", "xla", "cudnn", "triton", "mosaic_gpu", "tpu"] = "auto"

    # field -> the logical axis its dimension is split by (validate_mesh checks divisibility)
    sharded_fields: ClassVar[dict[str, str]] = {"n_heads": "heads", "kv_heads": "kv_heads",
                                                "d_ff": "mlp"}

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

    def build(self) -> nn.Module:
        return GPT(self)

    def flops_per_token(self, seq_len: int) -> float:
        """PaLM appendix B convention: ``6 * N`` for the matmul parameters N (attention q/k/v/out
        and MLP kernels of every layer, plus the ``d_model * vocab`` LM head, counted even when
        tied because the product is computed), plus attention scores and the weighted sum:
        ``2 * 2 * seq_len * n_heads * head_dim`` forward per layer, times 3 for the backward,
        halved because causal attention needs only the lower triangle. Embedding lookups, norms,
        biases and activations are not counted (not matmuls)."""
        d, hd = self.d_model, self.dim_per_head
        attention = d * self.n_heads * hd * 2 + d * self.kv_heads * hd * 2
        mlp = d * self.d_ff * (3 if self.mlp == "swiglu" else 2)
        matmul_params = self.n_layers * (attention + mlp) + d * self.vocab_size
        return 6.0 * matmul_params + 6.0 * self.n_layers * seq_len * self.n_heads * hd


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

        def norm(name):
            return make_norm(cfg.norm, epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype,
                             param_dtype=param_dtype, name=name)

        h = Attention(
            num_heads=cfg.n_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
            use_bias=cfg.use_bias, rope=cfg.position == "rope", rope_theta=cfg.rope_theta,
            implementation=cfg.attention, decode=self.decode, dtype=dtype,
            param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init, name="attention",
        )(norm("attention_norm")(x), positions, segment_ids)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = Mlp(
            d_ff=cfg.d_ff, kind=cfg.mlp, use_bias=cfg.use_bias, dtype=dtype,
            param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init, name="mlp",
        )(norm("mlp_norm")(x))
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed")), None


class GPT(nn.Module):
    """Tokens ``(batch, length)`` -> float32 logits ``(batch, length, vocab)``.

    ``positions`` default to ``0..length-1`` (with ``decode=True``: continuing from the number of
    tokens already cached). ``segment_ids`` (0 = padding) confine attention to each packed
    document; the caller restarts ``positions`` at every document.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
                 decode: bool = False):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length = tokens.shape
        if cfg.position == "learned" and length > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {length} exceeds model.max_seq_len={cfg.max_seq_len} (the size "
                "of the learned position table)"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            if decode:
                index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
                if not self.is_initializing():
                    positions = positions + index.value
                    index.value = index.value + length

        embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=dtype,
                      param_dtype=param_dtype, name="embed")
        x = embed(tokens)
        if cfg.position == "learned":
            x = x + LearnedPositions(cfg.max_seq_len, cfg.d_model, init_std=cfg.init_std,
                                     dtype=dtype, param_dtype=param_dtype,
                                     name="position_embed")(positions)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

        x = apply_stack(Block, x, positions, segment_ids, n_layers=cfg.n_layers,
                        scan=cfg.scan_layers, remat=cfg.remat, config=cfg,
                        deterministic=deterministic, decode=decode)
        x = make_norm(cfg.norm, epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype,
                      param_dtype=param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                             ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), param_dtype,
            )
            logits = logits_matmul(x.astype(dtype), head.astype(dtype), False)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
