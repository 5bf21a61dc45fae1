"""The MoE family: a LLaMA-style GPT decoder (``models.gpt``) whose MLP is a sparse mixture of
SwiGLU experts (``layers.moe.MoeMlp``), Mixtral-like by default.

The loss adds the router's auxiliary losses (load balance, z-loss; mean over layers, weighted by
their coefficients) as ``aux["aux_loss"]`` and reports them, with the most loaded expert's share,
as metrics so a collapse of routing is visible.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.config import ConfigError, register_family
from meshlm.convert.mapping import HFTensor, expert_linears, hf_option, linear
from meshlm.layers import Mlp
from meshlm.layers.moe import ROUTERS, MoeMlp, router_statistics
from meshlm.models.gpt import Block, GPTConfig
from meshlm.train.losses import token_cross_entropy
from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS

GroupedMatmulImplementation = Literal[IMPLEMENTATIONS]


@register_family("moe")
@dataclasses.dataclass(frozen=True)
class MoEConfig(GPTConfig):
    """GPT fields (attention, norms, positions) plus the experts; ``d_ff`` is one expert's width."""

    family: str = "moe"
    position: Literal["learned", "rope"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu"] = "swiglu"  # experts are SwiGLU MLPs
    use_bias: bool = False
    tie_embeddings: bool = False
    n_experts: int = 8
    top_k: int = 2
    router: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True  # the k chosen weights sum to 1
    n_shared_experts: int = 0  # SwiGLU experts every token goes through (DeepSeek-MoE)
    capacity_factor: float | None = None  # None: dropless; else overflow tokens are dropped
    grouped_matmul: GroupedMatmulImplementation = "auto"  # pallas_kernels.grouped_matmul's
    shared_expert_gate: bool = False  # shared experts' output times sigmoid(x @ w) (Qwen2-MoE)
    moe_every: int = 1  # every n-th layer is MoE, the others dense SwiGLU MLPs of dense_d_ff
    dense_d_ff: int | None = None  # None: d_ff
    load_balance_coef: float = 0.01
    router_z_coef: float = 1e-3

    sharded_fields: ClassVar[dict[str, str]] = {**GPTConfig.sharded_fields,
                                                "n_experts": "expert"}

    def validate(self) -> None:
        super().validate()
        self.require_positive("n_experts", "top_k", "moe_every")
        if self.n_layers % self.moe_every:
            raise ConfigError(f"model.n_layers={self.n_layers} must be a multiple of "
                              f"model.moe_every={self.moe_every} (groups of moe_every - 1 dense "
                              "layers and one MoE layer)")
        if self.dense_d_ff is not None and self.dense_d_ff < 1:
            raise ConfigError(f"model.dense_d_ff must be null or >= 1, got {self.dense_d_ff}")
        if self.n_shared_experts < 0:
            raise ConfigError(
                f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"model.top_k={self.top_k} must be at most model.n_experts={self.n_experts}")
        if self.router not in ROUTERS:
            raise ConfigError(
                f"model.router={self.router!r} is not known; choose one of {', '.join(ROUTERS)}")
        if self.mlp != "swiglu":
            raise ConfigError(f"model.mlp={self.mlp!r}: MoE experts are SwiGLU; set 'swiglu'")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"model.capacity_factor={self.capacity_factor} must be > 0 "
                              "(null: dropless)")
        for name in ("load_balance_coef", "router_z_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def stack_depth(self) -> int:
        return self.n_layers // self.moe_every

    def block(self) -> type[nn.Module]:
        return Block if self.moe_every == 1 else MoEGroup

    def dense_config(self) -> GPTConfig:
        """The GPT config of the dense layers between MoE layers (same attention, a SwiGLU MLP
        of ``dense_d_ff``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)}
        return GPTConfig(**{**fields, "family": "gpt", "d_ff": self.dense_d_ff or self.d_ff})

    def feed_forward(self, x, segment_ids, **layer_kwargs):
        """``MoeMlp`` (padding left out of the routing statistics) plus, with shared experts, one
        SwiGLU MLP of ``n_shared_experts * d_ff`` that every token goes through."""
        h = MoeMlp(
            n_experts=self.n_experts, top_k=self.top_k, d_ff=self.d_ff, router=self.router,
            renormalize=self.renormalize, capacity_factor=self.capacity_factor,
            grouped_matmul=self.grouped_matmul, name="moe",
            **layer_kwargs,
        )(x, None if segment_ids is None else segment_ids > 0)
        if self.n_shared_experts:
            shared = Mlp(d_ff=self.n_shared_experts * self.d_ff, kind="swiglu", use_bias=False,
                         name="shared_experts", **layer_kwargs)(x)
            if self.shared_expert_gate:
                shared = shared * jax.nn.sigmoid(nn.Dense(
                    1, use_bias=False, dtype=layer_kwargs["dtype"],
                    param_dtype=layer_kwargs["param_dtype"],
                    kernel_init=nn.with_logical_partitioning(layer_kwargs["kernel_init"],
                                                             ("embed", None)),
                    name="shared_expert_gate")(x))
            h = h + shared
        return h

    def flops_per_token(self, seq_len: int) -> float:
        """GPT's count (PaLM convention) with each layer's MLP replaced by the active part: k of
        the ``n_experts`` SwiGLU experts, the shared experts and the router's ``d_model *
        n_experts`` matmul."""
        dense_mlp = 3 * self.d_model * self.d_ff
        active = ((self.top_k + self.n_shared_experts) * dense_mlp
                  + self.d_model * self.n_experts)
        n_moe = self.n_layers // self.moe_every
        between = 3 * self.d_model * (self.dense_d_ff or self.d_ff)
        return (super().flops_per_token(seq_len) + 6.0 * n_moe * (active - dense_mlp)
                + 6.0 * (self.n_layers - n_moe) * (between - dense_mlp))

    def loss(self, model: nn.Module, params: Any, batch: dict, rng: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Cross-entropy sum and token count as ``DecoderLMConfig.loss``; ``aux``:
        ``aux_loss`` (the weighted router losses), ``load_balance`` and ``router_z`` (means over
        layers, unweighted; 1 is a uniform load) and ``expert_load_max`` (the largest share of
        routing slots any expert got, times ``n_experts``: 1 is uniform, ``n_experts / top_k`` a
        collapse onto k experts) and ``dropped_fraction`` (assignments over capacity), over all
        MoE layers and per MoE layer (``expert_load_max/layer_<i>``, ``dropped_fraction/layer_<i>``:
        the i-th MoE layer)."""
        logits, state = model.apply(
            {"params": params}, batch["inputs"], positions=batch["positions"],
            segment_ids=batch["segment_ids"], deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng}, mutable=["intermediates"],
        )
        ce = token_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        stats = router_statistics(state["intermediates"])
        balance, z = jnp.mean(stats["load_balance"]), jnp.mean(stats["router_z"])
        aux = {
            "aux_loss": self.load_balance_coef * balance + self.router_z_coef * z,
            "load_balance": balance, "router_z": z,
            "expert_load_max": jnp.max(stats["expert_load_max"]),
            "dropped_fraction": jnp.mean(stats["dropped_fraction"]),
        }
        for name in ("expert_load_max", "dropped_fraction"):
            aux.update({f"{name}/layer_{i}": v for i, v in enumerate(stats[name])})
        return jnp.sum(ce * mask), jnp.sum(mask), aux

    # ------------------------------------------------------------------ HuggingFace mapping
    # Mixtral (``MixtralForCausalLM``) and Qwen2-MoE (``Qwen2MoeForCausalLM``; Qwen1.5-MoE):
    # GPT's LLaMA / Qwen2 attention table, the router ``gate`` and one Linear per expert (the
    # checkpoints' per-expert layout, which transformers also writes). HF's load-balancing
    # coefficient weighs k times meshlm's loss (``load_balance_loss``), hence the factor top_k.

    hf_model_types: ClassVar[tuple[str, ...]] = ("mixtral", "qwen2_moe")
    hf_ignored: ClassVar[tuple[str, ...]] = GPTConfig.hf_ignored

    @classmethod
    def from_hf_config(cls, hf: dict) -> "MoEConfig":
        kind = hf["model_type"]
        k = hf["num_experts_per_tok"]
        moe = dict(top_k=k, router="softmax", router_z_coef=0.0,
                   load_balance_coef=float(hf.get("router_aux_loss_coef", 0.0)) * k)
        if kind == "mixtral":
            dense = {**hf, "model_type": "mistral"}  # LLaMA attention with an optional window
            moe.update(n_experts=hf["num_local_experts"], renormalize=True)
        else:
            hf_option(hf, "decoder_sparse_step", (1,), 1)
            hf_option(hf, "mlp_only_layers", ([],), [])
            hf_option(hf, "qkv_bias", (True,), True)
            d_ff, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
            if shared % d_ff or not shared:
                raise ConfigError(
                    f"config.json: shared_expert_intermediate_size={shared} is not supported: "
                    f"meshlm's shared experts are a positive multiple of moe_intermediate_size="
                    f"{d_ff}")
            dense = {**hf, "model_type": "qwen2", "intermediate_size": d_ff}
            moe.update(n_experts=hf["num_experts"], renormalize=hf.get("norm_topk_prob", False),
                       n_shared_experts=shared // d_ff, shared_expert_gate=True)
        base = GPTConfig.from_hf_config.__func__(cls, dense)
        return dataclasses.replace(base, **moe)

    def _hf_moe_type(self) -> str:
        if self.moe_every != 1:
            raise ConfigError(f"model.moe_every={self.moe_every}: the HuggingFace MoE layouts "
                              "(mixtral, qwen2_moe) have an MoE MLP in every layer")
        attention = GPTConfig._hf_model_type(self)
        if (self.router == "softmax" and self.capacity_factor is None and attention == "qwen2"
                and self.n_shared_experts and self.shared_expert_gate):
            return "qwen2_moe"
        if (self.router == "softmax" and self.capacity_factor is None and self.renormalize
                and attention in ("llama", "mistral") and not self.use_bias
                and not self.n_shared_experts):
            return "mixtral"
        raise ConfigError(
            "no HuggingFace model_type has this MoE (mixtral: softmax router, renormalize, no "
            "shared experts, no biases; qwen2_moe: softmax router, qkv_bias, n_shared_experts "
            "> 0 with shared_expert_gate; both dropless: capacity_factor null)")

    def to_hf_config(self) -> dict:
        kind = self._hf_moe_type()
        out = GPTConfig.to_hf_config(self)
        for key in ("attention_bias", "mlp_bias", "architectures", "model_type"):
            out.pop(key, None)
        common = dict(num_experts_per_tok=self.top_k, output_router_logits=False,
                      router_aux_loss_coef=self.load_balance_coef / self.top_k)
        if kind == "mixtral":
            return {**out, **common, "model_type": "mixtral",
                    "architectures": ["MixtralForCausalLM"], "num_local_experts": self.n_experts,
                    "sliding_window": self.sliding_window}
        return {**out, **common, "model_type": "qwen2_moe",
                "architectures": ["Qwen2MoeForCausalLM"], "num_experts": self.n_experts,
                "moe_intermediate_size": self.d_ff, "norm_topk_prob": self.renormalize,
                "intermediate_size": self.n_shared_experts * self.d_ff,
                "shared_expert_intermediate_size": self.n_shared_experts * self.d_ff,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True}

    def hf_tensors(self) -> list[HFTensor]:
        kind = self._hf_moe_type()
        table = [t for t in GPTConfig.hf_tensors(self)
                 if not any(p.startswith("mlp/") for p in t.params)]
        layer, e = "model.layers.{i}.", self.n_experts
        if kind == "mixtral":
            block = layer + "block_sparse_moe."
            names = (("w1", "wi_gate"), ("w3", "wi_up"), ("w2", "wo"))
        else:
            block = layer + "mlp."
            names = (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo"))
            for hf_name, param in names:
                table.append(linear(f"{block}shared_expert.{hf_name}.weight",
                                    f"shared_experts/{param}/kernel"))
            table.append(linear(block + "shared_expert_gate.weight", "shared_expert_gate/kernel"))
        table.append(linear(block + "gate.weight", "moe/router"))
        table += [expert_linears(block + "experts.{e}." + hf_name + ".weight", "moe/" + param, e)
                  for hf_name, param in names]
        return table


class MoEGroup(nn.Module):
    """``moe_every - 1`` dense GPT blocks then one MoE block: the repeated unit of a stack that
    interleaves them, so a scanned stack still compiles one body."""

    config: MoEConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        dense = self.config.dense_config()
        for j in range(self.config.moe_every - 1):
            x, _ = Block(dense, self.deterministic, self.decode, name=f"dense_{j}")(
                x, positions, segment_ids)
        return Block(self.config, self.deterministic, self.decode, name="moe_layer")(
            x, positions, segment_ids)
