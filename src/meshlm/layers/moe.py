"""Sparse mixture-of-experts MLP (Switch / Mixtral / DeepSeek routing), dropless.

Every token goes to its top-k experts; none is dropped for capacity. Tokens are sorted by expert so
each expert's rows are contiguous, and the experts' stacked SwiGLU weights are applied with grouped
matmuls (``jax.lax.ragged_dot``), so the work is that of the k chosen experts per token, never all
of them. The router statistics the auxiliary losses need are sown into ``"intermediates"`` (one
entry per layer; ``router_statistics`` gathers them) so the family's loss can add them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Initializer = Callable[..., jax.Array]
ROUTERS = ("softmax", "sigmoid")
# Names sown per MoE layer into "intermediates" (scalars, float32).
STATISTICS = ("load_balance", "router_z", "expert_load_max")


def route(logits: jax.Array, top_k: int, router: str = "softmax", renormalize: bool = True
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits ``(tokens, experts)`` -> ``(weights (tokens, k), experts (tokens, k), probs
    (tokens, experts))``, float32.

    ``softmax``: probabilities over experts (Switch, Mixtral). ``sigmoid``: independent scores
    (DeepSeek-V3); ``probs`` are then the scores normalised to sum to 1, which the load-balancing
    loss uses. ``renormalize``: the k chosen weights are divided by their sum.
    """
    logits = logits.astype(jnp.float32)
    if router == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    elif router == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
    weights, experts = jax.lax.top_k(scores, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts, probs


def load_balance_loss(probs: jax.Array, experts: jax.Array, mask: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e`` over the tokens where ``mask``, and
    ``f`` (experts,): ``f_e`` the fraction of the ``tokens * k`` routing slots sent to expert
    ``e``, ``P_e`` its mean router probability. The loss is 1 when the load is uniform (HF
    Mixtral's value is k times this)."""
    n_experts = probs.shape[-1]
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    slots = jnp.sum(jax.nn.one_hot(experts, n_experts) * mask[:, None, None], axis=(0, 1))
    fraction = slots / (count * experts.shape[-1])
    mean_prob = jnp.sum(probs * mask[:, None], axis=0) / count
    return n_experts * jnp.sum(fraction * mean_prob), fraction


def router_z_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss: the mean over masked-in tokens of ``logsumexp(logits)**2``; it keeps
    router logits small, where bfloat16 routing stays stable."""
    mask = mask.astype(jnp.float32)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2
    return jnp.sum(z * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class MoeMlp(nn.Module):
    """``sum_{e in top-k(x)} w_e(x) * swiglu_e(x)``: ``x (batch, length, embed)`` -> same shape.

    Parameters: ``router`` ``(embed, n_experts)`` and the experts' stacked ``wi_gate``, ``wi_up``
    ``(n_experts, embed, d_ff)`` and ``wo`` ``(n_experts, d_ff, embed)``, with logical axes
    ``expert, embed, mlp`` so the rule table can spread experts over a mesh axis. ``mask``
    (``(batch, length)``, optional) leaves padding out of the router statistics only.
    """

    n_experts: int
    top_k: int
    d_ff: int
    router: str = "softmax"
    renormalize: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    out_kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        batch, length, d_model = x.shape
        e, f = self.n_experts, self.d_ff

        def param(name, shape, axes, init):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                              self.param_dtype)

        w_router = param("router", (d_model, e), ("embed", None), self.kernel_init)
        w_gate = param("wi_gate", (e, d_model, f), ("expert", "embed", "mlp"), self.kernel_init)
        w_up = param("wi_up", (e, d_model, f), ("expert", "embed", "mlp"), self.kernel_init)
        w_out = param("wo", (e, f, d_model), ("expert", "mlp", "embed"), self.out_kernel_init)

        # The router runs in float32: routing decisions are sensitive to rounding.
        tokens = x.reshape(batch * length, d_model)
        logits = tokens.astype(jnp.float32) @ w_router.astype(jnp.float32)
        weights, experts, probs = route(logits, self.top_k, self.router, self.renormalize)

        valid = jnp.ones((batch * length,), bool) if mask is None else mask.reshape(-1)
        balance, fraction = load_balance_loss(probs, experts, valid)
        self.sow("intermediates", "load_balance", balance)
        self.sow("intermediates", "router_z", router_z_loss(logits, valid))
        self.sow("intermediates", "expert_load_max", jnp.max(fraction) * e)

        k = self.top_k
        out = per_batch_shard(expert_swiglu, batch)(
            x.astype(self.dtype), experts.reshape(batch, length, k),
            w_gate.astype(self.dtype), w_up.astype(self.dtype), w_out.astype(self.dtype))
        out = out.reshape(batch * length, k, d_model)
        y = jnp.einsum("tkd,tk->td", out.astype(jnp.float32), weights).astype(self.dtype)
        return nn.with_logical_constraint(
            y.reshape(batch, length, d_model),
            ("activation_batch", "activation_length", "activation_embed"))


def _pipelined(mesh) -> bool:
    """Pipeline stages run as a vmap sharded over the stage axis (layers/pipeline.py); a
    shard_map inside it would need that axis manual as well, which its sharding constraints
    forbid, so there the partitioner places the sort (planned: a shard_map over the stages)."""
    spec = nn.logical_to_mesh_axes(("activation_stage",))[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return any(a in mesh.axis_names and mesh.shape[a] > 1 for a in names)


def per_batch_shard(fn: Callable, batch: int) -> Callable:
    """``fn(x, experts, *weights)`` run by each data-parallel shard on its own rows.

    Sorting tokens by expert is a global permutation: left to the partitioner, every device
    would gather all rows of the batch and run the experts on all of them. Inside ``shard_map``
    over the mesh axes the ``activation_batch`` rule names, each shard sorts its own rows; the
    remaining axes (``expert``, ``tensor``) stay automatic, so expert-sharded weights stay where
    they are. Without a mesh, with a batch that does not divide, or in pipeline stages, ``fn``
    runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(("activation_batch",))[0] if mesh.axis_names else None
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in axes)
    if not axes or batch % shards or _pipelined(mesh):
        return fn
    rows, whole = PartitionSpec(axes), PartitionSpec()
    return jax.shard_map(fn, in_specs=(rows, rows, whole, whole, whole), out_specs=rows,
                         axis_names=set(axes))


def expert_swiglu(x: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_out: jax.Array) -> jax.Array:
    """Each token through each of its experts: ``x (batch, length, embed)``, ``experts (batch,
    length, k)`` -> ``(batch, length, k, embed)``. The (token, expert) pairs are sorted by expert,
    multiplied by grouped matmuls over the contiguous groups, and put back in the original order."""
    *lead, k = experts.shape
    tokens = x.reshape(-1, x.shape[-1])
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    rows = tokens[order // k]
    hidden = (jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, group_sizes))
              * jax.lax.ragged_dot(rows, w_up, group_sizes))
    hidden = nn.with_logical_constraint(hidden, (None, "activation_mlp"))
    out = jax.lax.ragged_dot(hidden, w_out, group_sizes)
    inverse = jnp.argsort(order)
    return out[inverse].reshape(*lead, k, -1)


def router_statistics(intermediates: Any) -> dict[str, jax.Array]:
    """The sown statistics of every MoE layer (scanned: stacked over layers; unrolled: one entry
    per layer) -> ``{name: (n_moe_layers,) float32}`` for each name of ``STATISTICS``."""
    found: dict[str, list[jax.Array]] = {name: [] for name in STATISTICS}
    for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates):
        keys = [getattr(p, "key", None) for p in path]
        name = next((k for k in reversed(keys) if k in found), None)
        if name is not None:
            found[name].append(jnp.reshape(leaf, (-1,)))
    return {name: jnp.concatenate(v) if v else jnp.zeros((0,), jnp.float32)
            for name, v in found.items()}
