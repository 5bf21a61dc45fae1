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
from meshlm.config import ModelConfig


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree of arrays (checkpointable)."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any


def _boxed_params(model_cfg: ModelConfig, model: nn.Module, rng: jax.Array, mesh: Mesh, rules,
                  seq_len: int) -> Any:
    """``model.init``'s parameters, still boxed with their logical axes. Traced with one row per
    data-parallel shard, so activation sharding constraints inside the model divide evenly."""
    inputs = model_cfg.example_inputs(sharding.data_parallel_size(mesh, rules), seq_len)
    return model.init(rng, *inputs)["params"]


def state_shardings(
    model_cfg: ModelConfig, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
    rules, seq_len: int,
) -> tuple[TrainState, TrainState]:
    """``(abstract_state, shardings)``: shapes/dtypes (each ``ShapeDtypeStruct`` carrying its
    sharding, as Orbax restore wants) and the matching tree of ``NamedSharding``s."""
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(
            lambda rng: _boxed_params(model_cfg, model, rng, mesh, rules, seq_len),
            jax.random.key(0))
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
    model_cfg: ModelConfig, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
    rules, seq_len: int, rng: jax.Array, shardings: TrainState,
) -> TrainState:
    """The state with parameters initialized from ``rng``, created with ``shardings``
    (``state_shardings``'s)."""

    def init(rng):
        params = meta.unbox(_boxed_params(model_cfg, model, rng, mesh, rules, seq_len))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    # Traced with the rules but without a current mesh: ``out_shardings`` alone decide where every
    # parameter lives (XLA partitions the initializers to produce only each device's shard), and
    # Flax's DenseGeneral would otherwise constrain its flattened initial kernel with the
    # unflattened kernel's spec and fail.
    with nn.logical_axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)(rng)


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
