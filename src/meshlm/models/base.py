"""What a decoder-only language-model family provides to the framework.

A family is a frozen ``ModelConfig`` subclass (its fields are the ``model:`` section) registered
with ``config.register_family``; the step, loop, checkpointing and generation only call the
methods below, so nothing outside ``models/<family>.py`` names a family. A family overrides
``build`` and ``flops_per_token``; a task other than next-token prediction (seq2seq, auxiliary
losses) overrides ``batch_fields``, ``example_inputs`` and ``loss``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.config import ModelConfig
from meshlm.data.batches import DECODER_LM
from meshlm.layers import Embed, make_norm
from meshlm.layers.embeddings import logits_matmul
from meshlm.layers.pipeline import PipelineSchedule, batch_over_stages
from meshlm.layers.stack import apply_stack
from meshlm.train.losses import token_cross_entropy

ACTIVATION_EMBED = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig(ModelConfig):
    """A decoder-only language model: tokens ``(batch, length)`` -> logits ``(batch, length,
    vocab)`` (float32 unless ``float32_logits`` is off), called as ``module(tokens, positions=,
    segment_ids=, deterministic=, decode=)``. By default the module is ``DecoderLM``: embeddings,
    the family's ``block`` stacked ``n_layers`` times, a final norm and the LM head."""

    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    batch_fields: ClassVar[dict[str, str]] = DECODER_LM

    # HuggingFace conversion (convert/): the HF ``model_type``s this family reads, and regexes of
    # HF tensors that hold no parameter (buffers such as a cached causal mask), skipped on read.
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    hf_ignored: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_hf_config(cls, hf: dict) -> "DecoderLMConfig":
        """This family's config from a HF ``config.json`` (a ``model_type`` of
        ``hf_model_types``); an option meshlm does not implement is a ``ConfigError`` naming it."""
        raise NotImplementedError(f"{cls.__name__} has no HuggingFace conversion")

    def to_hf_config(self) -> dict:
        """The HF ``config.json`` (``model_type``, ``architectures`` and sizes) of this model."""
        raise NotImplementedError(f"{type(self).__name__} has no HuggingFace conversion")

    def hf_tensors(self) -> list:
        """The HF checkpoint's tensors as ``convert.mapping.HFTensor``s: names and layouts."""
        raise NotImplementedError(f"{type(self).__name__} has no HuggingFace conversion")

    def build(self) -> nn.Module:
        """The family's (stateless) linen module; parameters come from ``module.init``."""
        return DecoderLM(self)

    @property
    def stack_depth(self) -> int:
        """How many times ``block`` repeats: ``n_layers``, unless a block holds several layers
        (MoE's groups of ``moe_every`` layers)."""
        return self.n_layers

    def block(self) -> type[nn.Module]:
        """The repeated block: a module with fields ``config, deterministic, decode`` whose
        ``__call__(x, positions, segment_ids)`` returns ``(x, None)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement block()")

    @property
    def norm_bias(self) -> bool:
        return False

    def layer_kwargs(self) -> dict[str, Any]:
        """The dtypes and initialisers every layer of the model takes."""
        init = nn.initializers.normal(self.init_std)
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
                    kernel_init=init, out_kernel_init=init)

    def make_norm(self, name: str) -> nn.Module:
        return make_norm(self.norm, epsilon=self.norm_eps, use_bias=self.norm_bias,
                         dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
                         name=name, implementation=self.norm_implementation)

    def add_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Absolute position information added to the embeddings (none by default); called
        inside ``DecoderLM``, so it may create parameters."""
        return x

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model can read (a learned position table), None if any."""
        return None

    @property
    def uses_dropout(self) -> bool:
        return False

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


class DecoderLM(nn.Module):
    """Tokens ``(batch, length)`` -> logits ``(batch, length, vocab)``, float32 unless
    ``config.float32_logits`` is off (then in ``config.dtype``).

    ``positions`` default to ``0..length-1`` (with ``decode=True``: continuing from the number of
    tokens already cached). ``segment_ids`` (0 = padding) keep packed documents apart; the caller
    restarts ``positions`` at every document.
    """

    config: DecoderLMConfig
    # Set by train.setup from mesh.pipeline / train.microbatches / train.pipeline_repeats.
    pipeline: PipelineSchedule | None = None

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
                 decode: bool = False):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length = tokens.shape
        if cfg.context_length is not None and length > cfg.context_length:
            raise ValueError(
                f"sequence length {length} exceeds model.max_seq_len={cfg.context_length} (the "
                "size of the learned position table)"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            if decode:
                index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
                if not self.is_initializing():
                    positions = positions + index.value
                    index.value = index.value + length

        embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=dtype,
                      param_dtype=param_dtype, name="embed")
        around_stack = functools.partial(batch_over_stages, self.pipeline is not None)
        with around_stack():
            x = cfg.add_positions(embed(tokens), positions)
            x = nn.with_logical_constraint(x, ACTIVATION_EMBED)
        x = apply_stack(cfg.block(), x, positions, segment_ids, n_layers=cfg.stack_depth,
                        scan=cfg.scan_layers, remat=cfg.remat, pipeline=self.pipeline, config=cfg,
                        deterministic=deterministic, decode=decode)
        with around_stack():
            x = cfg.make_norm("final_norm")(x)
            out = jnp.float32 if cfg.float32_logits else dtype
            if cfg.tie_embeddings:
                logits = embed.attend(x, out)
            else:
                head = self.param(
                    "lm_head",
                    nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                 ("embed", "vocab")),
                    (cfg.d_model, cfg.vocab_size), param_dtype,
                )
                logits = logits_matmul(x.astype(dtype), head.astype(dtype), False, out)
            return nn.with_logical_constraint(
                logits, ("activation_batch", "activation_length", "activation_vocab"))


class MixerBlock(nn.Module):
    """``x + mixer(norm(x))``, the block of a family whose layer is one token mixer (Mamba,
    Mamba-2): the config's ``mixer(decode, name)`` builds it, called as ``mixer(x, segment_ids)``.
    Returns ``(x, None)`` (an ``nn.scan`` body); positions are unused."""

    config: DecoderLMConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        h = self.config.mixer(self.decode, name="mixer")(self.config.make_norm("norm")(x),
                                                         segment_ids)
        return nn.with_logical_constraint(x + h, ACTIVATION_EMBED), None
