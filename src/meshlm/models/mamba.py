"""The Mamba-1 family (``MambaForCausalLM``): a stack of pre-norm residual Mamba mixers.

Per block ``x + MambaMixer(RMSNorm(x))`` (the mixer runs ``pallas_kernels.selective_scan``), a
final RMSNorm and, by default, tied embeddings. There is no attention and no position table:
decoding keeps O(1) state per token (the conv window and the SSM state) and any length runs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import flax.linen as nn

from meshlm.config import ConfigError, register_family
from meshlm.convert.mapping import HFTensor, hf_option, linear, reshaped, same
from meshlm.layers.mamba import MambaMixer
from meshlm.models.base import DecoderLMConfig, MixerBlock
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

    kernel_fields: ClassVar[dict[str, str]] = {**DecoderLMConfig.kernel_fields,
                                               "implementation": "selective_scan"}
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
        return MixerBlock

    def mixer(self, decode: bool, name: str) -> nn.Module:
        return MambaMixer(
            d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, dt_rank=self.dt_rank,
            use_bias=self.use_bias, use_conv_bias=self.use_conv_bias,
            implementation=self.implementation, decode=decode, name=name, **self.layer_kwargs())

    # ------------------------------------------------------------------ HuggingFace mapping
    # ``MambaForCausalLM``; the mixer's layouts are tabled in ``layers.mamba.MambaMixer``.

    hf_model_types: ClassVar[tuple[str, ...]] = ("mamba",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "MambaConfig":
        hf_option(hf, "hidden_act", ("silu",), "silu")
        d, expand = hf["hidden_size"], hf.get("expand", 2)
        if hf.get("intermediate_size", expand * d) != expand * d:
            raise ConfigError(f"config.json: intermediate_size={hf['intermediate_size']} is not "
                              f"supported (meshlm's d_inner is expand * hidden_size = {expand * d})")
        rank = hf.get("time_step_rank", "auto")
        return cls(vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                   d_model=d, n_layers=hf["num_hidden_layers"], d_state=hf.get("state_size", 16),
                   d_conv=hf.get("conv_kernel", 4), expand=expand,
                   dt_rank=-(-d // 16) if rank == "auto" else rank,
                   use_bias=hf.get("use_bias", False), use_conv_bias=hf.get("use_conv_bias", True),
                   norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=hf.get("tie_word_embeddings", True))

    def to_hf_config(self) -> dict:
        if self.norm != "rmsnorm":
            raise ConfigError(f"HF Mamba uses RMSNorm, this model has norm={self.norm!r}")
        return dict(model_type="mamba", architectures=["MambaForCausalLM"],
                    vocab_size=self.vocab_size, hidden_size=self.d_model,
                    intermediate_size=self.d_inner, num_hidden_layers=self.n_layers,
                    state_size=self.d_state, conv_kernel=self.d_conv, expand=self.expand,
                    time_step_rank=self.rank, use_bias=self.use_bias,
                    use_conv_bias=self.use_conv_bias, hidden_act="silu",
                    layer_norm_epsilon=self.norm_eps, tie_word_embeddings=self.tie_embeddings)

    def hf_tensors(self) -> list[HFTensor]:
        e, i = self.d_model, self.d_inner
        layer = "backbone.layers.{i}."
        mixer = layer + "mixer."
        table = [
            same("backbone.embeddings.weight", "embed/embedding"),
            same("backbone.norm_f.weight", "final_norm/scale"),
            same(layer + "norm.weight", "norm/scale"),
            HFTensor(mixer + "in_proj.weight", ("mixer/in_proj/kernel",),
                     lambda w: (w.reshape(2, i, e).transpose(2, 0, 1),),
                     lambda k: k.transpose(1, 2, 0).reshape(2 * i, e)),
            HFTensor(mixer + "conv1d.weight", ("mixer/conv1d/kernel",),
                     lambda w: (w[:, 0, :].T,), lambda k: k.T[:, None, :]),
            linear(mixer + "x_proj.weight", "mixer/x_proj/kernel"),
            linear(mixer + "dt_proj.weight", "mixer/dt_proj/kernel"),
            same(mixer + "dt_proj.bias", "mixer/dt_proj/bias"),
            same(mixer + "A_log", "mixer/A_log"),
            same(mixer + "D", "mixer/D"),
            linear(mixer + "out_proj.weight", "mixer/out_proj/kernel"),
        ]
        if self.use_conv_bias:
            table.append(same(mixer + "conv1d.bias", "mixer/conv1d/bias"))
        if self.use_bias:
            table += [reshaped(mixer + "in_proj.bias", "mixer/in_proj/bias", (2, i)),
                      same(mixer + "out_proj.bias", "mixer/out_proj/bias")]
        if not self.tie_embeddings:
            table.append(linear("lm_head.weight", "lm_head"))
        return table

    def flops_per_token(self, seq_len: int) -> float:
        """``6 *`` the matmul parameters (in_proj, x_proj, dt_proj, out_proj of every layer and
        the LM head). The selective scan and the depthwise conv are elementwise, not counted."""
        e, i, n, r = self.d_model, self.d_inner, self.d_state, self.rank
        per_layer = e * 2 * i + i * (r + 2 * n) + r * i + i * e
        return 6.0 * (self.n_layers * per_layer + e * self.vocab_size)
