"""``flash_attention``: argument validation, choice of implementation, and the custom VJP.

The implementations besides ``"xla"`` (``mosaic_gpu``, ``triton``, ``tpu``, ``cudnn``) are imported
lazily: one whose module is missing or fails to import is skipped by ``"auto"`` and reported by a
``ValueError`` when named. The policy is ``_api.Dispatch``'s, the same for every op.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from pallas_kernels._api import Dispatch, Lowering, is_int, load_lowering, shape_of
from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention.common import AttentionSpec, Call, RelativeBuckets

# Fastest first: "auto" takes the first that runs natively on the target and supports the call.
DISPATCH = Dispatch("pallas_kernels.flash_attention", (
    Lowering("mosaic_gpu", "gpu", arch="9."),
    Lowering("triton", "gpu"),
    Lowering("tpu", "tpu"),
    Lowering("cudnn", "gpu", pallas=False, auto=False),
))
IMPLEMENTATIONS = DISPATCH.names
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class RelativeBias:
    """T5's bucketed relative position bias, computed inside the kernel from per-row positions.

    The logit of query ``i`` and key ``j`` (head ``h``) gets ``table[b, h]`` with ``b`` the
    bucket (``RelativeBuckets``) of ``kv_positions[:, j] - q_positions[:, i]``; positions may
    restart in every packed segment. ``table`` is float ``(num_buckets, heads)`` and receives a
    gradient; the int positions ``(batch, q_len)`` / ``(batch, kv_len)`` and the static
    ``bidirectional`` and ``max_distance`` do not.
    """

    table: jax.Array
    q_positions: jax.Array
    kv_positions: jax.Array
    bidirectional: bool = True
    max_distance: int = 128


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    sliding_window: int | None = None,
    alibi_slopes=None,
    relative_bias: RelativeBias | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    q_offset: int = 0,
    return_lse: bool = False,
    implementation: str = "auto",
    interpret: bool = False,
    tiles=None,
):
    """Memory-efficient exact attention in the layout of ``jax.nn.dot_product_attention``.

    Args:
      q: ``(batch, q_len, heads, head_dim)``, bfloat16, float16 or float32.
      k, v: ``(batch, kv_len, kv_heads, head_dim)`` in q's dtype; ``heads`` must be a multiple of
        ``kv_heads`` (GQA/MQA): query head ``h`` reads kv head ``h // (heads // kv_heads)``.
      causal: query ``i`` sees keys ``j <= q_offset + i``.
      segment_ids: ``(batch, len)`` integer ids for both sides (requires ``q_len == kv_len``); a
        query sees only keys of its own segment. Or give ``q_segment_ids`` ``(batch, q_len)`` and
        ``kv_segment_ids`` ``(batch, kv_len)`` together.
      sliding_window: ``w > 0`` (with ``causal``): query ``i`` sees keys
        ``q_offset+i-w+1 .. q_offset+i``.
      alibi_slopes: ``(heads,)`` float; adds ``-slope_h * |pos_q - pos_k|`` to the logits. The
        slopes are constants: no gradient flows to them.
      relative_bias: a ``RelativeBias`` (T5): adds ``table[bucket(kv_pos - q_pos), h]`` to the
        logits (after scaling, before the soft cap), differentiable w.r.t. the table. Only
        ``"xla"`` and ``"triton"`` take it (``"auto"`` on a GPU picks Triton).
      logits_soft_cap: ``c > 0``; logits become ``c * tanh(logits / c)`` (after ALiBi).
      scale: multiplies ``q.k``; defaults to ``1 / sqrt(head_dim)``.
      q_offset: absolute position of the first query among the keys (decoding with a cache).
      return_lse: also return the float32 log-sum-exp of the logits, ``(batch, heads, q_len)``.
      implementation: ``"auto"``, ``"xla"`` (the plain-JAX reference, which materialises the
        scores), the Pallas lowerings ``"mosaic_gpu"`` (Hopper), ``"triton"`` (GPU), ``"tpu"``,
        or ``"cudnn"`` (``jax.nn.dot_product_attention``'s; GPU, no ALiBi, soft cap or
        ``return_lse``). ``"auto"`` picks the first Pallas lowering in that order that runs
        natively on the target and supports the call, else ``"xla"``; it never picks cuDNN.
      interpret: run a named Pallas lowering in interpret mode (how CI tests them on CPU); it
        never changes what ``"auto"`` picks.
      tiles: the named Pallas lowering's ``Tiles`` (e.g. ``flash_attention.triton.Tiles``);
        ``None`` takes its default for the target device.

    Returns:
      ``out`` like ``q`` (and ``lse`` when ``return_lse``). A query that sees no key gets zeros,
      ``lse = -inf`` and zero gradients.

    Raises:
      ValueError: naming the violated constraint.
    """
    q_seg, kv_seg, alibi_slopes, spec = _prepare(
        q, k, v, causal, segment_ids, q_segment_ids, kv_segment_ids, sliding_window,
        alibi_slopes, logits_soft_cap, scale, q_offset)
    rel = None
    if relative_bias is not None:
        rel, relative = _relative_bias(relative_bias, q.shape, k.shape[1])
        spec = dataclasses.replace(spec, relative=relative)
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    call = Call(q.shape, k.shape, q.dtype, spec, return_lse)
    name, tiles = DISPATCH.choose(implementation, call, interpret=bool(interpret), tiles=tiles)
    if name == "xla":
        out, lse = reference.attention(q, k, v, q_seg, kv_seg, alibi_slopes, rel, spec=spec)
    elif name == "cudnn":
        return _load_lowering("cudnn")[0].attention(q, k, v, q_seg, kv_seg, spec)
    else:
        plan = _Plan(name, spec, tiles, bool(interpret))
        out, lse = _kernel_attention(plan, q, k, v, q_seg, kv_seg, alibi_slopes, rel)
    return (out, lse) if return_lse else out


def flash_attention_qkv(
    qkv, *, causal: bool = False, segment_ids=None, sliding_window: int | None = None,
    alibi_slopes=None, logits_soft_cap: float | None = None, scale: float | None = None,
    implementation: str = "auto", interpret: bool = False, tiles=None,
):
    """Self-attention of q, k and v given as one array ``qkv (batch, len, heads, 3, head_dim)``
    (a fused q/k/v projection's output), differentiable w.r.t. that array.

    Heads-major, so that the projection can be one 2-D product ``(embed, heads * 3 * head_dim)``
    whose bias XLA fuses into the matmul's epilogue, and which shards over heads (tensor
    parallelism) in contiguous blocks.

    The Mosaic GPU kernels read each head where it lies in ``qkv`` and write the gradient in its
    layout (``mosaic_gpu.forward_packed``), so neither three slices of the projection nor a
    concatenation of their gradients is copied; every other implementation (and Mosaic GPU where
    ``supports_packed`` declines) runs ``flash_attention(qkv[:, :, :, 0], qkv[:, :, :, 1],
    qkv[:, :, :, 2])``. Arguments and result as ``flash_attention``'s, with ``kv_heads == heads``.
    """
    if getattr(qkv, "ndim", None) != 5 or qkv.shape[3] != 3:
        raise ValueError(f"qkv must have shape (batch, len, heads, 3, head_dim), got "
                         f"{shape_of(qkv)}")
    part = jax.ShapeDtypeStruct((*qkv.shape[:3], qkv.shape[4]), qkv.dtype)
    seg, _, slopes, spec = _prepare(part, part, part, causal, segment_ids, None, None,
                                    sliding_window, alibi_slopes, logits_soft_cap, scale, 0)
    call = Call(part.shape, part.shape, qkv.dtype, spec, False)
    name, tiles = DISPATCH.choose(implementation, call, interpret=bool(interpret), tiles=tiles)
    if name == "mosaic_gpu" and _load_lowering(name)[0].supports_packed(call, tiles) is None:
        return _packed_attention(_Plan(name, spec, tiles, bool(interpret)), qkv, seg, slopes)
    q, k, v = (qkv[:, :, :, i] for i in range(3))
    return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                           sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                           logits_soft_cap=logits_soft_cap, scale=scale, implementation=name,
                           interpret=interpret, tiles=tiles)


def flash_attention_backward(
    q, k, v, out, lse, d_out, *, causal: bool = False, segment_ids=None, q_segment_ids=None,
    kv_segment_ids=None, sliding_window: int | None = None, scale: float | None = None,
    q_offset: int = 0, implementation: str = "auto", interpret: bool = False, tiles=None,
):
    """``(dq, dk, dv)`` of attention of ``q`` over ``k, v`` whose softmax is normalised by the
    given ``lse`` ``(batch, heads, q_len)`` and whose output was ``out``: the backward kernel
    alone, no forward recomputed.

    ``out`` and ``lse`` may be those of a softmax over more keys than ``k`` holds, of which these
    keys are one block (ring attention: each block's gradient from the final output and
    log-sum-exp, so neither the block's forward nor an lse cotangent is needed); with those of
    ``flash_attention(q, k, v, return_lse=True)`` it is that call's gradient. Other arguments
    as ``flash_attention``'s (no ALiBi or soft-capping here); cuDNN has no separate backward.
    """
    q_seg, kv_seg, _, spec = _prepare(
        q, k, v, causal, segment_ids, q_segment_ids, kv_segment_ids, sliding_window, None, None,
        scale, q_offset)
    batch, q_len, heads, _ = q.shape
    if out.shape != q.shape or lse.shape != (batch, heads, q_len) or d_out.shape != q.shape:
        raise ValueError(f"out and d_out must have q's shape {q.shape} and lse (batch, heads, "
                         f"q_len) = {(batch, heads, q_len)}; got {out.shape}, {d_out.shape}, "
                         f"{lse.shape}")
    if implementation == "cudnn":
        raise ValueError("implementation='cudnn' has no separate backward; use 'auto'")
    call = Call(q.shape, k.shape, q.dtype, spec, True)
    name, tiles = DISPATCH.choose(implementation, call, interpret=bool(interpret), tiles=tiles)
    args = (q, k, v, q_seg, kv_seg, None, out, lse.astype(jnp.float32), d_out.astype(out.dtype))
    if name == "xla":
        return reference.backward(*args, spec=spec)
    return _Plan(name, spec, tiles, bool(interpret)).module.backward(
        *args, spec=spec, tiles=tiles, interpret=bool(interpret))


# ----------------------------------------------------------------------------- validation


def _prepare(q, k, v, causal, segment_ids, q_segment_ids, kv_segment_ids, sliding_window,
             alibi_slopes, logits_soft_cap, scale, q_offset):
    """The checked arguments as ``(q_seg, kv_seg, alibi_slopes, spec)``."""
    _check_arrays(q, k, v)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q_seg, kv_seg = _segment_ids(segment_ids, q_segment_ids, kv_segment_ids, batch, q_len, kv_len)

    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if sliding_window is not None:
        if not is_int(sliding_window) or sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
        if not causal:
            raise ValueError("sliding_window requires causal=True")
    if alibi_slopes is not None:
        alibi_slopes = jnp.asarray(alibi_slopes)
        if alibi_slopes.shape != (heads,) or not jnp.issubdtype(alibi_slopes.dtype, jnp.floating):
            raise ValueError(
                f"alibi_slopes must be a float array of shape (heads,) = ({heads},), got "
                f"{alibi_slopes.dtype}{alibi_slopes.shape}"
            )
        # Slopes are fixed per head in every ALiBi model; the kernels return no gradient for them.
        alibi_slopes = jax.lax.stop_gradient(alibi_slopes.astype(jnp.float32))
    if logits_soft_cap is not None:
        logits_soft_cap = _positive_number("logits_soft_cap", logits_soft_cap)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else _positive_number("scale", scale)
    if not is_int(q_offset) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")

    spec = AttentionSpec(
        causal=causal,
        sliding_window=None if sliding_window is None else int(sliding_window),
        logits_soft_cap=logits_soft_cap,
        scale=scale,
        q_offset=int(q_offset),
        has_segment_ids=q_seg is not None,
        has_alibi=alibi_slopes is not None,
    )
    return q_seg, kv_seg, alibi_slopes, spec



def _relative_bias(rb, q_shape, kv_len):
    """``((table, q_positions, kv_positions), RelativeBuckets)`` checked: a float32 table and
    int32 positions."""
    if not isinstance(rb, RelativeBias):
        raise ValueError(f"relative_bias must be a RelativeBias, got {type(rb).__name__}")
    batch, q_len, heads, _ = q_shape
    table = jnp.asarray(rb.table)
    if table.ndim != 2 or table.shape[1] != heads or not jnp.issubdtype(table.dtype,
                                                                         jnp.floating):
        raise ValueError(f"relative_bias.table must be a float array (num_buckets, heads={heads}),"
                         f" got {table.dtype}{table.shape}")
    positions = []
    for name, pos, length in (("q", rb.q_positions, q_len), ("kv", rb.kv_positions, kv_len)):
        pos = jnp.asarray(pos)
        if pos.shape != (batch, length) or not jnp.issubdtype(pos.dtype, jnp.integer):
            raise ValueError(f"relative_bias.{name}_positions must be integers of shape (batch, "
                             f"{name}_len) = ({batch}, {length}), got {pos.dtype}{pos.shape}")
        positions.append(jax.lax.stop_gradient(pos.astype(jnp.int32)))
    if not isinstance(rb.bidirectional, bool):
        raise ValueError(f"relative_bias.bidirectional must be a bool, got {rb.bidirectional!r}")
    if not is_int(rb.max_distance):
        raise ValueError(f"relative_bias.max_distance must be a static int, got "
                         f"{rb.max_distance!r}")
    buckets = RelativeBuckets(table.shape[0], rb.bidirectional, int(rb.max_distance))
    return (table.astype(jnp.float32), *positions), buckets


def _positive_number(name, x) -> float:
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise ValueError(f"{name} must be a static Python number > 0, got {x!r}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {x!r}")
    return float(x)


def _check_arrays(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must have rank 4 (batch, length, heads, head_dim), got shape "
                f"{shape_of(x)}"
            )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype among bfloat16, float16, float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"all dimensions must be >= 1, got q {q.shape}, k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})"
        )


def _segment_ids(segment_ids, q_segment_ids, kv_segment_ids, batch, q_len, kv_len):
    if segment_ids is not None:
        if q_segment_ids is not None or kv_segment_ids is not None:
            raise ValueError("give either segment_ids or q_segment_ids/kv_segment_ids, not both")
        if q_len != kv_len:
            raise ValueError(
                f"segment_ids needs q_len == kv_len (got {q_len}, {kv_len}); "
                "use q_segment_ids and kv_segment_ids"
            )
        q_segment_ids = kv_segment_ids = segment_ids
    elif (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is None:
        return None, None
    out = []
    for name, ids, length in (("q", q_segment_ids, q_len), ("kv", kv_segment_ids, kv_len)):
        ids = jnp.asarray(ids)
        if ids.shape != (batch, length) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"{name} segment ids must be integers of shape (batch, {name}_len) = "
                f"({batch}, {length}), got {ids.dtype}{ids.shape}"
            )
        out.append(ids.astype(jnp.int32))
    return tuple(out)


_load_lowering = functools.partial(load_lowering, DISPATCH.package)


# ----------------------------------------------------------------------------- custom VJP


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one kernel call (hashable: it is a nondiff argument)."""

    implementation: str
    spec: AttentionSpec
    tiles: object  # the lowering's Tiles
    interpret: bool

    @property
    def module(self):
        return _load_lowering(self.implementation)[0]

    @property
    def kwargs(self):
        return dict(spec=self.spec, tiles=self.tiles, interpret=self.interpret)


def _rel_kwargs(rel):
    """The relative bias goes only to the lowerings that support it (a keyword of theirs)."""
    return {} if rel is None else {"relative_bias": rel}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_attention(plan, q, k, v, q_seg, kv_seg, slopes, rel):
    return plan.module.forward(q, k, v, q_seg, kv_seg, slopes, **plan.kwargs, **_rel_kwargs(rel))


def _kernel_attention_fwd(plan, *primals):
    q, k, v, q_seg, kv_seg, slopes, rel = custom_vjp_primal_tree_values(primals)
    out, lse = plan.module.forward(q, k, v, q_seg, kv_seg, slopes, **plan.kwargs,
                                   **_rel_kwargs(rel))
    return (out, lse), (q, k, v, q_seg, kv_seg, slopes, rel, out, lse)


def _kernel_attention_bwd(plan, residuals, cotangents):
    q, k, v, q_seg, kv_seg, slopes, rel, out, lse = residuals
    d_out, d_lse = cotangents
    # With a relative bias the backward also returns the table's gradient.
    backward = functools.partial(plan.module.backward, **plan.kwargs, **_rel_kwargs(rel))
    if isinstance(d_out, SymbolicZero):
        d_out = jnp.zeros_like(out)
    dq, dk, dv, *d_table = backward(q, k, v, q_seg, kv_seg, slopes, out, lse,
                                    d_out.astype(out.dtype))
    if not isinstance(d_lse, SymbolicZero):
        # The lowerings take no lse cotangent, but their backward is linear in it: with
        # P = exp(S - lse), dS = P * (dO.V - rowsum(dO*O) + dlse). A second call with V = 0 and
        # (O', dO') chosen so that rowsum(dO'*O') = -dlse therefore yields exactly the dlse term
        # for dq and dk (its dv is zero by construction and dropped). dlse is split into two
        # columns (high and low part in q's dtype) so that it survives bfloat16 rounding.
        d_lse = jnp.swapaxes(d_lse.astype(jnp.float32), 1, 2)[..., None]  # (B, Lq, H, 1)
        hi = d_lse.astype(q.dtype)
        lo = (d_lse - hi.astype(jnp.float32)).astype(q.dtype)
        pad = [(0, 0)] * 3 + [(0, q.shape[-1] - 2)]
        out2 = jnp.pad(-jnp.concatenate([hi, lo], axis=-1), pad)
        d_out2 = jnp.pad(jnp.ones_like(out2[..., :2]), pad)
        dq2, dk2, _, *d_table2 = backward(q, k, jnp.zeros_like(v), q_seg, kv_seg, slopes, out2,
                                          lse, d_out2)
        dq = (dq.astype(jnp.float32) + dq2.astype(jnp.float32)).astype(q.dtype)
        dk = (dk.astype(jnp.float32) + dk2.astype(jnp.float32)).astype(k.dtype)
        d_table = [a + b for a, b in zip(d_table, d_table2)]
    d_rel = None if rel is None else (d_table[0], None, None)
    return dq, dk, dv, None, None, None, d_rel


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _packed_attention(plan, qkv, seg, slopes):
    return plan.module.forward_packed(qkv, seg, slopes, **plan.kwargs)[0]


def _packed_attention_fwd(plan, qkv, seg, slopes):
    out, lse = plan.module.forward_packed(qkv, seg, slopes, **plan.kwargs)
    return out, (qkv, seg, slopes, out, lse)


def _packed_attention_bwd(plan, residuals, d_out):
    qkv, seg, slopes, out, lse = residuals
    dqkv = plan.module.backward_packed(qkv, seg, slopes, out, lse, d_out.astype(out.dtype),
                                       **plan.kwargs)
    return dqkv, None, None


_packed_attention.defvjp(_packed_attention_fwd, _packed_attention_bwd)
