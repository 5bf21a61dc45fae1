"""The train state and its sharded creation.

Parameters and optimizer state are born sharded: the init is traced abstractly
(``jax.eval_shape``), the logical axes the model attached to each parameter are mapped through
the config's rule table, and the init is jitted with those ``out_shardings``. No device ever holds
a full copy of an FSDP-sharded model, and Adam's moments inherit their parameter's sharding.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta
from jax.sharding import Mesh

from meshlm import sharding


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree of arrays (checkpointable)."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any


def init_tokens_shape(mesh: Mesh, rules, seq_len: int) -> tuple[int, int]:
    """Token shape used to trace ``model.init``: one row per data-parallel shard, so activation
    sharding constraints inside the model divide evenly."""
    return sharding.data_parallel_size(mesh, rules), seq_len


def _boxed_params(model: nn.Module, rng: jax.Array, shape: tuple[int, int]) -> Any:
    return model.init(rng, jnp.zeros(shape, jnp.int32))["params"]


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seq_len: int
) -> tuple[TrainState, TrainState]:
    """``(abstract_state, shardings)``: shapes/dtypes (each ``ShapeDtypeStruct`` carrying its
    sharding, as Orbax restore wants) and the matching tree of ``NamedSharding``s."""
    shape = init_tokens_shape(mesh, rules, seq_len)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda rng: _boxed_params(model, rng, shape), jax.random.key(0))
    param_sh = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = meta.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    replicated = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_state, param_sh, transform_non_params=lambda _: replicated
    )
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_state)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seq_len: int,
    rng: jax.Array, shardings: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
    """``(state, shardings)`` with parameters initialized from ``rng``, created sharded.
    ``shardings``: ``state_shardings``'s, when the caller has them (saves an abstract trace)."""
    if shardings is None:
        _, shardings = state_shardings(model, tx, mesh, rules, seq_len)
    shape = init_tokens_shape(mesh, rules, seq_len)

    def init(rng):
        params = meta.unbox(_boxed_params(model, rng, shape))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    # Traced with the rules but without a current mesh: ``out_shardings`` alone decide where every
    # parameter lives (XLA partitions the initializers to produce only each device's shard), and
    # Flax's DenseGeneral would otherwise constrain its flattened initial kernel with the
    # unflattened kernel's spec and fail.
    with nn.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
