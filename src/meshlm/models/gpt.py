"""The GPT family: a decoder-only pre-norm transformer.

``ModelConfig`` picks the variant: GPT-2 (learned positions, LayerNorm, GELU, biases, tied
embeddings) or LLaMA (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied). Layers
are stacked by ``nn.scan`` (parameters gain a leading ``"layers"`` axis, one compiled block) or
unrolled, each block optionally rematerialised with a named policy.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.config import ModelConfig
from meshlm.layers import ATTENTION_OUT, Attention, Embed, LearnedPositions, Mlp, make_norm
from meshlm.layers.embeddings import logits_matmul
from meshlm.models import register

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


class Block(nn.Module):
    """``x + drop(attn(norm(x)))`` then ``x + drop(mlp(norm(x)))``; returns ``(x, None)`` so the
    same module is a ``nn.scan`` body."""

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.init_std)
        # GPT-2: residual-branch output projections scaled by 1/sqrt(2 * n_layers) so the
        # residual stream's variance does not grow with depth.
        out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))

        def norm(name):
            return make_norm(cfg.norm, epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype,
                             param_dtype=param_dtype, name=name)

        h = Attention(
            num_heads=cfg.n_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
            use_bias=cfg.use_bias, rope=cfg.position == "rope", rope_theta=cfg.rope_theta,
            implementation=cfg.attention, decode=self.decode, dtype=dtype,
            param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init, name="attention",
        )(norm("attention_norm")(x), positions, segment_ids)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = Mlp(
            d_ff=cfg.d_ff, kind=cfg.mlp, use_bias=cfg.use_bias, dtype=dtype,
            param_dtype=param_dtype, kernel_init=init, out_kernel_init=out_init, name="mlp",
        )(norm("mlp_norm")(x))
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed")), None


@register("gpt")
class GPT(nn.Module):
    """Tokens ``(batch, length)`` -> float32 logits ``(batch, length, vocab)``.

    ``positions`` default to ``0..length-1`` (with ``decode=True``: continuing from the number of
    tokens already cached). ``segment_ids`` (0 = padding) confine attention to each packed
    document; the caller restarts ``positions`` at every document.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
                 decode: bool = False):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length = tokens.shape
        if cfg.position == "learned" and length > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {length} exceeds model.max_seq_len={cfg.max_seq_len} (the size "
                "of the learned position table)"
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
        x = embed(tokens)
        if cfg.position == "learned":
            x = x + LearnedPositions(cfg.max_seq_len, cfg.d_model, init_std=cfg.init_std,
                                     dtype=dtype, param_dtype=param_dtype,
                                     name="position_embed")(positions)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

        block = Block
        if cfg.remat != "none":
            # Under scan every iteration is already a separate computation, so CSE cannot merge
            # the recomputation away and prevent_cse's extra barriers are pure cost.
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, decode, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.n_layers):
                x, _ = block(cfg, deterministic, decode, name=f"layers_{i}")(
                    x, positions, segment_ids)

        x = make_norm(cfg.norm, epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype,
                      param_dtype=param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                             ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), param_dtype,
            )
            logits = logits_matmul(x.astype(dtype), head.astype(dtype), False)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
