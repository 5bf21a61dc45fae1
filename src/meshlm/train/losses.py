"""The language-model losses' token cross-entropy: ``pallas_kernels.cross_entropy``, whose
custom VJP keeps only the logits and a float32 log-sum-exp per token ("auto": its fastest
measured implementation on the target; today XLA's, ``cross_entropy.triton.auto_declines``).
Every family's loss calls it here, so a later choice of kernel (which under tensor parallelism
must see a token's whole vocabulary) is made in one place."""

from __future__ import annotations

import jax

from pallas_kernels.cross_entropy import cross_entropy


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-log softmax(logits)[target]`` per token, float32: ``logits (..., vocab)``, ``targets
    (...)`` integer ids in ``[0, vocab)``."""
    return cross_entropy(logits, targets)
