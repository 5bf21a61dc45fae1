"""The Mamba-1 family (``MambaForCausalLM``): a stack of pre-norm residual Mamba mixers.

Per block ``x + MambaMixer(RMSNorm(x))`` (the mixer runs ``pallas_kernels.selective_scan``), a
final RMSNorm and, by default, tied embeddings. There is no attention and no position table:
decoding keeps O(1) state per token (the conv window and the SSM state) and any length runs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp

from meshlm.config import register_family
from meshlm.layers.mamba import MambaMixer
from meshlm.models.base import ACTIVATION_EMBED, DecoderLMConfig
from pallas_kernels.selective_scan.api import IMPLEMENTATIONS

ScanImplementation = Literal[IMPLEMENTATIONS]


@register_family("mamba")
@dataclasses.dataclass(frozen=True)
class MambaConfig(DecoderLMConfig):
    """Mamba-1: ``d_inner = expand * d_model`` channels, each with a ``d_state`` SSM."""

    family: str = "mamba"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    use_bias: bool = False  # in_proj / out_proj biases
    use_conv_bias: bool = True
    implementation: ScanImplementation = "auto"  # pallas_kernels.selective_scan's

    sharded_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.sharded_fields,
                                                "d_inner": "inner"}

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return -(-self.d_model // 16) if self.dt_rank is None else self.dt_rank

    def validate(self) -> None:
        super().validate()
        self.require_positive("d_state", "d_conv", "expand", "rank")

    def block(self) -> type[nn.Module]:
        return MambaBlock

    def flops_per_token(self, seq_len: int) -> float:
        """``6 *`` the matmul parameters (in_proj, x_proj, dt_proj, out_proj of every layer and
        the LM head). The selective scan and the depthwise conv are elementwise, not counted."""
        e, i, n, r = self.d_model, self.d_inner, self.d_state, self.rank
        per_layer = e * 2 * i + i * (r + 2 * n) + r * i + i * e
        return 6.0 * (self.n_layers * per_layer + e * self.vocab_size)


class MambaBlock(nn.Module):
    """``x + mixer(norm(x))``; returns ``(x, None)`` (an ``nn.scan`` body). Positions unused."""

    config: MambaConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        h = MambaMixer(
            d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank,
            use_bias=cfg.use_bias, use_conv_bias=cfg.use_conv_bias,
            implementation=cfg.implementation, decode=self.decode, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nn.initializers.normal(cfg.init_std),
            out_kernel_init=nn.initializers.normal(cfg.init_std), name="mixer",
        )(cfg.make_norm("norm")(x), segment_ids)
        return nn.with_logical_constraint(x + h, ACTIVATION_EMBED), None
