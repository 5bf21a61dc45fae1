"""The Mamba-2 family (``Mamba2ForCausalLM``): a stack of pre-norm residual Mamba-2 mixers.

Per block ``x + Mamba2Mixer(RMSNorm(x))`` (the mixer runs ``pallas_kernels.ssd``: heads of
``head_dim`` channels sharing a scalar decay, ``n_groups`` groups of B/C), a final RMSNorm and,
by default, tied embeddings. Decoding keeps O(1) state per token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import flax.linen as nn

from meshlm.config import ConfigError, register_family
from meshlm.convert.mapping import HFTensor, hf_option, linear, same, split
from meshlm.layers.mamba import Mamba2Mixer
from meshlm.models.base import DecoderLMConfig, MixerBlock
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

    kernel_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.kernel_fields,
                                               "implementation": "ssd"}
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
        return MixerBlock

    def mixer(self, decode: bool, name: str) -> nn.Module:
        return Mamba2Mixer(
            d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, head_dim=self.head_dim,
            n_groups=self.n_groups, chunk_size=self.chunk_size, use_bias=self.use_bias,
            use_conv_bias=self.use_conv_bias, norm_eps=self.norm_eps,
            norm_per_group=self.norm_per_group, implementation=self.implementation,
            decode=decode, name=name, **self.layer_kwargs())

    # ------------------------------------------------------------------ HuggingFace mapping
    # ``Mamba2ForCausalLM``; the mixer's layouts are tabled in ``layers.mamba.Mamba2Mixer``. HF's
    # gated norm spans all of d_inner: norm_per_group=False.

    hf_model_types: ClassVar[tuple[str, ...]] = ("mamba2",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Mamba2Config":
        hf_option(hf, "hidden_act", ("silu",), "silu")
        hf_option(hf, "rms_norm", (True,), True)
        # transformers writes infinity as {"__float__": "Infinity"} (JSON has no inf)
        limit = [float(t["__float__"] if isinstance(t, dict) else t)
                 for t in hf.get("time_step_limit", (0.0, float("inf")))]
        if limit != [0.0, float("inf")]:
            raise ConfigError(f"config.json: time_step_limit={limit} is not supported (meshlm "
                              "does not clamp the step size: [0.0, inf])")
        d, expand, head_dim = hf["hidden_size"], hf.get("expand", 2), hf.get("head_dim", 64)
        heads = hf.get("num_heads", expand * d // head_dim)
        if heads * head_dim != expand * d:
            raise ConfigError(f"config.json: num_heads={heads} x head_dim={head_dim} must equal "
                              f"expand * hidden_size = {expand * d}")
        return cls(vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                   d_model=d, n_layers=hf["num_hidden_layers"], d_state=hf.get("state_size", 128),
                   d_conv=hf.get("conv_kernel", 4), expand=expand, head_dim=head_dim,
                   n_groups=hf.get("n_groups", 1), chunk_size=hf.get("chunk_size", 256),
                   use_bias=hf.get("use_bias", False), use_conv_bias=hf.get("use_conv_bias", True),
                   norm_per_group=False, norm="rmsnorm",
                   norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    def to_hf_config(self) -> dict:
        if self.norm != "rmsnorm" or (self.norm_per_group and self.n_groups > 1):
            raise ConfigError(
                "HF Mamba-2 uses RMSNorm and one gated norm over d_inner; this model has "
                f"norm={self.norm!r}, norm_per_group={self.norm_per_group}, "
                f"n_groups={self.n_groups}")
        return dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"],
                    vocab_size=self.vocab_size, hidden_size=self.d_model,
                    num_hidden_layers=self.n_layers, state_size=self.d_state,
                    conv_kernel=self.d_conv, expand=self.expand, head_dim=self.head_dim,
                    num_heads=self.n_heads, n_groups=self.n_groups, chunk_size=self.chunk_size,
                    use_bias=self.use_bias, use_conv_bias=self.use_conv_bias, hidden_act="silu",
                    rms_norm=True, layer_norm_epsilon=self.norm_eps,
                    tie_word_embeddings=self.tie_embeddings)

    def hf_tensors(self) -> list[HFTensor]:
        e, i, g, n, h, k = (self.d_model, self.d_inner, self.n_groups, self.d_state,
                            self.n_heads, self.d_conv)
        layer = "backbone.layers.{i}."
        mixer = layer + "mixer."
        # in_proj rows [z, x | B, C | dt] -> zx_proj (E, 2, I), bc_proj (E, 2, G, N), dt_proj (E, H)
        to_proj = (lambda w: w.reshape(2, i, e).transpose(2, 0, 1),
                   lambda w: w.reshape(2, g, n, e).transpose(3, 0, 1, 2), lambda w: w.T)
        from_proj = (lambda p: p.transpose(1, 2, 0).reshape(2 * i, e),
                     lambda p: p.transpose(1, 2, 3, 0).reshape(2 * g * n, e), lambda p: p.T)
        proj = ("mixer/zx_proj", "mixer/bc_proj", "mixer/dt_proj")
        # conv1d channels [x | B, C] -> conv_x (K, I), conv_bc (K, 2, G, N)
        to_conv = (lambda w: w[:, 0].T, lambda w: w[:, 0].T.reshape(k, 2, g, n))
        from_conv = (lambda p: p.T[:, None], lambda p: p.reshape(k, -1).T[:, None])
        table = [
            same("backbone.embeddings.weight", "embed/embedding"),
            same("backbone.norm_f.weight", "final_norm/scale"),
            same(layer + "norm.weight", "norm/scale"),
            split(mixer + "in_proj.weight", tuple(p + "/kernel" for p in proj),
                  (2 * i, 2 * g * n, h), axis=0, to_parts=lambda w, j: to_proj[j](w),
                  from_parts=lambda p, j: from_proj[j](p)),
            split(mixer + "conv1d.weight", ("mixer/conv_x/kernel", "mixer/conv_bc/kernel"),
                  (i, 2 * g * n), axis=0, to_parts=lambda w, j: to_conv[j](w),
                  from_parts=lambda p, j: from_conv[j](p)),
            same(mixer + "dt_bias", "mixer/dt_bias"),
            same(mixer + "A_log", "mixer/A_log"),
            same(mixer + "D", "mixer/D"),
            same(mixer + "norm.weight", "mixer/norm/scale"),
            linear(mixer + "out_proj.weight", "mixer/out_proj/kernel"),
        ]
        if self.use_conv_bias:
            table.append(split(mixer + "conv1d.bias", ("mixer/conv_x/bias", "mixer/conv_bc/bias"),
                               (i, 2 * g * n), axis=0,
                               to_parts=lambda b, j: b if j == 0 else b.reshape(2, g, n),
                               from_parts=lambda p, _: p.reshape(-1)))
        if self.use_bias:
            shapes = ((2, i), (2, g, n), (h,))
            table += [split(mixer + "in_proj.bias", tuple(p + "/bias" for p in proj),
                            (2 * i, 2 * g * n, h), axis=0,
                            to_parts=lambda b, j: b.reshape(shapes[j]),
                            from_parts=lambda p, _: p.reshape(-1)),
                      same(mixer + "out_proj.bias", "mixer/out_proj/bias")]
        if not self.tie_embeddings:
            table.append(linear("lm_head.weight", "lm_head"))
        return table

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
