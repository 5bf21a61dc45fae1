"""The GPT family: a decoder-only pre-norm transformer (``models.base.DecoderLM`` with an
attention + MLP block).

``GPTConfig`` picks the variant: GPT-2 (learned positions, LayerNorm, GELU, biases, tied
embeddings) or LLaMA (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp

from meshlm.config import ConfigError, register_family
from meshlm.layers import Attention, LearnedPositions, Mlp
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
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True
    dropout: float = 0.0
    attention: Literal["auto", "xla", "cudnn", "triton", "mosaic_gpu", "tpu"] = "auto"

    # field -> the logical axis its dimension is split by (validate_mesh checks divisibility)
    sharded_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.sharded_fields,
                                                "n_heads": "heads", "kv_heads": "kv_heads",
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

    def block(self) -> type[nn.Module]:
        return Block

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

        h = Attention(
            num_heads=cfg.n_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
            use_bias=cfg.use_bias, rope=cfg.position == "rope", rope_theta=cfg.rope_theta,
            implementation=cfg.attention, decode=self.decode, dtype=dtype,
            param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init, name="attention",
        )(cfg.make_norm("attention_norm")(x), positions, segment_ids)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = Mlp(
            d_ff=cfg.d_ff, kind=cfg.mlp, use_bias=cfg.use_bias, dtype=dtype,
            param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init, name="mlp",
        )(cfg.make_norm("mlp_norm")(x))
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_EMBED), None
