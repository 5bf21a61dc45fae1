"""Token embeddings (with the tied output projection), learned absolute positions and RoPE
(with the linear and Llama-3 frequency scalings of long-context checkpoints)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
    """A ``(vocab, embed)`` table: ``__call__`` looks tokens up, ``attend`` is the tied LM head.

    Out-of-range ids give NaN rows (``jnp.take``'s fill mode) rather than a silently clamped row.
    """

    num_embeddings: int
    features: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype,
        )

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0, mode="fill").astype(self.dtype)

    def attend(self, x, out_dtype=jnp.float32):
        """Logits ``x @ embedding.T`` in ``dtype`` with float32 accumulation, returned in
        ``out_dtype``."""
        return logits_matmul(x.astype(self.dtype), self.embedding.astype(self.dtype), True,
                             out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def logits_matmul(x: jax.Array, table: jax.Array, vocab_major: bool,
                  out_dtype=jnp.float32) -> jax.Array:
    """The LM head: ``x (..., d)`` times ``table`` (``(vocab, d)`` if ``vocab_major`` else
    ``(d, vocab)``), both in the compute dtype, accumulated in float32 and returned in
    ``out_dtype`` (float32, or the compute dtype: ``ModelConfig.float32_logits``).

    Plain autodiff would contract the float32 logits cotangent with the compute-dtype operands,
    i.e. two float32 matmuls of the model's largest shape (tokens x vocab x d). The backward here
    rounds the cotangent to the operands' dtype first (as mixed-precision training does for every
    other layer), so both gradient matmuls run at the compute dtype's rate with float32
    accumulation. With float32 compute it is exactly autodiff's gradient.
    """
    spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
    # The output type is the matmul's: a compute-dtype result is written straight from its
    # float32 accumulators (no float32 logits and separate cast).
    return jnp.einsum(spec, x, table, preferred_element_type=out_dtype)


def _logits_matmul_fwd(x, table, vocab_major, out_dtype):
    return logits_matmul(x, table, vocab_major, out_dtype), (x, table)


def _logits_matmul_bwd(vocab_major, out_dtype, residuals, g):
    x, table = residuals
    g = g.astype(x.dtype)
    w_spec = "vd" if vocab_major else "dv"
    dx = jnp.einsum(f"...v,{w_spec}->...d", g, table, preferred_element_type=jnp.float32)
    dtable = jnp.einsum(f"...v,...d->{w_spec}", g, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dtable.astype(table.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


class LearnedPositions(nn.Module):
    """GPT-2's absolute position table ``(max_len, embed)``; positions >= max_len give NaN."""

    max_len: int
    features: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions):
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (None, "embed")),
            (self.max_len, self.features), self.param_dtype,
        )
        return jnp.take(table, positions, axis=0, mode="fill").astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE's inverse frequencies are stretched for a longer context than pre-training's.

    ``linear`` (position interpolation, Chen et al. 2023) divides every frequency by ``factor``.
    ``llama3`` (Llama 3.1) leaves wavelengths shorter than ``original_max_len /
    high_freq_factor`` alone, divides those longer than ``original_max_len / low_freq_factor``
    by ``factor``, and in between interpolates the two by ``original_max_len / wavelength``.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"RoPE scaling kind must be 'linear' or 'llama3', got {self.kind!r}")
        if not self.factor > 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not (0 < self.low_freq_factor < self.high_freq_factor
                                          and self.original_max_len > 0):
            raise ValueError(
                "llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor and "
                f"original_max_len > 0, got {self.low_freq_factor}, {self.high_freq_factor}, "
                f"{self.original_max_len}")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """The ``head_dim // 2`` float32 inverse frequencies ``theta ** (-2i / head_dim)``, scaled."""
    inv_freq = theta ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    if scaling is None:
        return inv_freq
    slow = inv_freq / scaling.factor
    if scaling.kind == "linear":
        return slow
    old_len, low, high = scaling.original_max_len, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    between = (1 - smooth) * slow + smooth * inv_freq
    return jnp.where(wavelen < old_len / high, inv_freq,
                     jnp.where(wavelen > old_len / low, slow, between))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
               scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout (GPT-NeoX / HF LLaMA).

    Feature ``i < D/2`` is paired with feature ``i + D/2`` and the pair is rotated by the angle
    ``position * inv_freq[i]`` (``rope_inv_freq``: ``theta ** (-2i / D)``, stretched by
    ``scaling``). Computed in float32 (angles of positions in the thousands lose all precision in
    bfloat16), returned in ``x.dtype``.

    Args:
      x: ``(batch, length, heads, head_dim)`` with an even ``head_dim``.
      positions: ``(batch, length)`` integer positions.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (batch, length, half)
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
