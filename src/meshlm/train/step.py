"""The train and eval steps: pure functions compiled once, ahead of time, with explicit shardings.

The loss is the mean cross-entropy over the tokens whose ``loss_mask`` is 1, computed in float32
from float32 logits. With gradient accumulation each micro-batch contributes its loss *sum*
divided by the token count of the whole batch, so the accumulated gradient equals the full-batch
gradient exactly (up to summation order), whatever the split of tokens between micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshlm import sharding
from meshlm.train import xla_options
from meshlm.train.state import TrainState


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


def make_train_step(run) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Compile ``train_step(state, batch) -> (state, metrics)`` for a ``setup.Run``; ``state`` is
    donated.

    The objective is the family's ``loss`` (summed cross-entropy over the whole batch's masked-in
    tokens) plus its ``aux_loss``. Metrics (float32 scalars): ``loss`` (mean over masked-in
    tokens), ``grad_norm`` (before clipping), ``lr`` (used for this update), ``tokens`` (masked-in
    tokens in the batch), and the family's aux values (averaged over micro-batches).
    """
    cfg, model_cfg = run.cfg, run.cfg.model
    accum = cfg.train.grad_accum
    use_dropout = model_cfg.uses_dropout
    seed = cfg.train.seed
    shardings = run.shardings

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Dropout randomness is a function of (seed, step) so a resumed run draws the same masks.
        rng = jax.random.fold_in(jax.random.key(seed), state.step) if use_dropout else None
        tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        denom = jnp.maximum(tokens, 1.0)

        def loss_fn(params, micro, micro_rng):
            total, _, aux = model_cfg.loss(run.model, params, micro, micro_rng)
            objective = total / denom + aux.get("aux_loss", 0.0) / accum
            return objective, (total / denom, aux)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (_, (loss, aux)), grads = grad_fn(state.params, batch, rng)
        else:
            def body(carry, xs):
                loss_acc, aux_acc, grad_acc = carry
                micro, i = xs
                micro_rng = None if rng is None else jax.random.fold_in(rng, i)
                (_, (loss_i, aux_i)), grads_i = grad_fn(state.params, micro, micro_rng)
                grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads_i)
                aux_acc = jax.tree.map(lambda a, v: a + v / accum, aux_acc, aux_i)
                return (loss_acc + loss_i, aux_acc, grad_acc), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
            micro = _micro_batches(batch, accum, run.mesh, run.batch_sharding.spec)
            aux_zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(lambda p, m: model_cfg.loss(run.model, p, m)[2], state.params,
                               jax.tree.map(lambda x: x[0], micro)))
            (loss, aux, grads), _ = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), aux_zeros, zeros), (micro, jnp.arange(accum))
            )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = run.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **aux, "loss": loss, "grad_norm": grad_norm,
            "lr": jnp.asarray(run.schedule(state.step), jnp.float32), "tokens": tokens,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(
        train_step, in_shardings=(shardings, run.batch_sharding),
        out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=0,
    )
    return _compile(jitted, run, run.abstract_state)


def make_eval_step(run) -> Callable[[Any, dict], dict]:
    """Compile ``eval_step(params, batch) -> {"loss_sum", "tokens"}`` (float32 scalars).

    Sums, not means, so that batches of any token count combine exactly: perplexity is
    ``exp(sum(loss_sum) / sum(tokens))``.
    """

    def eval_step(params, batch):
        total, tokens, _ = run.cfg.model.loss(run.model, params, batch)
        return {"loss_sum": total, "tokens": tokens}

    params_sh = jax.tree.map(lambda a: a.sharding, run.abstract_state.params)
    jitted = jax.jit(eval_step, in_shardings=(params_sh, run.batch_sharding),
                     out_shardings=sharding.replicated(run.mesh))
    return _compile(jitted, run, run.abstract_state.params)


def _compile(jitted, run, *abstract_args):
    """Lower and compile once, ahead of time, under the mesh and rules (so the model's logical
    constraints bind) with the run's XLA options; calling with other shapes or shardings is an
    error, never a recompile."""
    batch = {k: jax.ShapeDtypeStruct(run.batch_shapes[k], jnp.dtype(d),
                                     sharding=run.batch_sharding)
             for k, d in run.cfg.model.batch_fields.items()}
    options = xla_options.compiler_options(run.cfg.train.xla_flags,
                                           run.mesh.devices.flat[0].platform)
    with sharding.activate(run.mesh, run.rules):
        return jitted.lower(*abstract_args, batch).compile(compiler_options=options)
