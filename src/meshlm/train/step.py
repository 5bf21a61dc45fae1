"""The train and eval steps: pure functions compiled once, ahead of time, with explicit shardings.

The loss is the mean cross-entropy over the tokens whose ``loss_mask`` is 1, computed in float32
from float32 logits. With gradient accumulation each micro-batch contributes its loss *sum*
divided by the token count of the whole batch, so the accumulated gradient equals the full-batch
gradient exactly (up to summation order), whatever the split of tokens between micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshlm import sharding
from meshlm.config import Config
from meshlm.train.losses import token_cross_entropy
from meshlm.train.state import TrainState

# The batch dict produced by meshlm.data (every array (batch, length)).
BATCH_DTYPES = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_mask": jnp.float32,
}


def loss_sum(model: nn.Module, params: Any, batch: dict, *, rng: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token cross-entropies, number of masked-in tokens)``, both float32."""
    logits = model.apply(
        {"params": params}, batch["inputs"], positions=batch["positions"],
        segment_ids=batch["segment_ids"], deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )
    ce = token_cross_entropy(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


def _micro_batches(batch: dict, accum: int, mesh: Mesh, batch_spec: PartitionSpec) -> dict:
    """(B, L) -> (accum, B/accum, L), micro-batch ``i`` taking rows ``i, i+accum, ...``.

    Strided rows (not contiguous blocks) keep every micro-batch spread over all data-parallel
    shards, so splitting needs no communication.
    """
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *batch_spec))

    def split(x):
        b, length = x.shape
        x = x.reshape(b // accum, accum, length).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

    return jax.tree.map(split, batch)


def make_train_step(
    cfg: Config, model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
    mesh: Mesh, rules, abstract_state: TrainState,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Compile ``train_step(state, batch) -> (state, metrics)``; ``state`` is donated.

    Metrics (float32 scalars): ``loss`` (mean over masked-in tokens), ``grad_norm`` (before
    clipping), ``lr`` (used for this update), ``tokens`` (masked-in tokens in the batch).
    """
    accum = cfg.train.grad_accum
    use_dropout = cfg.model.dropout > 0
    seed = cfg.train.seed
    batch_sh = sharding.batch_sharding(mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Dropout randomness is a function of (seed, step) so a resumed run draws the same masks.
        rng = jax.random.fold_in(jax.random.key(seed), state.step) if use_dropout else None
        tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        denom = jnp.maximum(tokens, 1.0)

        def loss_fn(params, micro, micro_rng):
            total, _ = loss_sum(model, params, micro, rng=micro_rng)
            return total / denom

        grad_fn = jax.value_and_grad(loss_fn)
        if accum == 1:
            loss, grads = grad_fn(state.params, batch, rng)
        else:
            def body(carry, xs):
                loss_acc, grad_acc = carry
                micro, i = xs
                micro_rng = None if rng is None else jax.random.fold_in(rng, i)
                loss_i, grads_i = grad_fn(state.params, micro, micro_rng)
                grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads_i)
                return (loss_acc + loss_i, grad_acc), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
            micro = _micro_batches(batch, accum, mesh, batch_sh.spec)
            (loss, grads), _ = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), zeros), (micro, jnp.arange(accum))
            )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss, "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(state.step), jnp.float32), "tokens": tokens,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(
        train_step, in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
    )
    return _compile(jitted, mesh, rules, abstract_state, _global_batch(cfg, batch_sh))


def make_eval_step(
    cfg: Config, model: nn.Module, mesh: Mesh, rules, abstract_state: TrainState
) -> Callable[[Any, dict], dict]:
    """Compile ``eval_step(params, batch) -> {"loss_sum", "tokens"}`` (float32 scalars).

    Sums, not means, so that batches of any token count combine exactly: perplexity is
    ``exp(sum(loss_sum) / sum(tokens))``.
    """
    batch_sh = sharding.batch_sharding(mesh, rules)

    def eval_step(params, batch):
        total, tokens = loss_sum(model, params, batch)
        return {"loss_sum": total, "tokens": tokens}

    params_sh = jax.tree.map(lambda a: a.sharding, abstract_state.params)
    jitted = jax.jit(eval_step, in_shardings=(params_sh, batch_sh),
                     out_shardings=sharding.replicated(mesh))
    return _compile(jitted, mesh, rules, abstract_state.params, _global_batch(cfg, batch_sh))


def _global_batch(cfg: Config, batch_sh: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), d, sharding=batch_sh)
        for k, d in BATCH_DTYPES.items()
    }


def _compile(jitted, mesh: Mesh, rules, *abstract_args):
    """Lower and compile once, ahead of time, under the mesh and rules (so the model's logical
    constraints bind); calling with other shapes or shardings is an error, never a recompile."""
    with sharding.activate(mesh, rules):
        return jitted.lower(*abstract_args).compile()
