"""The T5 family: an encoder-decoder transformer (Raffel et al. 2020).

Encoder: bidirectional self-attention with T5's bucketed relative position bias (one table per
stack, shared by its layers), RMS norm without bias, pre-norm residuals. Decoder: causal
self-attention with its own relative bias, cross-attention to the encoder output, FFN. Scores
are not scaled by ``1/sqrt(head_dim)`` (T5 folds that into the query initialisation).

Variants by config: original T5 (``feed_forward: relu``, ``tie_embeddings: true``: the shared
embedding is the LM head, logits scaled by ``d_model**-0.5``) and T5 v1.1 / Flan-T5
(``gated-gelu``, untied head).

Attention (``attention``): ``pallas_kernels``' ``flash_attention`` with segment ids (every
kind), the causal mask (decoder self-attention) and T5's relative position bias computed inside
the kernel from the positions and the stack's table (self-attention; each layer passes the same
table), so no ``(q, k)`` tensor is formed (``"auto"``: the Triton kernel on a GPU, its float32
reference on a CPU). ``"xla"`` (the default) is the einsum form with a materialised float32
``(batch, heads, q, k)`` bias (relative positions plus the segment / causal mask), computed once
per stack; it also serves cached decoding and training with dropout (which drops attention
probabilities, which the kernels never form). On an H200 the t5_base train step runs at the
same speed either way (1.01x) with 57% of the peak memory through the kernel, which
``configs/t5_base.yaml`` therefore sets (BENCHMARKS.md, session 8); the kernels' attention is
then half of the step (the table gradient's per-bucket sums make the dQ kernel the largest). The
Mosaic-GPU lowering declines the bias: it has no gather to look the bucket up in the table.
A query that sees no key (a decoder segment absent from the encoder) gets zeros from the kernels
and a uniform average from the einsums; only padding rows can be such queries.

Packing: encoder and decoder rows each hold several segments (ids from 1, 0 = padding; positions
restart per segment); self-attention stays within a segment and decoder segment ``s``
cross-attends only to encoder segment ``s``.

HuggingFace: ``T5ForConditionalGeneration`` (``model_type: t5``) converts both ways (the table
is ``T5Config.hf_tensors``).

API for generation: ``encode(model, params, tokens, ...) -> enc_out`` and
``decode(model, params, enc_out, tokens, ..., cache=None) -> (logits, cache)``; the cache
(``T5Config.init_cache``) holds each decoder layer's self-attention K/V and its cross-attention
K/V, computed from ``enc_out`` on the first cached call and reused after.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from meshlm.config import ConfigError, ModelConfig, register_family
from meshlm.convert.mapping import HFTensor, hf_option, linear, same
from meshlm.data.batches import SEQ2SEQ
from meshlm.layers import ATTENTION_OUT, Embed, make_norm, per_shard
from meshlm.layers.attention import CACHE_AXES
from meshlm.layers.embeddings import logits_matmul
from meshlm.layers.relative_position import RelativePositionBias
from meshlm.layers.stack import apply_stack
from meshlm.models.base import ACTIVATION_EMBED
from meshlm.train.losses import token_cross_entropy
from pallas_kernels.bias_gelu import bias_gelu
from pallas_kernels.flash_attention import RelativeBias, RelativeBuckets, flash_attention

ACTIVATION_HEADS = ("activation_batch", "activation_length", "activation_heads", "head_dim")
# Added to the scores of masked (query, key) pairs: finite, so a fully masked padding row gives
# a uniform softmax instead of NaN; far below any real score.
MASKED = -1e9


@register_family("t5")
@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    """T5 sizes and variant. ``n_layers`` is the encoder's depth, ``n_decoder_layers`` the
    decoder's (None: the same). ``init_std`` is T5's initializer factor: every kernel is drawn
    with ``init_std * fan_in**-0.5`` (Mesh TensorFlow's scheme, which HF T5 follows).
    ``max_seq_len`` bounds both the encoder and the decoder length."""

    family: str = "t5"
    n_decoder_layers: int | None = None
    n_heads: int = 4
    d_kv: int = 64  # per-head size (T5 does not tie it to d_model / n_heads)
    d_ff: int = 1024
    feed_forward: Literal["relu", "gated-gelu"] = "gated-gelu"
    # "xla": einsums over a materialised bias; or flash_attention's implementation ("auto":
    # Triton on a GPU, its reference on a CPU): see the module docstring.
    attention: Literal["auto", "xla", "triton"] = "xla"
    tie_embeddings: bool = False
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6
    dropout: float = 0.0
    init_std: float = 1.0
    # Span-corruption sentinels: ids vocab_size-1, vocab_size-2, ... (T5's <extra_id_i>); a
    # trained tokenizer leaves these rows free.
    extra_ids: int = 100
    # The token the decoder starts from (looked up in the tokenizer; T5's is <pad>, id 0).
    decoder_start_token: str = "<pad>"

    batch_fields: ClassVar[dict[str, str]] = SEQ2SEQ
    kernel_fields: ClassVar[dict[str, str]] = {**ModelConfig.kernel_fields,
                                               "attention": "flash_attention"}
    sharded_fields: ClassVar[dict[str, str]] = {**ModelConfig.sharded_fields,
                                                "n_heads": "heads", "d_ff": "mlp"}

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def reserved_ids(self) -> int:
        """Ids at the end of the vocabulary a trained tokenizer must not use (the sentinels)."""
        return self.extra_ids

    @property
    def uses_dropout(self) -> bool:
        return self.dropout > 0

    def validate(self) -> None:
        super().validate()
        self.require_positive("n_heads", "d_kv", "d_ff", "decoder_layers")
        if self.relative_buckets < 4:
            raise ConfigError(f"model.relative_buckets must be >= 4, got {self.relative_buckets}")
        if self.relative_max_distance <= self.relative_buckets // 2:
            raise ConfigError(
                f"model.relative_max_distance={self.relative_max_distance} must exceed "
                f"model.relative_buckets // 2 = {self.relative_buckets // 2} (the exact buckets)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attention == "triton" and self.dropout > 0:
            raise ConfigError(
                f"model.attention=triton cannot drop attention probabilities (model.dropout="
                f"{self.dropout}); use model.attention auto (the kernel when dropout is off, "
                "e.g. at evaluation) or xla, or model.dropout 0")
        if not 0 <= self.extra_ids < self.vocab_size:
            raise ConfigError(f"model.extra_ids={self.extra_ids} must be in [0, "
                              f"model.vocab_size={self.vocab_size})")

    def build(self) -> nn.Module:
        return T5(self)

    # ------------------------------------------------------------------ HuggingFace mapping
    # ``T5ForConditionalGeneration`` (T5, T5 v1.1, Flan-T5). HF keeps one relative-bias table per
    # stack in its block 0, as meshlm keeps one per stack.

    hf_model_types: ClassVar[tuple[str, ...]] = ("t5",)

    @property
    def hf_ignored(self) -> tuple[str, ...]:
        """Tied copies of ``shared.weight`` older checkpoints store (and the tied LM head)."""
        tied = (r"^lm_head\.weight$",) if self.tie_embeddings else ()
        return (r"^(encoder|decoder)\.embed_tokens\.weight$", *tied)

    @classmethod
    def from_hf_config(cls, hf: dict) -> T5Config:
        ff = hf_option(hf, "feed_forward_proj", ("relu", "gated-gelu"), "relu")
        hf_option(hf, "dense_act_fn", ("relu",) if ff == "relu" else ("gelu_new",),
                  "relu" if ff == "relu" else "gelu_new")
        hf_option(hf, "decoder_start_token_id", (0,), 0)
        hf_option(hf, "is_encoder_decoder", (True,), True)
        return cls(
            vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", 512),
            d_model=hf["d_model"], n_layers=hf["num_layers"],
            n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            n_heads=hf["num_heads"], d_kv=hf["d_kv"], d_ff=hf["d_ff"], feed_forward=ff,
            # transformers 5 writes tie_word_embeddings=true always and says "T5 v1.1: no logit
            # scaling, its own lm_head" with scale_decoder_outputs=false
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)
                                and hf.get("scale_decoder_outputs", True)),
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            norm_eps=hf.get("layer_norm_epsilon", 1e-6), dropout=hf.get("dropout_rate", 0.1),
            init_std=hf.get("initializer_factor", 1.0),
            extra_ids=min(100, hf["vocab_size"] - 1), decoder_start_token="<pad>")

    def to_hf_config(self) -> dict:
        return dict(
            model_type="t5", architectures=["T5ForConditionalGeneration"],
            vocab_size=self.vocab_size, n_positions=self.max_seq_len, d_model=self.d_model,
            d_kv=self.d_kv, d_ff=self.d_ff, num_layers=self.n_layers,
            num_decoder_layers=self.decoder_layers, num_heads=self.n_heads,
            relative_attention_num_buckets=self.relative_buckets,
            relative_attention_max_distance=self.relative_max_distance,
            layer_norm_epsilon=self.norm_eps, dropout_rate=self.dropout,
            initializer_factor=self.init_std, feed_forward_proj=self.feed_forward,
            tie_word_embeddings=self.tie_embeddings, is_encoder_decoder=True,
            decoder_start_token_id=0, pad_token_id=0)

    def hf_tensors(self) -> list[HFTensor]:
        heads = (self.n_heads, self.d_kv)

        def attention(hf, param):
            return [*(linear(f"{hf}.{n}.weight", f"{param}/{p}", out_shape=heads)
                      for n, p in (("q", "query"), ("k", "key"), ("v", "value"))),
                    linear(f"{hf}.o.weight", f"{param}/out", in_shape=heads)]

        def ffn(hf):
            names = ("wi",) if self.feed_forward == "relu" else ("wi_0", "wi_1")
            return [linear(f"{hf}.DenseReluDense.{n}.weight", f"mlp/{n}")
                    for n in (*names, "wo")] + [same(f"{hf}.layer_norm.weight", "mlp_norm/scale")]

        enc, dec = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
        encoder = [*attention(f"{enc}.0.SelfAttention", "attention"),
                   same(f"{enc}.0.layer_norm.weight", "attention_norm/scale"), *ffn(f"{enc}.1")]
        decoder = [*attention(f"{dec}.0.SelfAttention", "self_attention"),
                   same(f"{dec}.0.layer_norm.weight", "self_attention_norm/scale"),
                   *attention(f"{dec}.1.EncDecAttention", "cross_attention"),
                   same(f"{dec}.1.layer_norm.weight", "cross_attention_norm/scale"),
                   *ffn(f"{dec}.2")]
        table = [same("shared.weight", "embed/embedding")]
        for stack, layers, n in (("encoder", encoder, self.n_layers),
                                 ("decoder", decoder, self.decoder_layers)):
            table += [dataclasses.replace(t, stack=f"{stack}/", n_layers=n) for t in layers]
            table += [same(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias."
                           "weight", f"{stack}/relative_bias/embedding"),
                      same(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale")]
        if not self.tie_embeddings:
            table.append(linear("lm_head.weight", "lm_head"))
        return table

    def make_norm(self, name: str) -> nn.Module:
        return make_norm("rmsnorm", epsilon=self.norm_eps, use_bias=False,
                         dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
                         name=name, implementation=self.norm_implementation)

    def flops_per_token(self, seq_len: int, target_len: int | None = None) -> float:
        """Training FLOPs per encoder token at encoder length ``seq_len`` and decoder length
        ``target_len`` (None: ``seq_len``): a row's decoder work is spread over its encoder
        tokens. PaLM's convention as in ``GPTConfig``: ``6 *`` the matmul parameters (encoder
        attention + FFN; decoder self- and cross-attention + FFN and the LM head, per decoder
        token), plus scores and weighted sums, ``12 * keys * H * d_kv`` per query of a full
        attention layer (encoder, cross) and half of that for causal self-attention."""
        target = seq_len if target_len is None else target_len
        d, inner = self.d_model, self.n_heads * self.d_kv
        ffn = d * self.d_ff * (3 if self.feed_forward == "gated-gelu" else 2)
        attention = 4 * d * inner
        encoder = 6.0 * self.n_layers * (attention + ffn) + 12.0 * seq_len * inner * self.n_layers
        decoder = (6.0 * (self.decoder_layers * (2 * attention + ffn) + d * self.vocab_size)
                   + 12.0 * inner * self.decoder_layers * (0.5 * target + seq_len))
        return encoder + decoder * target / seq_len

    def example_inputs(self, batch: int, length: int) -> tuple[jax.Array, ...]:
        tokens = jnp.zeros((batch, length), jnp.int32)
        return tokens, tokens

    def loss(self, model: nn.Module, params: Any, batch: dict, rng: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Masked cross-entropy of the decoder's logits against ``targets``."""
        logits = model.apply(
            {"params": params}, batch["encoder_tokens"], batch["decoder_tokens"],
            enc_positions=batch["encoder_positions"],
            enc_segment_ids=batch["encoder_segment_ids"],
            dec_positions=batch["decoder_positions"],
            dec_segment_ids=batch["decoder_segment_ids"], deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )
        ce = token_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(ce * mask), jnp.sum(mask), {}

    def init_cache(self, model: nn.Module, batch_size: int, max_len: int,
                   encoder_len: int | None = None) -> Any:
        """Zeros for the decoding cache of ``batch_size`` rows: up to ``max_len`` decoder tokens,
        cross-attention to ``encoder_len`` (default ``max_seq_len``) encoder positions."""
        encoder_len = self.max_seq_len if encoder_len is None else encoder_len
        shapes = jax.eval_shape(
            lambda e, d: model.init(jax.random.key(0), e, d, decode=True),
            jax.ShapeDtypeStruct((batch_size, encoder_len), jnp.int32),
            jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32),
        )["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def encode(model: nn.Module, params: Any, tokens: jax.Array, positions: jax.Array | None = None,
           segment_ids: jax.Array | None = None) -> jax.Array:
    """The encoder output ``(batch, enc_len, d_model)`` of ``tokens``."""
    return model.apply({"params": params}, tokens, positions, segment_ids, method="encode")


def decode(model: nn.Module, params: Any, enc_out: jax.Array, tokens: jax.Array, *,
           enc_segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
           segment_ids: jax.Array | None = None, cache: Any = None) -> tuple[jax.Array, Any]:
    """Float32 logits of the decoder over ``tokens`` attending to ``enc_out``, and the cache.

    ``cache=None``: a full (teacher-forced) pass, the cache returned is None. With a cache
    (``T5Config.init_cache``) the tokens are appended at the cache's index; decoding rows are
    single sequences written from slot 0, so positions default to the slot index.
    """
    if cache is None:
        logits = model.apply({"params": params}, enc_out, tokens, enc_segment_ids, positions,
                             segment_ids, method="decode")
        return logits, None
    logits, updated = model.apply({"params": params, "cache": cache}, enc_out, tokens,
                                  enc_segment_ids, positions, segment_ids, decode=True,
                                  method="decode", mutable=["cache"])
    return logits, updated["cache"]


class T5(nn.Module):
    """``(enc_tokens, dec_tokens) -> logits (batch, dec_len, vocab)`` (float32 unless
    ``float32_logits`` is off); ``encode`` and ``decode`` are the two halves. Segment ids default
    to one segment, positions to ``0..L-1``."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std,
                           dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std * cfg.d_model ** -0.5), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))

    def _check_length(self, tokens, side: str):
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{side} length {tokens.shape[1]} exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}")

    def encode(self, tokens, positions=None, segment_ids=None, deterministic: bool = True):
        self._check_length(tokens, "encoder")
        positions, segment_ids = _defaults(tokens, positions, segment_ids)
        return self.encoder(self.embed(tokens), positions, segment_ids, deterministic)

    def decode(self, enc_out, tokens, enc_segment_ids=None, positions=None, segment_ids=None,
               deterministic: bool = True, decode: bool = False):
        cfg = self.config
        self._check_length(tokens, "decoder")
        if enc_segment_ids is None:
            enc_segment_ids = jnp.ones(enc_out.shape[:2], jnp.int32)
        x = self.decoder(self.embed(tokens), enc_out, positions, segment_ids, enc_segment_ids,
                         deterministic, decode)
        dtype = jnp.dtype(cfg.dtype)
        out = jnp.float32 if cfg.float32_logits else dtype
        if cfg.tie_embeddings:
            logits = self.embed.attend(x * cfg.d_model ** -0.5, out)
        else:
            logits = logits_matmul(x.astype(dtype), self.lm_head.astype(dtype), False, out)
        return nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, enc_tokens, dec_tokens, enc_positions=None, enc_segment_ids=None,
                 dec_positions=None, dec_segment_ids=None, deterministic: bool = True,
                 decode: bool = False):
        _, enc_segment_ids = _defaults(enc_tokens, enc_positions, enc_segment_ids)
        enc_out = self.encode(enc_tokens, enc_positions, enc_segment_ids, deterministic)
        return self.decode(enc_out, dec_tokens, enc_segment_ids, dec_positions, dec_segment_ids,
                           deterministic, decode)


def _defaults(tokens, positions, segment_ids):
    batch, length = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    return positions, segment_ids


def _mask_bias(mask):
    """Boolean ``(batch, q, k)`` -> additive float32 ``(batch, 1, q, k)``."""
    return jnp.where(mask, 0.0, MASKED).astype(jnp.float32)[:, None]


@flax.struct.dataclass
class Scores:
    """What one attention kind adds to and masks in its scores, shared by a stack's layers.

    Either ``bias``, the einsum path's float32 ``(batch, heads or 1, q, k)`` (relative bias plus
    masks), or the kernel's inputs: ``(batch, len)`` segment ids, the causal flag and, for
    self-attention, the relative bias's table, positions and ``buckets``.
    """

    bias: jax.Array | None = None
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    table: jax.Array | None = None
    q_positions: jax.Array | None = None
    kv_positions: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    buckets: RelativeBuckets | None = flax.struct.field(pytree_node=False, default=None)


def _uses_kernel(cfg: T5Config, deterministic: bool, decode: bool = False) -> bool:
    """Whether attention goes through ``flash_attention``: not for ``attention="xla"``, cached
    decoding (its keys are cache slots) or active dropout (it drops probabilities)."""
    return cfg.attention != "xla" and not decode and (deterministic or cfg.dropout == 0)


def _self_scores(relative, positions, segment_ids, causal: bool) -> Scores:
    return Scores(q_segment_ids=segment_ids, kv_segment_ids=segment_ids, table=relative.table(),
                  q_positions=positions, kv_positions=positions, causal=causal,
                  buckets=relative.buckets)


class Encoder(nn.Module):
    """Embedded tokens -> the normalised encoder output."""

    config: T5Config

    @nn.compact
    def __call__(self, x, positions, segment_ids, deterministic: bool = True):
        cfg = self.config
        relative = _relative_bias(cfg, True)
        if _uses_kernel(cfg, deterministic):
            scores = _self_scores(relative, positions, segment_ids, causal=False)
        else:
            scores = Scores(bias=relative(positions, positions) + _mask_bias(
                segment_ids[:, :, None] == segment_ids[:, None, :]))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACTIVATION_EMBED)
        x = apply_stack(EncoderBlock, x, scores, n_layers=cfg.n_layers, scan=cfg.scan_layers,
                        remat=cfg.remat, config=cfg, deterministic=deterministic)
        x = cfg.make_norm("final_norm")(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class Decoder(nn.Module):
    """Embedded decoder tokens + encoder output -> the normalised decoder output.

    With ``decode`` (after the cache exists) the self-attention keys are the cache's slots, key
    ``j`` at position ``j``: a query at position ``p`` sees slots ``<= p``.
    """

    config: T5Config

    @nn.compact
    def __call__(self, x, enc_out, positions, segment_ids, enc_segment_ids,
                 deterministic: bool = True, decode: bool = False):
        cfg = self.config
        batch, length = x.shape[:2]
        cached = decode and self.has_variable("cache", "slots")
        if decode:
            slots = self.variable("cache", "slots", jnp.zeros, (length,), jnp.int32)
            index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            if cached:
                positions = positions + index.value
        if cached:
            index.value = index.value + length
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        relative = _relative_bias(cfg, False)
        if _uses_kernel(cfg, deterministic, decode):
            self_scores = _self_scores(relative, positions, segment_ids, causal=True)
            cross_scores = Scores(q_segment_ids=segment_ids, kv_segment_ids=enc_segment_ids)
        else:
            if cached:
                keys = jnp.broadcast_to(jnp.arange(slots.value.shape[0], dtype=jnp.int32),
                                        (batch, slots.value.shape[0]))
                mask = keys[:, None, :] <= positions[:, :, None]
            else:
                keys = positions
                causal = jnp.arange(length)[None, :, None] >= jnp.arange(length)[None, None, :]
                mask = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
            self_scores = Scores(bias=relative(positions, keys) + _mask_bias(mask))
            cross_scores = Scores(bias=_mask_bias(
                segment_ids[:, :, None] == enc_segment_ids[:, None, :]))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACTIVATION_EMBED)
        x = apply_stack(DecoderBlock, x, self_scores, enc_out, cross_scores,
                        n_layers=cfg.decoder_layers, scan=cfg.scan_layers, remat=cfg.remat,
                        config=cfg, deterministic=deterministic, decode=decode)
        x = cfg.make_norm("final_norm")(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


def _relative_bias(cfg: T5Config, bidirectional: bool) -> RelativePositionBias:
    return RelativePositionBias(
        cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance, bidirectional,
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nn.initializers.normal(cfg.init_std * cfg.d_model ** -0.5),
        name="relative_bias")


class EncoderBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))``; returns ``(x, None)`` (a scan body)."""

    config: T5Config
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, scores):
        cfg, drop = self.config, nn.Dropout(self.config.dropout)
        h = T5Attention(cfg, deterministic=self.deterministic, name="attention")(
            cfg.make_norm("attention_norm")(x), scores)
        x = x + drop(h, deterministic=self.deterministic)
        h = FeedForward(cfg, deterministic=self.deterministic, name="mlp")(
            cfg.make_norm("mlp_norm")(x))
        x = x + drop(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_EMBED), None


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, FFN; each pre-norm."""

    config: T5Config
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, self_scores, enc_out, cross_scores):
        cfg, drop = self.config, nn.Dropout(self.config.dropout)
        h = T5Attention(cfg, deterministic=self.deterministic, decode=self.decode,
                        name="self_attention")(cfg.make_norm("self_attention_norm")(x),
                                               self_scores)
        x = x + drop(h, deterministic=self.deterministic)
        h = T5Attention(cfg, deterministic=self.deterministic, decode=self.decode, cross=True,
                        name="cross_attention")(cfg.make_norm("cross_attention_norm")(x),
                                                cross_scores, enc_out)
        x = x + drop(h, deterministic=self.deterministic)
        h = FeedForward(cfg, deterministic=self.deterministic, name="mlp")(
            cfg.make_norm("mlp_norm")(x))
        x = x + drop(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_EMBED), None


def _kernel(module: nn.Module, name: str, shape, axes, std: float, param_dtype):
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(std), axes),
                        shape, param_dtype)


class T5Attention(nn.Module):
    """``softmax(q k^T + bias) v`` over heads, no score scaling, no biases; ``scores`` (a
    ``Scores``) holds the materialised bias or the kernel's masks and relative bias. ``cross``:
    keys and values come from ``kv`` (the encoder output).

    ``decode``: self-attention keeps ``cached_key/value (batch, max_len, heads, d_kv)`` and
    ``cache_index`` and attends over all slots (the caller's bias masks unwritten ones);
    cross-attention keeps ``cross_key/value`` computed from ``kv`` on the first cached call
    (``cross_ready``) and reused after.
    """

    config: T5Config
    deterministic: bool = True
    decode: bool = False
    cross: bool = False

    @nn.compact
    def __call__(self, x, scores: Scores, kv=None):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, heads, d_kv, f = x.shape[-1], cfg.n_heads, cfg.d_kv, cfg.init_std
        axes = ("embed", "heads", "head_dim")
        wq = _kernel(self, "query", (d, heads, d_kv), axes, f * (d * d_kv) ** -0.5, param_dtype)
        wk = _kernel(self, "key", (d, heads, d_kv), axes, f * d ** -0.5, param_dtype)
        wv = _kernel(self, "value", (d, heads, d_kv), axes, f * d ** -0.5, param_dtype)
        wo = _kernel(self, "out", (heads, d_kv, d), ("heads", "head_dim", "embed"),
                     f * (heads * d_kv) ** -0.5, param_dtype)

        def project(inputs, w):
            y = jnp.einsum("bld,dhk->blhk", inputs.astype(dtype), w.astype(dtype))
            return nn.with_logical_constraint(y, CACHE_AXES)

        q = nn.with_logical_constraint(project(x, wq), ACTIVATION_HEADS)
        if self.cross:
            k, v = self._cross_kv(kv, lambda: (project(kv, wk), project(kv, wv)))
        else:
            k, v = project(x, wk), project(x, wv)
            if self.decode:
                k, v = self._cached_kv(k, v)
        if scores.bias is None:
            out = _flash(q, k, v, scores, cfg.attention)
        else:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits + scores.bias, axis=-1)
            probs = nn.Dropout(cfg.dropout)(probs, deterministic=self.deterministic)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v)
        out = nn.with_logical_constraint(checkpoint_name(out, ATTENTION_OUT), ACTIVATION_HEADS)
        return jnp.einsum("bqhk,hkd->bqd", out, wo.astype(dtype))

    def _cache(self, name, like):
        return self.variable("cache", name, nn.with_logical_partitioning(jnp.zeros, CACHE_AXES),
                             like.shape, like.dtype)

    def _cached_kv(self, k, v):
        initialising = not self.has_variable("cache", "cached_key")
        ck, cv = self._cache("cached_key", k), self._cache("cached_value", v)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if initialising:
            return k, v
        ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype),
                                                (0, index.value, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype),
                                                (0, index.value, 0, 0))
        index.value = index.value + k.shape[1]
        return ck.value, cv.value

    def _cross_kv(self, kv, compute):
        if not self.decode:
            return compute()
        initialising = not self.has_variable("cache", "cross_key")
        if initialising:
            k, v = compute()
            self._cache("cross_key", k), self._cache("cross_value", v)
            self.variable("cache", "cross_ready", lambda: jnp.zeros((), jnp.int32))
            return k, v
        shapes = jax.eval_shape(compute)
        ck, cv = self._cache("cross_key", shapes[0]), self._cache("cross_value", shapes[1])
        ready = self.variable("cache", "cross_ready", lambda: jnp.zeros((), jnp.int32))
        k, v = jax.lax.cond(ready.value > 0, lambda: (ck.value, cv.value), compute)
        ck.value, cv.value, ready.value = k, v, jnp.ones((), jnp.int32)
        return k, v


def _flash(q, k, v, scores: Scores, implementation: str):
    """``flash_attention`` (unscaled, T5's) with the masks and relative bias of ``scores``; a
    kernel runs per device on its batch rows and heads (``per_shard``)."""

    def product(q, k, v, q_seg, kv_seg, table, q_pos, kv_pos):
        relative = None if table is None else RelativeBias(
            table, q_pos, kv_pos, scores.buckets.bidirectional, scores.buckets.max_distance)
        return flash_attention(q, k, v, causal=scores.causal, q_segment_ids=q_seg,
                               kv_segment_ids=kv_seg, relative_bias=relative, scale=1.0,
                               implementation=implementation)

    heads, rows = ("activation_batch", None, "activation_heads", None), ("activation_batch", None)
    operands = [(q, heads), (k, heads), (v, heads), (scores.q_segment_ids, rows),
                (scores.kv_segment_ids, rows), (scores.table, (None, "activation_heads")),
                (scores.q_positions, rows), (scores.kv_positions, rows)]
    if not per_shard.runs_a_kernel(implementation):
        return product(*(a for a, _ in operands))
    return per_shard.per_shard(product, operands, heads)


class FeedForward(nn.Module):
    """``wo(relu(wi x))`` (T5) or ``wo(gelu(wi_0 x) * wi_1 x)`` (T5 v1.1, tanh GELU); dropout on
    the hidden activations as T5 does."""

    config: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, f = x.shape[-1], cfg.init_std
        x = x.astype(dtype)

        def wi(name):
            w = _kernel(self, name, (d, cfg.d_ff), ("embed", "mlp"), f * d ** -0.5, param_dtype)
            return x @ w.astype(dtype)

        if cfg.feed_forward == "relu":
            h = jax.nn.relu(wi("wi"))
        else:
            # (the VJP keeps only the GELU's input; XLA's backward: no kernel to shard)
            h = bias_gelu(wi("wi_0"), implementation="xla") * wi("wi_1")
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        wo = _kernel(self, "wo", (cfg.d_ff, d), ("mlp", "embed"), f * cfg.d_ff ** -0.5,
                     param_dtype)
        return h @ wo.astype(dtype)
