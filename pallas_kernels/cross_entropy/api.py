"""``cross_entropy``: argument validation, choice of implementation, and the custom VJP.

Autodiff of ``log_softmax`` and a gather keeps the float32 log-probabilities of every (row,
vocabulary) entry and spends several passes over that, a language model's largest activation, in
the backward. Here every forward keeps only the logits and the per-row log-sum-exp, and the
backward forms ``(softmax - onehot) * g`` in one elementwise pass, in the logits' dtype (the
lowering's kernel, or ``common.backward`` in XLA). The policy is ``_api.Dispatch``'s, the same for
every op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._api import Dispatch, Lowering, check_last_axis, load_lowering, shape_of
from pallas_kernels.cross_entropy import common, reference

DISPATCH = Dispatch("pallas_kernels.cross_entropy", (Lowering("triton", "gpu"),))
IMPLEMENTATIONS = DISPATCH.names


def cross_entropy(logits, targets, *, implementation: str = "auto", interpret: bool = False,
                  tiles=None):
    """``-log softmax(logits)[target]`` per row, float32.

    Args:
      logits: ``(..., vocab)``, bfloat16, float16 or float32.
      targets: ``(...)`` integer ids in ``[0, vocab)`` (values are not checked: an id outside
        picks a clamped or undefined entry, as an indexing op does).
      implementation: ``"auto"``, ``"xla"`` (plain JAX, two reductions over the logits) or
        ``"triton"`` (one read of the logits); ``"auto"`` is Triton on a GPU (1.6x XLA's
        forward on an H200, BENCHMARKS.md), else XLA. A kernel is a custom call that XLA's
        partitioner cannot split: with logits sharded over devices, call it per device
        (``meshlm.layers.per_shard``), with each token's whole vocabulary on one device.
      interpret: run a named Pallas lowering in interpret mode (CPU tests).
      tiles: ``cross_entropy.triton.Tiles`` for ``implementation="triton"``.

    Raises:
      ValueError: naming the violated constraint.
    """
    check_last_axis(logits, "logits", "vocab")
    if getattr(targets, "shape", None) != logits.shape[:-1] or not jnp.issubdtype(
            targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer ids of shape logits.shape[:-1] = "
                         f"{logits.shape[:-1]}, got {shape_of(targets)} "
                         f"{getattr(targets, 'dtype', '')}")
    vocab = logits.shape[-1]
    call = common.Call(logits.size // vocab, vocab)
    cfg = DISPATCH.configure(implementation, call, interpret=bool(interpret), tiles=tiles,
                             xla=common.Config("xla"), empty=call.rows == 0)
    return _cross_entropy(cfg, logits, targets)


def _forward(cfg, logits, targets):
    if cfg.implementation == "xla":
        return reference.forward(logits, targets)
    module = load_lowering(DISPATCH.package, cfg.implementation)[0]
    vocab = logits.shape[-1]
    ce, lse = module.forward(logits.reshape(-1, vocab), targets.reshape(-1), cfg)
    return ce.reshape(targets.shape), lse.reshape(targets.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(cfg, logits, targets):
    return _forward(cfg, logits, targets)[0]


def _fwd(cfg, logits, targets):
    ce, lse = _forward(cfg, logits, targets)
    return ce, (logits, lse, targets)


def _bwd(cfg, residuals, g):
    logits, lse, targets = residuals
    if cfg.implementation == "xla":
        return common.backward(logits, lse, targets, g), None
    module = load_lowering(DISPATCH.package, cfg.implementation)[0]
    vocab = logits.shape[-1]
    dlogits = module.backward(logits.reshape(-1, vocab), lse.reshape(-1), targets.reshape(-1),
                              g.reshape(-1), cfg)
    return dlogits.reshape(logits.shape), None


_cross_entropy.defvjp(_fwd, _bwd)
