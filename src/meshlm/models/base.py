"""What a decoder-only language-model family provides to the framework.

A family is a frozen ``ModelConfig`` subclass (its fields are the ``model:`` section) registered
with ``config.register_family``; the step, loop, checkpointing and generation only call the
methods below, so nothing outside ``models/<family>.py`` names a family. A family overrides
``build`` and ``flops_per_token``; a task other than next-token prediction (seq2seq, auxiliary
losses) overrides ``batch_fields``, ``example_inputs`` and ``loss``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.config import ModelConfig
from meshlm.data.batches import DECODER_LM
from meshlm.train.losses import token_cross_entropy


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig(ModelConfig):
    """A decoder-only language model: tokens ``(batch, length)`` -> float32 logits
    ``(batch, length, vocab)``, called as ``module(tokens, positions=, segment_ids=,
    deterministic=, decode=)``."""

    batch_fields: ClassVar[dict[str, str]] = DECODER_LM

    def build(self) -> nn.Module:
        """The family's (stateless) linen module; parameters come from ``module.init``."""
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at ``seq_len``, for MFU."""
        raise NotImplementedError(f"{type(self).__name__} must implement flops_per_token()")

    def example_inputs(self, batch: int, length: int) -> tuple[jax.Array, ...]:
        """Positional inputs that trace ``module.init`` (their values are never used)."""
        return (jnp.zeros((batch, length), jnp.int32),)

    def loss(self, model: nn.Module, params: Any, batch: dict, rng: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """``(sum of masked token cross-entropies, masked-in token count, aux)``, float32.

        ``aux`` holds extra scalars: ``"aux_loss"`` (already weighted, per batch) is added to the
        objective, everything else is reported as a metric. ``rng`` None: deterministic.
        """
        logits = model.apply(
            {"params": params}, batch["inputs"], positions=batch["positions"],
            segment_ids=batch["segment_ids"], deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )
        ce = token_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(ce * mask), jnp.sum(mask), {}

    def init_cache(self, model: nn.Module, batch_size: int, max_len: int) -> Any:
        """Zeros for ``model``'s ``"cache"`` collection for ``batch_size`` rows of up to
        ``max_len`` tokens (KV caches, recurrent states): shapes from ``jax.eval_shape`` of
        ``module.init(..., decode=True)``, nothing computed; leaves keep their logical axes."""
        shapes = jax.eval_shape(
            lambda t: model.init(jax.random.key(0), t, decode=True),
            jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32),
        )["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
