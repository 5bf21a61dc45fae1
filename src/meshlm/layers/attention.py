"""Multi-head attention with grouped-query K/V, RoPE, packed segments, an optional sliding window
(Mistral) and a decoding KV cache.

The attention product itself is ``pallas_kernels.flash_attention.flash_attention`` (its
``implementation="xla"`` reference on CPU, Pallas kernels on GPU/TPU, or its ``"cudnn"``
implementation). K/V keep their ``kv_heads``
(never repeated to ``heads``): the kernels read query head ``h``'s keys from kv head
``h // (heads // kv_heads)``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from meshlm.layers import per_shard, ring_attention
from meshlm.layers.embeddings import RopeScaling, apply_rope

Initializer = Callable[..., jax.Array]

# The attention product's output; ``remat="save_attention"`` keeps exactly this tensor.
ATTENTION_OUT = "attention_out"
CACHE_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "head_dim")
# Segment id of cache slots not yet written: never equal to a query's id (>= 0), so never seen.
_EMPTY_SLOT = -1


def attend(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool = True,
           q_offset: int = 0, sliding_window: int | None = None, implementation: str = "auto",
           interpret: bool = False):
    """``softmax(q k^T / sqrt(d)) v`` with ``q (B, Lq, H, D)``, ``k, v (B, Lk, Hkv, D)``, by
    ``flash_attention(implementation=...)`` (``"cudnn"`` included).

    Query ``i`` sits at key position ``q_offset + i`` (``causal``: sees keys ``<=`` that); with
    segment ids (both or neither) it sees only keys of its own segment; with ``sliding_window=w``
    (needs ``causal``) only the ``w`` latest keys, its own included.
    """
    from pallas_kernels.flash_attention import flash_attention

    def product(q, k, v, q_seg, kv_seg):
        return flash_attention(
            q, k, v, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
            q_offset=q_offset, sliding_window=sliding_window, implementation=implementation,
            interpret=interpret,
        )

    if not per_shard.runs_a_kernel(implementation):
        return product(q, k, v, q_segment_ids, kv_segment_ids)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.axis_names and (per_shard.mesh_axes("activation_heads", mesh)
                            != per_shard.mesh_axes("activation_kv_heads", mesh)):
        raise ValueError("attention kernels need query and kv heads split over the same mesh "
                         "axes (query head h reads kv head h // group on each device); the rules "
                         "map activation_heads and activation_kv_heads differently")
    # Split over batch and heads only: a query attends across the whole length.
    q_axes, kv_axes = ("activation_batch", None, "activation_heads", None), (
        "activation_batch", None, "activation_kv_heads", None)
    rows = ("activation_batch", None)
    return per_shard.per_shard(product, [(q, q_axes), (k, kv_axes), (v, kv_axes),
                                         (q_segment_ids, rows), (kv_segment_ids, rows)], q_axes)


def attend_qkv(qkv, *, segment_ids=None, sliding_window: int | None = None,
               implementation: str = "auto", interpret: bool = False):
    """Causal self-attention of ``qkv (B, L, H, 3, D)`` (a fused projection's output), by
    ``flash_attention_qkv``: the kernels that can read q, k and v inside one array do, so it is
    not sliced into three copies; ``segment_ids`` as in ``attend``."""
    from pallas_kernels.flash_attention import flash_attention_qkv

    def product(qkv, seg):
        return flash_attention_qkv(qkv, causal=True, segment_ids=seg,
                                   sliding_window=sliding_window, implementation=implementation,
                                   interpret=interpret)

    qkv_axes = ("activation_batch", None, "activation_heads", None, None)
    seg_axes = ("activation_batch", None)
    return per_shard.per_shard(product, [(qkv, qkv_axes), (segment_ids, seg_axes)],
                               ("activation_batch", None, "activation_heads", None))


class HeadDense(nn.Module):
    """``x`` contracted over its last ``contract`` axes with a kernel of shape
    ``(*contracted, *features)`` carrying ``kernel_axes``; the bias carries the feature axes'.

    Not ``nn.DenseGeneral``: that initialises a flattened 2-D kernel and re-boxes it after the
    reshape, which applies the 3-axis sharding constraint to a 2-D array and fails whenever a mesh
    is active (Flax re-runs initializers abstractly on every ``apply`` to check shapes).

    ``unstack=True`` returns the entries of the first feature axis as a tuple of arrays, each from
    its own product with that slice of the one kernel: slicing one product's output instead makes
    the gradient a stack of the parts' gradients, which XLA fuses into one pass that computes every
    part's gradient expression at every element (for a two-part projection of 2 x 1536
    features: by its shape, a ~190 us fusion per layer at 16k tokens on an H200).
    """

    features: tuple[int, ...]
    contract: int
    kernel_axes: tuple[str, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    unstack: bool = False
    weights_only: bool = False  # return (kernel, bias) in the compute dtype, not the product

    @nn.compact
    def __call__(self, x):
        n_out = len(self.features)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            x.shape[x.ndim - self.contract:] + tuple(self.features), self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                     self.kernel_axes[-n_out:]),
                tuple(self.features), self.param_dtype,
            )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.weights_only:
            return kernel, bias
        dims = ((tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract))),
                ((), ()))

        def product(kernel, bias):
            y = jax.lax.dot_general(x, kernel, dims)
            return y if bias is None else y + bias

        if not self.unstack:
            return product(kernel, bias)
        return tuple(product(jnp.take(kernel, i, axis=self.contract),
                             None if bias is None else bias[i])
                     for i in range(self.features[0]))


class Attention(nn.Module):
    """Causal self-attention: q/k/v/out projections with head axes, optional RoPE, GQA/MQA.

    ``use_bias`` gives every projection a bias, ``qkv_bias`` only q/k/v (Qwen2).
    ``sliding_window=w`` lets a token see the ``w`` latest tokens, itself included (Mistral), in
    training and in decoding (where it applies to the cached keys); None sees the whole context.

    With ``decode=True`` the layer keeps a KV cache in the ``"cache"`` collection
    (``cached_key``/``cached_value`` of shape ``(batch, max_len, kv_heads, head_dim)``, the
    ``cached_segment_ids`` and the ``cache_index``). Initialising with ``decode=True`` sizes the
    cache by the input's length; applying with it appends the given tokens (a prompt or a single
    token) at the cache index and attends to everything cached. Writing past ``max_len`` is not
    checked at run time (``dynamic_update_slice`` clamps): the caller bounds its loop.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = True
    qkv_bias: bool = False
    rope: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    implementation: str = "auto"
    interpret: bool = False  # the Pallas kernels in interpret mode (CPU tests)
    context_parallel: str = "ring"  # with the length sequence-sharded: "ring" or "ulysses"
    fuse_qkv: bool = False  # one q/k/v product into ``attend_qkv`` where ``_packs_qkv``
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    out_kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None):
        """``x (batch, length, embed)``, ``positions (batch, length)``, ``segment_ids`` or None."""
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )

        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")

        def project(heads, head_axis, name, weights_only=False):
            return HeadDense(
                (heads, self.head_dim), contract=1, kernel_axes=("embed", head_axis, "head_dim"),
                use_bias=self.use_bias or self.qkv_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name,
                weights_only=weights_only,
            )(x)

        if self._packs_qkv():
            out = self._packed(x, segment_ids, project)
        else:
            out = self._separate(x, positions, segment_ids, project)
        out = checkpoint_name(out, ATTENTION_OUT)
        out = nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
        return HeadDense(
            (x.shape[-1],), contract=2, kernel_axes=("heads", "head_dim", "embed"),
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.out_kernel_init, name="out",
        )(out)

    def _packs_qkv(self) -> bool:
        """``fuse_qkv``'s fused q/k/v product feeding ``attend_qkv``: training self-attention
        without RoPE (which would rewrite q and k) and with as many kv heads as query heads (the
        config requires both), not decoding and not context-parallel, which keep the three
        products. The parameters stay the three projections'."""
        return (self.fuse_qkv and not self.rope and self.num_kv_heads == self.num_heads
                and not self.decode and not ring_attention.applies())

    def _packed(self, x, segment_ids, project):
        weights = [project(self.num_heads, axis, name, weights_only=True)
                   for name, axis in (("query", "heads"), ("key", "kv_heads"),
                                      ("value", "kv_heads"))]
        # One 2-D product (embed, heads * 3 * head_dim): XLA adds a 1-D bias in the matmul's
        # epilogue (a 5-D product's bias was a broadcast in memory, 0.55 ms per GPT-2 125M step),
        # and heads-major columns shard over heads in contiguous blocks.
        kernel = jnp.stack([w for w, _ in weights], axis=2)  # (embed, heads, 3, head_dim)
        x = x.astype(kernel.dtype)
        qkv = jax.lax.dot_general(x, kernel.reshape(kernel.shape[0], -1),
                                  (((x.ndim - 1,), (0,)), ((), ())))
        if weights[0][1] is not None:
            qkv = qkv + jnp.stack([b for _, b in weights], axis=1).reshape(-1)
        qkv = nn.with_logical_constraint(
            qkv.reshape(*qkv.shape[:-1], *kernel.shape[1:]),
            ("activation_batch", "activation_length", "activation_heads", None, "head_dim"))
        return attend_qkv(qkv, segment_ids=segment_ids, sliding_window=self.sliding_window,
                          implementation=self.implementation, interpret=self.interpret)

    def _separate(self, x, positions, segment_ids, project):
        q = project(self.num_heads, "heads", "query")
        k = project(self.num_kv_heads, "kv_heads", "key")
        v = project(self.num_kv_heads, "kv_heads", "value")
        if self.rope:
            q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
            k = apply_rope(k, positions, self.rope_theta, self.rope_scaling)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
        k = nn.with_logical_constraint(k, CACHE_AXES)
        v = nn.with_logical_constraint(v, CACHE_AXES)

        if self.decode and self.has_variable("cache", "cached_key"):
            out = self._decode(q, k, v, segment_ids)
        else:
            if self.decode:  # initialising: create the cache, sized by this input
                self._cache_variables(k)
            if not self.decode and ring_attention.applies():  # context parallelism
                if self.sliding_window is not None:
                    raise ValueError(
                        f"sliding_window={self.sliding_window} is not supported with context "
                        "parallelism (activation_length sharded over the sequence axis)")
                out = ring_attention.context_parallel_attention(
                    q, k, v, segment_ids, causal=True, method=self.context_parallel,
                    implementation=self.implementation, interpret=self.interpret)
            else:
                out = attend(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                             causal=True, sliding_window=self.sliding_window,
                             implementation=self.implementation, interpret=self.interpret)
        return out

    def _cache_variables(self, k):
        batch, max_len = k.shape[:2]
        zeros = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
        return (
            self.variable("cache", "cached_key", zeros, k.shape, k.dtype),
            self.variable("cache", "cached_value", zeros, k.shape, k.dtype),
            self.variable("cache", "cached_segment_ids",
                          nn.with_logical_partitioning(jnp.zeros, ("activation_batch", "activation_length")),
                          (batch, max_len), jnp.int32),
            self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32)),
        )

    def _decode(self, q, k, v, segment_ids):
        ck, cv, cseg, cidx = self._cache_variables(k)
        batch, length = q.shape[:2]
        max_len = ck.value.shape[1]
        if length > max_len:
            raise ValueError(f"cannot append {length} tokens to a KV cache of length {max_len}")
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        start = cidx.value
        keys = jax.lax.dynamic_update_slice(ck.value, k, (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(cv.value, v, (0, start, 0, 0))
        segs = jax.lax.dynamic_update_slice(cseg.value, segment_ids.astype(jnp.int32), (0, start))
        ck.value, cv.value, cseg.value = keys, values, segs
        end = start + length
        cidx.value = end
        slot = jnp.arange(max_len)[None, :]
        kv_segs = jnp.where(slot < end, segs, _EMPTY_SLOT)
        if length == 1:
            # One query at the newest slot: causality is exactly "slot already written", and a
            # window of w keeps the slots from end - w on; the others are hidden as unwritten.
            if self.sliding_window is not None:
                kv_segs = jnp.where(slot >= end - self.sliding_window, kv_segs, _EMPTY_SLOT)
            return attend(q, keys, values, q_segment_ids=segment_ids, kv_segment_ids=kv_segs,
                          causal=False, implementation=self.implementation,
                          interpret=self.interpret)
        # Several queries at a traced offset, but the kernels take a static ``q_offset``: rotate
        # the cache so the new tokens occupy its last ``length`` slots (``q_offset = max_len -
        # length``); the unwritten slots wrap to the front, where their segment id hides them.
        # Distances between written slots are kept, so the window counts back over the cache.
        roll = lambda a: jnp.roll(a, -end, axis=1)
        return attend(q, roll(keys), roll(values), q_segment_ids=segment_ids,
                      kv_segment_ids=roll(kv_segs), causal=True, q_offset=max_len - length,
                      sliding_window=self.sliding_window, implementation=self.implementation,
                      interpret=self.interpret)
