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
from meshlm.layers import Mlp
from meshlm.layers.moe import ROUTERS, MoeMlp, router_statistics
from meshlm.models.gpt import GPTConfig
from meshlm.train.losses import token_cross_entropy


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
    load_balance_coef: float = 0.01
    router_z_coef: float = 1e-3

    sharded_fields: ClassVar[dict[str, str]] = {**GPTConfig.sharded_fields,
                                                "n_experts": "expert"}

    def validate(self) -> None:
        super().validate()
        self.require_positive("n_experts", "top_k")
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

    def feed_forward(self, x, segment_ids, **layer_kwargs):
        """``MoeMlp`` (padding left out of the routing statistics) plus, with shared experts, one
        SwiGLU MLP of ``n_shared_experts * d_ff`` that every token goes through."""
        h = MoeMlp(
            n_experts=self.n_experts, top_k=self.top_k, d_ff=self.d_ff, router=self.router,
            renormalize=self.renormalize, capacity_factor=self.capacity_factor, name="moe",
            **layer_kwargs,
        )(x, None if segment_ids is None else segment_ids > 0)
        if self.n_shared_experts:
            h = h + Mlp(d_ff=self.n_shared_experts * self.d_ff, kind="swiglu", use_bias=False,
                        name="shared_experts", **layer_kwargs)(x)
        return h

    def flops_per_token(self, seq_len: int) -> float:
        """GPT's count (PaLM convention) with each layer's MLP replaced by the active part: k of
        the ``n_experts`` SwiGLU experts, the shared experts and the router's ``d_model *
        n_experts`` matmul."""
        dense_mlp = 3 * self.d_model * self.d_ff
        active = ((self.top_k + self.n_shared_experts) * dense_mlp
                  + self.d_model * self.n_experts)
        return super().flops_per_token(seq_len) + 6.0 * self.n_layers * (active - dense_mlp)

    def loss(self, model: nn.Module, params: Any, batch: dict, rng: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Cross-entropy sum and token count as ``DecoderLMConfig.loss``; ``aux``:
        ``aux_loss`` (the weighted router losses), ``load_balance`` and ``router_z`` (means over
        layers, unweighted; 1 is a uniform load) and ``expert_load_max`` (the largest share of
        routing slots any expert got, times ``n_experts``: 1 is uniform, ``n_experts / top_k`` a
        collapse onto k experts) and ``dropped_fraction`` (assignments over capacity), over all
        layers and per layer (``expert_load_max/layer_<i>``, ``dropped_fraction/layer_<i>``)."""
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
