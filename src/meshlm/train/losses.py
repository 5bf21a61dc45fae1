"""The language-model losses' token cross-entropy: ``pallas_kernels.cross_entropy``, whose
custom VJP keeps only the logits and a float32 log-sum-exp per token. Every family's loss calls it
here, so the choice of implementation is made in one place: on a GPU "auto" is the Triton forward,
run per device on its rows (``per_shard``), unless the rules split the vocabulary over devices
(tensor parallelism), where a per-row kernel would need each token's whole vocabulary and XLA's
partitioned reductions run instead."""

from __future__ import annotations

import jax

from meshlm.layers.per_shard import mesh_axes, per_shard, runs_a_kernel
from pallas_kernels.cross_entropy import cross_entropy

TOKEN_AXES = ("activation_batch", "activation_length")


def token_cross_entropy(logits: jax.Array, targets: jax.Array, *, implementation: str = "auto",
                        interpret: bool = False) -> jax.Array:
    """``-log softmax(logits)[target]`` per token, float32: ``logits (batch, length, vocab)``,
    ``targets (batch, length)`` integer ids in ``[0, vocab)``."""
    mesh = jax.sharding.get_abstract_mesh()
    vocab_split = bool(mesh.axis_names) and bool(mesh_axes("activation_vocab", mesh))
    if not runs_a_kernel(implementation) or vocab_split:
        return cross_entropy(logits, targets, implementation="xla")
    fn = lambda x, t: cross_entropy(x, t, implementation=implementation, interpret=interpret)
    if logits.ndim != 3:  # (vmapped or flattened rows: no logical axes to shard by)
        return fn(logits, targets)
    return per_shard(fn, [(logits, (*TOKEN_AXES, "activation_vocab")), (targets, TOKEN_AXES)],
                     TOKEN_AXES)
