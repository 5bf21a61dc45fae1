"""The RetNet family (Sun et al. 2023): multi-scale retention + FFN blocks.

Per block ``x + MSR(LN(x))`` then ``x + FFN(LN(x))``, a final LayerNorm and the LM head.
Retention trains in its chunkwise form on ``pallas_kernels.ssd`` (a constant scalar decay per
head) or its parallel form, and decodes with the recurrent form: O(1) state per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp

from meshlm.config import ConfigError, register_family
from meshlm.layers import Mlp
from meshlm.layers.retention import MultiScaleRetention
from meshlm.models.base import ACTIVATION_EMBED, DecoderLMConfig
from meshlm.models.mamba2 import SSDImplementation, check_chunk_size


@register_family("retnet")
@dataclasses.dataclass(frozen=True)
class RetNetConfig(DecoderLMConfig):
    """Query/key heads of ``d_model / n_heads`` features, value heads ``value_factor`` times
    wider; head ``h`` decays by ``1 - 2^(-5-h)``."""

    family: str = "retnet"
    n_heads: int = 4
    value_factor: int = 2
    d_ff: int = 512
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = False  # FFN biases
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    form: Literal["chunkwise", "parallel"] = "chunkwise"  # the training form
    chunk_size: int = 256
    implementation: SSDImplementation = "auto"  # pallas_kernels.ssd's, for the chunkwise form

    kernel_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.kernel_fields,
                                               "implementation": "ssd"}
    sharded_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.sharded_fields,
                                                "n_heads": "heads", "d_ff": "mlp"}

    def validate(self) -> None:
        super().validate()
        self.require_positive("n_heads", "value_factor", "d_ff")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} into "
                "heads of an even size (the rotation pairs features)"
            )
        check_chunk_size(self.chunk_size)

    def block(self) -> type[nn.Module]:
        return RetNetBlock

    def flops_per_token(self, seq_len: int) -> float:
        """``6 *`` the matmul parameters (q, k: ``E^2``; v, gate, out: ``value_factor E^2`` each;
        the FFN; the LM head) plus retention's products as SSD with ``N = dk``, ``P = dv``, one
        group per head (see ``Mamba2Config.flops_per_token``)."""
        e, h, vf = self.d_model, self.n_heads, self.value_factor
        dk, dv = e // h, vf * e // h
        q = min(self.chunk_size, seq_len)
        ffn = e * self.d_ff * (3 if self.mlp == "swiglu" else 2)
        params = self.n_layers * (2 * e * e + 3 * vf * e * e + ffn) + e * self.vocab_size
        retention = self.n_layers * (q * h * dk + q * h * dv + 4 * h * dk * dv)
        return 6.0 * params + 3.0 * retention


class RetNetBlock(nn.Module):
    """``x + msr(norm(x))`` then ``x + ffn(norm(x))``; returns ``(x, None)``."""

    config: RetNetConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.init_std)
        out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        h = MultiScaleRetention(
            num_heads=cfg.n_heads, value_factor=cfg.value_factor, form=cfg.form,
            chunk_size=cfg.chunk_size, implementation=cfg.implementation,
            rope_theta=cfg.rope_theta, group_norm=cfg.norm, norm_eps=cfg.norm_eps,
            decode=self.decode, dtype=dtype, param_dtype=param_dtype, kernel_init=init,
            out_kernel_init=out_init, name="retention",
        )(cfg.make_norm("retention_norm")(x), positions, segment_ids)
        x = x + h
        h = Mlp(d_ff=cfg.d_ff, kind=cfg.mlp, use_bias=cfg.use_bias, dtype=dtype,
                param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init,
                name="mlp")(cfg.make_norm("mlp_norm")(x))
        return nn.with_logical_constraint(x + h, ACTIVATION_EMBED), None
