"""Sparse mixture-of-experts MLP (Switch / Mixtral / DeepSeek routing), dropless by default.

Every token goes to its top-k experts. Tokens are sorted by expert so each expert's rows are
contiguous, and the experts' stacked SwiGLU weights are applied with grouped matmuls
(``pallas_kernels.grouped_matmul``: ``jax.lax.ragged_dot`` or Pallas kernels), so the work is
that of the k chosen experts per token, never all of them. With a ``capacity_factor`` an expert
takes at most its capacity of a device's assignments and drops the rest. Under expert
parallelism the rows travel to their experts' devices by all-to-all (``sharded_experts``). The
router statistics the auxiliary losses and the metrics need are sown into ``"intermediates"``
(one entry per layer; ``router_statistics`` gathers them)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from meshlm.layers.per_shard import mesh_axes
from pallas_kernels import grouped_matmul as gmm_ops

Initializer = Callable[..., jax.Array]
ROUTERS = ("softmax", "sigmoid")
# Names sown per MoE layer into "intermediates" (scalars, float32).
STATISTICS = ("load_balance", "router_z", "expert_load_max", "dropped_fraction")


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
    ``capacity_factor`` None: dropless; else each expert takes at most ``ceil(capacity_factor *
    assignments / n_experts)`` of a device's (token, expert) assignments, first come first
    served, and the rest add nothing (the residual carries the token). ``grouped_matmul`` is
    ``pallas_kernels.grouped_matmul``'s implementation for the experts' matmuls (``interpret``
    runs a Pallas one in interpret mode).
    """

    n_experts: int
    top_k: int
    d_ff: int
    router: str = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    grouped_matmul: str = "auto"
    interpret: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    out_kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 (None: "
                             "dropless)")
        batch, length, d_model = x.shape
        e, f, k = self.n_experts, self.d_ff, self.top_k

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
        weights, experts, probs = route(logits, k, self.router, self.renormalize)

        valid = jnp.ones((batch * length,), bool) if mask is None else mask.reshape(-1)
        balance, fraction = load_balance_loss(probs, experts, valid)
        self.sow("intermediates", "load_balance", balance)
        self.sow("intermediates", "router_z", router_z_loss(logits, valid))
        self.sow("intermediates", "expert_load_max", jnp.max(fraction) * e)

        implementation = self.grouped_matmul
        if implementation == "auto" and _kernel_would_be_gathered():
            implementation = "xla"
        gmm = functools.partial(gmm_ops.grouped_matmul, implementation=implementation,
                                interpret=self.interpret)
        out, kept = sharded_experts(batch, length, self.capacity_factor, gmm)(
            x.astype(self.dtype), experts.reshape(batch, length, k),
            w_gate.astype(self.dtype), w_up.astype(self.dtype), w_out.astype(self.dtype))
        kept = kept.reshape(batch * length, k) & valid[:, None]
        self.sow("intermediates", "dropped_fraction",
                 1.0 - jnp.sum(kept) / (k * jnp.maximum(jnp.sum(valid), 1)))
        out = out.reshape(batch * length, k, d_model)
        y = jnp.einsum("tkd,tk->td", out.astype(jnp.float32), weights).astype(self.dtype)
        return nn.with_logical_constraint(
            y.reshape(batch, length, d_model),
            ("activation_batch", "activation_length", "activation_embed"))


def sharded_experts(batch: int, length: int, capacity_factor: float | None = None,
                    gmm: Callable = jax.lax.ragged_dot) -> Callable:
    """``expert_swiglu`` placed on the current mesh: ``(x, experts, w_gate, w_up, w_out) -> (out,
    kept)``.

    Sorting tokens by expert is a permutation the partitioner would do by gathering every row on
    every device, so the layer runs inside ``shard_map`` over the mesh axes of
    ``activation_batch`` (each data shard sorts its own rows) and of ``expert`` (expert
    parallelism). The expert devices of a data shard split its tokens (along the length, else
    the rows) and exchange them by all-to-all, each running only its own experts; when neither
    divides (e.g. decoding one token) each runs its experts on all the tokens and the outputs
    are summed over ``expert``. With ``activation_batch`` mapped onto the expert axes too
    (MaxText's layout: the rest of the model data-parallel over them) the tokens arrive split.
    Other axes (``tensor``: the experts' d_ff) stay automatic.
    Without a mesh, or in pipeline stages, the experts run as one computation. ``gmm(lhs, rhs,
    group_sizes)`` is the grouped matmul.
    """
    mesh = jax.sharding.get_abstract_mesh()
    plain = functools.partial(expert_swiglu, capacity_factor=capacity_factor, gmm=gmm)
    if not mesh.axis_names or _pipelined(mesh):
        return plain
    rows = mesh_axes("activation_batch", mesh)
    if batch % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    ep_axes = mesh_axes("expert", mesh)
    # activation_batch over the expert axes too (MaxText's layout): the tokens are already split
    batch_split = bool(ep_axes) and set(ep_axes) <= set(rows)
    if not batch_split:
        ep_axes = tuple(a for a in ep_axes if a not in rows)
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    if not rows and not ep_axes:
        return plain
    local_rows = batch // math.prod(mesh.shape[a] for a in rows)
    if batch_split:
        tokens, split = PartitionSpec(rows), True
    elif ep > 1 and length % ep == 0:
        tokens, split = PartitionSpec(rows or None, ep_axes), True
    elif ep > 1 and local_rows % ep == 0:
        tokens, split = PartitionSpec(rows + ep_axes), True
    else:
        tokens, split = PartitionSpec(rows or None), False
    experts = PartitionSpec(ep_axes or None)
    fn = functools.partial(expert_swiglu, capacity_factor=capacity_factor, axes=ep_axes, ep=ep,
                           split=split, gmm=gmm)
    if split:
        return jax.shard_map(fn, in_specs=(tokens, tokens, experts, experts, experts),
                             out_specs=(tokens, tokens), axis_names=set(rows + ep_axes))
    # Every expert device gets its own copy of the tokens and returns its experts' part, so the
    # sums (of the outputs, and of the tokens' gradients) are explicit, outside the shard_map.
    copies = PartitionSpec(ep_axes, *tokens)
    per_device = jax.shard_map(
        lambda x, *a: jax.tree.map(lambda v: v[None], fn(x[0], *a)),
        in_specs=(copies, tokens, experts, experts, experts), out_specs=(copies, copies),
        axis_names=set(rows + ep_axes))

    def summed(x, *args):
        out, kept = per_device(jnp.broadcast_to(x, (ep, *x.shape)), *args)
        return jnp.sum(out, axis=0), kept[0]
    return summed


def _kernel_would_be_gathered() -> bool:
    """Whether a grouped-matmul kernel would get operands sharded over mesh axes that stay
    automatic here (the experts' d_ff over ``tensor``, pipeline stages): the partitioner cannot
    split a kernel and would gather them onto every device (``layers/per_shard.py``), so there
    "auto" keeps ``ragged_dot``, which it partitions."""
    mesh = jax.sharding.get_abstract_mesh()
    return bool(mesh.axis_names) and bool(mesh_axes("mlp", mesh) or _pipelined(mesh))


def _pipelined(mesh) -> bool:
    """Pipeline stages run as a vmap sharded over the stage axis (layers/pipeline.py); a
    shard_map inside it would need that axis manual as well, which its sharding constraints
    forbid, so there the partitioner places the sort (planned: a shard_map over the stages)."""
    return bool(mesh_axes("activation_stage", mesh))


def _grouped_swiglu(rows, group_sizes, w_gate, w_up, w_out, gmm=jax.lax.ragged_dot):
    """Rows sorted by expert (``group_sizes`` of them per expert) through their experts, with
    the grouped matmul ``gmm`` (``jax.lax.ragged_dot``'s semantics). Gate and up projections
    run as one grouped matmul over their joined columns (one pass over the rows, wider tiles),
    unless the experts' d_ff is split over a mesh axis, where joining them would move them
    between devices. The columns interleave (gate ``j``, up ``j``) so that the activation's
    gradient writes both from one read of each input (with ``[gate | up]`` halves XLA's fused
    gradient read every input twice)."""
    f = w_gate.shape[-1]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.axis_names and mesh_axes("mlp", mesh):
        gate, up = gmm(rows, w_gate, group_sizes), gmm(rows, w_up, group_sizes)
    else:
        joined = jnp.stack([w_gate, w_up], axis=-1).reshape(*w_gate.shape[:-1], 2 * f)
        both = gmm(rows, joined, group_sizes).reshape(rows.shape[0], f, 2)
        gate, up = both[..., 0], both[..., 1]
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, (None, "activation_mlp"))
    return gmm(hidden, w_out, group_sizes)


@jax.custom_vjp
def _permute(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[perm]`` for a permutation ``perm`` of x's rows (``inverse`` its inverse), whose
    gradient is the gather ``g[inverse]``: the transpose of a gather is otherwise a scatter-add,
    which GPUs run with atomics."""
    return x.at[perm].get(mode="promise_in_bounds", unique_indices=True)


def _permute_fwd(x, perm, inverse):
    return _permute(x, perm, inverse), (perm, inverse)


def _permute_bwd(res, g):
    perm, inverse = res
    return _permute(g, inverse, perm), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def expert_swiglu(x: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_out: jax.Array, *, capacity_factor: float | None = None,
                  axes: tuple[str, ...] = (), ep: int = 1, split: bool = True,
                  gmm: Callable = jax.lax.ragged_dot) -> tuple[jax.Array, jax.Array]:
    """Each token through each of its experts: ``x (batch, length, embed)``, ``experts (batch,
    length, k)`` -> ``(out (batch, length, k, embed), kept (batch, length, k) bool)``; a dropped
    assignment (over capacity) has zero output.

    The (token, expert) pairs are sorted by expert and multiplied by grouped matmuls over the
    contiguous groups. Called per shard by ``sharded_experts`` with ``ep`` devices on the mesh
    ``axes`` of the experts (the weights are then this device's ``n_experts / ep`` experts):
    ``split`` (each device holds its own tokens): every device sends each its rows by
    ``all_to_all`` in buffers of fixed size (dropless: the most a device can send another),
    multiplies what it received, and sends the results back; else (every device holds the same
    tokens) each computes its experts' rows and the outputs are summed over ``axes``.
    """
    *lead, k = experts.shape
    d = x.shape[-1]
    n_local = w_gate.shape[0]
    n_experts = n_local * ep
    tokens = x.reshape(-1, d)
    flat = experts.reshape(-1)
    n = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    by_expert = flat[order]
    counts = jnp.bincount(flat, length=n_experts)
    keep = jnp.ones((n,), bool)
    capacity = n_local * (n // k)  # an expert gets each token at most once
    if capacity_factor is not None:
        capacity = min(capacity, math.ceil(capacity_factor * n / n_experts))
        keep = jnp.arange(n) - (jnp.cumsum(counts) - counts)[by_expert] < capacity
    computed = keep
    first = 0
    if ep > 1 and not split:
        first = jax.lax.axis_index(axes) * n_local
        computed = keep & (by_expert // n_local == first // n_local)
    if capacity_factor is not None or (ep > 1 and not split):
        # the rows this device computes first (still grouped by expert), the others after
        regroup = jnp.argsort(jnp.where(computed, by_expert, n_experts), stable=True)
        order, by_expert = order[regroup], by_expert[regroup]
        keep, computed = keep[regroup], computed[regroup]
    inverse = jnp.zeros_like(order).at[order].set(
        jnp.arange(n, dtype=order.dtype), unique_indices=True)
    # each token once per chosen expert, then in expert order
    rows = _permute(jnp.repeat(tokens, k, axis=0), order, inverse)
    sizes = jnp.bincount(jnp.where(computed, by_expert, n_experts), length=n_experts + 1)
    weights = (w_gate, w_up, w_out)
    if ep == 1 or not split:
        out = _grouped_swiglu(rows, jax.lax.dynamic_slice(sizes, (first,), (n_local,)), *weights,
                              gmm)
    else:
        out = _exchange(rows, by_expert, computed, sizes[:-1], weights, axes, ep, gmm,
                        (n // k) * min(k, n_local) if capacity_factor is None
                        else min((n // k) * min(k, n_local), n_local * capacity))
    out = _permute(jnp.where(computed[:, None], out, 0), inverse, order)  # (token, k) order
    kept = keep[inverse]
    return out.reshape(*lead, k, d), kept.reshape(*lead, k)


def _exchange(rows, by_expert, computed, sizes, weights, axes, ep, gmm, per_device):
    """Expert parallelism by all-to-all: ``rows`` (grouped by expert, the ``computed`` ones
    first) go to the devices holding their experts in buffers of ``per_device`` rows per
    destination, each device runs its experts on what it received (re-sorted by its expert), and
    the results come back in ``rows``' order."""
    n, d = rows.shape
    n_local = weights[0].shape[0]
    dest = by_expert // n_local
    to_device = jnp.sum(sizes.reshape(ep, n_local), axis=1)
    start = jnp.cumsum(to_device) - to_device
    slot = jnp.where(computed, dest * per_device + jnp.arange(n) - start[dest], ep * per_device)
    send = jnp.zeros((ep * per_device, d), rows.dtype).at[slot].set(rows, mode="drop")
    ids = jnp.full((ep * per_device,), n_local, jnp.int32).at[slot].set(
        (by_expert % n_local).astype(jnp.int32), mode="drop")

    def all_to_all(a):
        return jax.lax.all_to_all(a.reshape(ep, per_device, *a.shape[1:]), axes, 0, 0
                                  ).reshape(a.shape)

    got, got_ids = all_to_all(send), all_to_all(ids)
    order = jnp.argsort(got_ids, stable=True)  # by local expert, padding last
    local_sizes = jnp.bincount(got_ids, length=n_local + 1)[:n_local]
    out = _grouped_swiglu(got[order], local_sizes, *weights, gmm)
    back = all_to_all(jnp.zeros_like(out).at[order].set(out))
    return back.at[slot].get(mode="fill", fill_value=0)


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
