"""Pipeline parallelism for the layer stack: the layers split into stages over the logical
``stage`` axis, microbatches flowing from stage to stage.

Layout. The stacked block parameters have shape ``(repeats, stages, layers_per_stage, ...)``
with logical axes ``(None, "stage", "layers", ...)`` (the repeat axis is never sharded);
flattening the three leading axes gives the unpipelined ``(n_layers, ...)`` stack in layer order
(``stage_params`` / ``unstage_params``). The ``stage`` rule shards the second axis, so a device
holds only its stage's layers: for GPipe (``repeats=1``) a contiguous run of ``n_layers /
stages``, for the circular schedule layer groups ``s, s + stages, s + 2 stages, ...`` of
``layers_per_stage`` layers each.

Schedule (the one loop both share, after MaxText's ``pipeline.py``). The batch is cut into
``microbatches`` (strided rows, so each keeps its data-parallel sharding); work item ``k`` is
microbatch ``k % M`` on repeat ``k // M``. At iteration ``t`` stage ``s`` runs item ``t - s``:
every stage computes at once as one ``vmap`` over the stage axis (``spmd_axis_name`` keeps the
stage dimension sharded), then the outputs rotate one stage on (``jnp.roll`` on the sharded axis,
which XLA lowers to a collective-permute). Stage 0 takes a fresh microbatch, or on later repeats
the last stage's earlier output of the same microbatch (kept in a buffer; hence microbatches >=
stages when repeats > 1). ``M * repeats + stages - 1`` iterations; the ``stages - 1`` bubble
iterations compute on placeholders that never reach an output. Gradients come from autodiff of
the loop (the reverse pipeline runs the permutes backwards).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STAGE_ACTIVATION = ("activation_stage", "activation_batch", "activation_length",
                    "activation_embed")
MICRO_ACTIVATION = (None, "activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class PipelineSchedule:
    """``stages`` pipeline stages (the mesh's ``pipeline`` size), ``microbatches`` per batch that
    enters the stack, and ``repeats`` layer groups per stage (1: GPipe; more: circular)."""

    stages: int
    microbatches: int = 1
    repeats: int = 1

    def problems(self, n_layers: int, batch: int | None = None) -> list[str]:
        """What keeps this schedule from running ``n_layers`` on ``batch`` rows (empty: none)."""
        found = []
        if n_layers % (self.stages * self.repeats):
            found.append(f"{n_layers} layers do not split into {self.stages} stages x "
                         f"{self.repeats} repeats")
        if batch is not None and batch % self.microbatches:
            found.append(f"{batch} rows do not split into {self.microbatches} microbatches")
        if self.repeats > 1 and self.microbatches < self.stages:
            found.append(f"the circular schedule ({self.repeats} repeats) needs microbatches >= "
                         f"stages, got {self.microbatches} < {self.stages}")
        return found

    def layers_per_stage(self, n_layers: int) -> int:
        return n_layers // (self.stages * self.repeats)


def stage_params(stack: Any, schedule: PipelineSchedule) -> Any:
    """Unpipelined ``(n_layers, ...)`` stacked parameters -> the pipelined layout."""
    def split(a):
        return a.reshape(schedule.repeats, schedule.stages, -1, *a.shape[1:])
    return jax.tree.map(split, stack)


def unstage_params(staged: Any) -> Any:
    """The pipelined ``(repeats, stages, layers_per_stage, ...)`` layout -> ``(n_layers, ...)``."""
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[3:]), staged)


def _staged_module(block: type[nn.Module], n_args: int, schedule: PipelineSchedule,
                   layers_per_stage: int) -> type[nn.Module]:
    """The block lifted to the pipelined parameter layout (used to create the parameters)."""
    axes = {"params": 0, "intermediates": 0}
    rngs = {"params": True, "dropout": True}
    layers = nn.scan(block, variable_axes=axes, split_rngs=rngs,
                     in_axes=(nn.broadcast,) * n_args, length=layers_per_stage,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    unbatched = (None,) * (1 + n_args)
    stages = nn.vmap(layers, variable_axes=axes, split_rngs=rngs, in_axes=unbatched,
                     axis_size=schedule.stages, metadata_params={nn.PARTITION_NAME: "stage"})
    return nn.vmap(stages, variable_axes=axes, split_rngs=rngs, in_axes=unbatched,
                   axis_size=schedule.repeats, metadata_params={nn.PARTITION_NAME: None})


def per_stage_policy(policy: Callable | None) -> Callable | None:
    """``policy`` for a layer run under the stage ``vmap``, which gives each matmul of a stage's
    own weights a leading batch dimension: such a ``dot_general`` is judged as the unbatched one
    (else "dots_no_batch" would save no matmul at all and recompute the whole layer)."""
    if policy is None:
        return None

    def judge(prim, *avals, **params):
        if prim is jax.lax.dot_general_p:
            (lc, rc), (lb, rb) = params["dimension_numbers"]
            if lb[:1] == (0,) and rb[:1] == (0,):
                def drop(dims):
                    return tuple(d - 1 for d in dims)
                params = {**params, "dimension_numbers": (
                    (drop(lc), drop(rc)), (drop(lb[1:]), drop(rb[1:])))}
        return policy(prim, *avals, **params)
    return judge


@contextlib.contextmanager
def batch_over_stages(pipelined: bool) -> Iterator[None]:
    """Rules under which ``activation_batch`` spans the stage mesh axes as well, for the layers
    around a pipelined stack (embedding, head, loss): each stage then computes them for its
    share of the rows instead of every stage for the whole batch. No change unpipelined."""
    stage = _stage_mesh_axes() if pipelined else None
    if stage is None:
        yield
        return
    stage = (stage,) if isinstance(stage, str) else tuple(stage)

    def widen(axes):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return axes + tuple(a for a in stage if a not in axes)

    rules, done = [], False
    for name, axes in nn.get_logical_axis_rules():
        if name == "activation_batch" and not done:
            axes, done = widen(axes), True
        rules.append((name, axes))
    with nn.logical_axis_rules(rules):
        yield


def _stage_mesh_axes() -> str | tuple[str, ...] | None:
    """The mesh axes the current rules give ``activation_stage`` (for vmap's spmd_axis_name)."""
    spec = nn.logical_to_mesh_axes(("activation_stage",))[0]
    return None if spec in (None, ()) else spec


def _to_micro(a: jax.Array, m: int) -> jax.Array:
    """``(B, ...)`` -> ``(m, B/m, ...)``; microbatch ``i`` takes rows ``i, i+m, ...`` so each
    keeps the batch's spread over the data-parallel shards."""
    return a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1)


def _from_micro(a: jax.Array) -> jax.Array:
    return a.swapaxes(0, 1).reshape(-1, *a.shape[2:])


def apply_pipeline(block: type[nn.Module], x: jax.Array, *args: Any, n_layers: int,
                   schedule: PipelineSchedule, remat_policy: Callable | None | bool = False,
                   name: str = "layers", **block_fields: Any) -> jax.Array:
    """``x`` through ``n_layers`` blocks run as a pipeline; call inside a compact module.

    ``args`` (positions, segment ids: leading batch axis, or None) follow each microbatch.
    ``remat_policy``: False keeps every activation; None or a ``jax.checkpoint`` policy
    rematerialises each layer with it. Values the block sows into ``"intermediates"`` are
    averaged over microbatches and sown again, stacked over the layers in layer order.
    """
    if block_fields.get("decode"):
        raise ValueError("a pipelined layer stack does not decode; generate with the unpipelined "
                         "parameters (pipeline.unstage_params) and mesh.pipeline=1")
    if problems := schedule.problems(n_layers):
        raise ValueError("pipeline schedule: " + "; ".join(problems))
    per_stage = schedule.layers_per_stage(n_layers)
    staged = _staged_module(block, len(args), schedule, per_stage)(**block_fields, name=name)
    if staged.is_initializing():  # (traced with any batch size)
        staged(x, *args)  # creates the parameters in the pipelined layout; outputs unused
        return x
    if problems := schedule.problems(n_layers, x.shape[0]):
        raise ValueError("pipeline schedule: " + "; ".join(problems))
    params = staged.variables["params"]
    deterministic = block_fields.get("deterministic", True)
    rng = None if deterministic else staged.make_rng("dropout")
    layer = block(**block_fields, parent=None)

    def run_layer(p, h, key, *layer_args):
        rngs = None if key is None else {"dropout": key}
        (h, _), state = layer.apply({"params": p}, h, *layer_args, rngs=rngs,
                                    mutable=["intermediates"])
        return h, state.get("intermediates", {})

    if remat_policy is not False:
        run_layer = jax.checkpoint(run_layer, policy=per_stage_policy(remat_policy),
                                   prevent_cse=False)

    def run_stage(p, h, key, *layer_args):
        """One stage: its ``layers_per_stage`` layers in order -> (output, sown per layer)."""
        def body(h, xs):
            p_j, j = xs
            h, sown = run_layer(p_j, h, None if key is None else jax.random.fold_in(key, j),
                                *layer_args)
            return h, sown
        return jax.lax.scan(body, h, (p, jnp.arange(per_stage)))

    m_count, repeats, n_stages = schedule.microbatches, schedule.repeats, schedule.stages
    spmd_axis = _stage_mesh_axes()
    vmap_stages = jax.vmap(run_stage, spmd_axis_name=spmd_axis)
    stage_ids = jnp.arange(n_stages)
    # Rows spread over the stages around the stack (batch_over_stages) are gathered first: the
    # partitioner fails on the microbatch split of a dimension sharded over both.
    x = nn.with_logical_constraint(x, MICRO_ACTIVATION[1:])
    xm = nn.with_logical_constraint(_to_micro(x, m_count), MICRO_ACTIVATION)
    args_m = [None if a is None else _to_micro(a, m_count) for a in args]

    def weights(r):
        """Each stage's parameters for its repeat ``r[s]`` (the stage axis stays local)."""
        if repeats == 1:
            return jax.tree.map(lambda a: a[0], params)
        return jax.vmap(lambda p, i: jax.tree.map(lambda a: a[i], p), in_axes=(1, 0),
                        spmd_axis_name=spmd_axis)(params, r)

    def stage_args(micro):
        """Each stage's positions / segment ids: those of its microbatch ``micro[s]``."""
        return [None if a is None else jnp.take(a, micro, axis=0) for a in args_m]

    def stage_keys(t):
        return None if rng is None else jax.vmap(
            lambda s: jax.random.fold_in(jax.random.fold_in(rng, t), s))(stage_ids)

    zeros = jnp.zeros(n_stages, jnp.int32)
    sown_shape = jax.eval_shape(lambda: vmap_stages(
        weights(zeros), jnp.zeros((n_stages,) + xm.shape[1:], x.dtype), stage_keys(0),
        *stage_args(zeros))[1])

    def iteration(carry, t):
        state, outs, sown_acc = carry
        item = t - stage_ids
        micro, rep = item % m_count, jnp.clip(item // m_count, 0, repeats - 1)
        valid = (item >= 0) & (item < m_count * repeats)
        fresh = jax.lax.dynamic_index_in_dim(xm, t % m_count, keepdims=False)
        again = jax.lax.dynamic_index_in_dim(outs, t % m_count, keepdims=False)
        first = jnp.where(t < m_count, fresh, again)
        stage_in = jnp.roll(state, 1, axis=0).at[0].set(first)
        stage_in = nn.with_logical_constraint(stage_in, STAGE_ACTIVATION)
        out, sown = vmap_stages(weights(rep), stage_in, stage_keys(t), *stage_args(micro))
        out = nn.with_logical_constraint(out, STAGE_ACTIVATION)
        last = item[-1]
        slot = jnp.clip(last, 0) % m_count
        done = valid[-1]
        kept = jax.lax.dynamic_index_in_dim(outs, slot, keepdims=False)
        outs = jax.lax.dynamic_update_index_in_dim(outs, jnp.where(done, out[-1], kept), slot, 0)
        outs = nn.with_logical_constraint(outs, MICRO_ACTIVATION)
        sown_acc = jax.tree.map(
            lambda acc, v: acc.at[rep, stage_ids].add(
                jnp.where(valid.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0).astype(jnp.float32)
                / m_count),
            sown_acc, sown)
        return (out, outs, sown_acc), None

    state0 = jnp.zeros((n_stages,) + xm.shape[1:], x.dtype)
    sown0 = jax.tree.map(lambda s: jnp.zeros((repeats,) + s.shape, jnp.float32), sown_shape)
    steps = jnp.arange(m_count * repeats + n_stages - 1)
    (_, outs, sown), _ = jax.lax.scan(iteration, (state0, xm, sown0), steps)
    for path, value in jax.tree_util.tree_leaves_with_path(sown):
        key = next(k.key for k in reversed(path) if isinstance(getattr(k, "key", None), str))
        staged.sow("intermediates", key, value.reshape(n_layers, *value.shape[3:]))
    return nn.with_logical_constraint(_from_micro(outs), MICRO_ACTIVATION[1:])
