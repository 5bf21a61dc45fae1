"""The Mamba-2 family (``Mamba2ForCausalLM``): a stack of pre-norm residual Mamba-2 mixers.

Per block ``x + Mamba2Mixer(RMSNorm(x))`` (the mixer runs ``pallas_kernels.ssd``: heads of
``head_dim`` channels sharing a scalar decay, ``n_groups`` groups of B/C), a final RMSNorm and,
by default, tied embeddings. Decoding keeps O(1) state per token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp

from meshlm.config import ConfigError, register_family
from meshlm.layers.mamba import Mamba2Mixer
from meshlm.models.base import ACTIVATION_EMBED, DecoderLMConfig
from pallas_kernels.ssd.api import IMPLEMENTATIONS

SSDImplementation = Literal[IMPLEMENTATIONS]


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ConfigError(f"model.chunk_size must be a power of two, got {chunk_size}")


@register_family("mamba2")
@dataclasses.dataclass(frozen=True)
class Mamba2Config(DecoderLMConfig):
    """Mamba-2: ``d_inner = expand * d_model`` channels in ``d_inner / head_dim`` heads."""

    family: str = "mamba2"
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256  # SSD chunk length (a power of two)
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_per_group: bool = True  # gated RMSNorm per B/C group (mamba_ssm); False: over d_inner (HF)
    implementation: SSDImplementation = "auto"  # pallas_kernels.ssd's

    sharded_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.sharded_fields,
                                                "d_inner": "inner", "n_heads": "heads"}

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    def validate(self) -> None:
        super().validate()
        self.require_positive("d_state", "d_conv", "expand", "head_dim", "n_groups")
        if self.d_inner % self.head_dim:
            raise ConfigError(
                f"model.head_dim={self.head_dim} must divide d_inner = model.expand * "
                f"model.d_model = {self.d_inner}"
            )
        if self.n_heads % self.n_groups:
            raise ConfigError(
                f"model.n_groups={self.n_groups} must divide the {self.n_heads} heads "
                "(d_inner / head_dim)"
            )
        check_chunk_size(self.chunk_size)

    def block(self) -> type[nn.Module]:
        return Mamba2Block

    def flops_per_token(self, seq_len: int) -> float:
        """``6 *`` the matmul parameters (the z/x/B/C/dt projections, out_proj, the LM head)
        plus the SSD's matrix products, forward per token and layer: ``C B^T`` inside a chunk
        (``Q G N``, causal half of ``2 Q G N``), its weighted sum of x (``Q H P``), and the chunk
        states in and out (``4 H P N``), times 3 for the backward (``Q = min(chunk, seq_len)``)."""
        e, i, n, g, h, p = (self.d_model, self.d_inner, self.d_state, self.n_groups,
                            self.n_heads, self.head_dim)
        q = min(self.chunk_size, seq_len)
        params = self.n_layers * (e * (2 * i + 2 * g * n + h) + i * e) + e * self.vocab_size
        ssd = self.n_layers * (q * g * n + q * h * p + 4 * h * p * n)
        return 6.0 * params + 3.0 * ssd


class Mamba2Block(nn.Module):
    """``x + mixer(norm(x))``; returns ``(x, None)`` (an ``nn.scan`` body). Positions unused."""

    config: Mamba2Config
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        h = Mamba2Mixer(
            d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, head_dim=cfg.head_dim,
            n_groups=cfg.n_groups, chunk_size=cfg.chunk_size, use_bias=cfg.use_bias,
            use_conv_bias=cfg.use_conv_bias, norm_eps=cfg.norm_eps,
            norm_per_group=cfg.norm_per_group, implementation=cfg.implementation,
            decode=self.decode, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nn.initializers.normal(cfg.init_std),
            out_kernel_init=nn.initializers.normal(cfg.init_std), name="mixer",
        )(cfg.make_norm("norm")(x), segment_ids)
        return nn.with_logical_constraint(x + h, ACTIVATION_EMBED), None
