"""Token cross-entropy with a hand-written backward.

Autodiff of ``log_softmax`` + gather keeps the float32 log-probabilities of every (token, vocab)
entry and spends several passes over that, the model's largest activation, in the backward. Here
the forward keeps only the logits and the per-token log-sum-exp, and the backward forms
``(softmax - onehot) * g`` in one elementwise pass, emitted in the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-log softmax(logits)[target]`` per token, float32: ``logits (..., vocab)``, ``targets
    (...)`` integer ids in ``[0, vocab)``."""
    return _forward(logits, targets)[0]


def _forward(logits, targets):
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
    return lse - picked, lse


def _fwd(logits, targets):
    ce, lse = _forward(logits, targets)
    return ce, (logits, lse, targets)


def _bwd(residuals, g):
    logits, lse, targets = residuals
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    dlogits = (probs - onehot) * g[..., None]
    return dlogits.astype(logits.dtype), None


token_cross_entropy.defvjp(_fwd, _bwd)
