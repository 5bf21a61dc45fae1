"""The shared base of the kernel tests: the lowerings each op's tests run, the error measures, and
flash attention's inputs, run and check against its float32 reference.

A ``Lowering`` is one way of running an implementation: a Pallas lowering in interpret mode on
CPU with small tiles (how CI runs it), the same compiled with its default tiles where the
hardware is present (skipped elsewhere), or cuDNN. Each lists the shared cases it runs, so that
the CPU time of interpret mode stays bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _api
from pallas_kernels.flash_attention import common as fa_common
from pallas_kernels.flash_attention import flash_attention, mosaic_gpu, tpu, triton


def gpu_arch() -> str | None:
    """The local GPU's compute capability (``"9.0"``), or None without a GPU."""
    device = jax.devices()[0]
    return str(getattr(device, "compute_capability", "")) if device.platform == "gpu" else None


NEEDS_GPU = pytest.mark.skipif(gpu_arch() is None, reason="compiled GPU kernels need a GPU")
NEEDS_HOPPER = pytest.mark.skipif(not (gpu_arch() or "").startswith("9."),
                                  reason="compiled Mosaic GPU kernels need a Hopper GPU")


@dataclasses.dataclass(frozen=True)
class Lowering:
    """``implementation=name`` with ``kwargs`` (interpret mode, tiles), on ``cases`` of the op's
    shared table; ``marks`` skip it where it cannot run; ``setup`` (if any) is called with
    pytest's ``monkeypatch`` before each check."""

    label: str
    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    cases: tuple[str, ...] = ()
    marks: tuple = ()
    setup: Callable | None = None

    def params(self):
        """``pytest.param(lowering, case)`` for each of its cases."""
        return [pytest.param(self, case, id=f"{self.label}-{case}", marks=self.marks)
                for case in self.cases]


@contextlib.contextmanager
def verified_triton_modules():
    """Every Pallas Triton kernel lowered inside is checked by the MLIR verifier, as the GPU's
    Triton parses it: a module that would fail "Failed to parse Triton module" on the device
    (e.g. mixed integer types of a loop's bounds) fails here on any host. Yields the number of
    modules checked (a one-element list)."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    lower = lowering.lower_jaxpr_to_triton_module
    checked = [0]

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises with the verifier's message
        checked[0] += 1
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower_and_verify
    try:
        yield checked
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower


def t5_relative_bucket(rel, bidirectional, num_buckets, max_distance):
    """T5's relative-position bucket of each ``key - query`` offset as published (Mesh
    TensorFlow's ``_relative_position_bucket``, the logarithm in float32), in numpy: the oracle
    of ``RelativeBuckets``' integer edges and of the T5 model tests."""
    rel = np.asarray(rel, np.int64)
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0) * num_buckets
        distance = np.abs(rel)
    else:
        distance = np.maximum(-rel, 0)
    exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        log = (np.log(distance.astype(np.float32) / np.float32(exact))
               / np.float32(math.log(max_distance / exact)) * np.float32(num_buckets - exact))
    large = np.minimum(exact + np.where(distance < exact, 0, log).astype(np.int32),
                       num_buckets - 1)
    return offset + np.where(distance < exact, distance, large)


def rel_err(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64; ``x`` must be finite."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(name, got, want, tol):
    """Same infinities, and finite entries within ``tol`` relative to the largest reference
    magnitude (``rtol = tol``, ``atol = tol * max|want|``)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{name}: inf pattern")
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{name}: inf values")
    scale = max(float(np.abs(want[finite]).max(initial=0.0)), 1e-6)
    np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol * scale, err_msg=name)


# ----------------------------------------------------------------------------- flash attention

# Relative to the largest reference magnitude: float32 inputs run exact float32 products; P and
# dS are rounded to the input dtype before their matmuls, as on the GPU.
ATTENTION_TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2,
                 jnp.dtype(jnp.float16): 4e-3}


def attention_inputs(name, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    """Fresh random ``q, k, v`` and cotangents ``d_out, d_lse``, seeded by the case name."""
    keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 5)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
    d_lse = jax.random.normal(keys[4], (batch, heads, q_len), jnp.float32)
    return q, k, v, d_out, d_lse


def attention_fwd_bwd(q, k, v, d_out, d_lse, *, return_lse=True, **kwargs):
    """``(out, lse, dq, dk, dv)`` of ``flash_attention(**kwargs)``, one jitted VJP with
    cotangents on both outputs (none on rows with ``lse = -inf``); ``lse`` is None without
    ``return_lse`` (cuDNN returns none)."""

    @jax.jit
    def run(q, k, v, d_out, d_lse):
        if not return_lse:
            out, vjp = jax.vjp(lambda *a: flash_attention(*a, **kwargs), q, k, v)
            return (out, None, *vjp(d_out))
        (out, lse), vjp = jax.vjp(
            lambda *a: flash_attention(*a, return_lse=True, **kwargs), q, k, v)
        return (out, lse, *vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0))))

    return run(q, k, v, d_out, d_lse)


def check_attention(lowering: Lowering, name: str, *, batch=2, q_len=37, kv_len=37, heads=4,
                    kv_heads=2, head_dim=64, dtype=jnp.float32, default_tiles=False, **kwargs):
    """``out, lse, dq, dk, dv`` of ``lowering`` against the float32 reference on the same
    (rounded) inputs, within ``ATTENTION_TOL``; a query row that sees no key gets exactly zero
    ``out`` and ``dq``, and a key that no query sees exactly zero ``dk`` and ``dv``."""
    dtype = jnp.dtype(dtype)
    inputs = attention_inputs(name, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    options = dict(lowering.kwargs, implementation=lowering.name)
    if default_tiles:
        options.pop("tiles", None)
    return_lse = lowering.name != "cudnn"
    got = attention_fwd_bwd(*inputs, return_lse=return_lse, **options, **kwargs)
    f32 = [x.astype(jnp.float32) for x in inputs]
    # With the lse cotangent, for dead rows and unseen keys: without it a document of one token
    # has an exactly zero reference dk (a softmax over one key has no score gradient), where a
    # kernel's rounded ``rowsum(dO * O)`` leaves a tiny one, though its key is seen.
    with_lse = want = attention_fwd_bwd(*f32, implementation="xla", **kwargs)
    if not return_lse:  # the gradients without the lse cotangent
        want = want[:2] + attention_fwd_bwd(*f32, implementation="xla", return_lse=False,
                                            **kwargs)[2:]
    for field, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if g is None:
            continue
        assert g.dtype == (jnp.float32 if field == "lse" else dtype), (field, g.dtype)
        assert g.shape == w.shape, (field, g.shape, w.shape)
        assert_close(f"{name}/{field}", g, w, ATTENTION_TOL[dtype])
    out, _, dq, dk, dv = (np.asarray(x, np.float32) if x is not None else None for x in got)
    dead = np.isneginf(np.asarray(want[1])).transpose(0, 2, 1)  # (batch, q_len, heads)
    assert not out[dead].any() and not dq[dead].any(), "a row that sees no key"
    for field, g, w in (("dk", dk, with_lse[3]), ("dv", dv, with_lse[4])):
        unseen = ~np.asarray(w).any(axis=-1)  # (batch, kv_len, kv_heads)
        assert not g[unseen].any(), f"{field} of a key that no query sees"
    return got


def _segments(lengths_per_row):
    """Segment ids ``(batch, sum(lengths))`` with ids 0, 1, 2, ... of the given run lengths."""
    return jnp.array([np.repeat(np.arange(len(r)), r) for r in lengths_per_row], jnp.int32)


def _sorted_segments(seed, q_len, kv_len, dead_rows=0):
    """Random sorted ids in 0..2 for queries and keys; the first ``dead_rows`` queries get id 7,
    which no key has."""
    rng = np.random.default_rng(seed)
    q_seg = np.sort(rng.integers(0, 3, (1, q_len)), axis=1)
    q_seg[:, :dead_rows] = 7
    kv_seg = np.sort(rng.integers(0, 3, (1, kv_len)), axis=1)
    return dict(q_segment_ids=jnp.asarray(q_seg, jnp.int32),
                kv_segment_ids=jnp.asarray(kv_seg, jnp.int32))


# Packed documents that skip key / query blocks at 64-row tiles (CTAs of 128 rows): row 0 holds
# four, one of them shorter than a tile, runs crossing CTA edges; row 1 repeats an id apart
# (id 0 twice), which must see its other run, so that row takes every block.
_DOCUMENTS = jnp.array([np.repeat([0, 1, 2, 3], [70, 150, 5, 75]),
                        np.repeat([0, 1, 0], [100, 100, 100])], jnp.int32)
# One document per row (a training batch's ids) and a row whose middle document covers whole CTAs
# and blocks: those blocks skip the segment mask (``document_spans``' inner blocks).
_LONG_DOCUMENTS = jnp.array([np.full(300, 3), np.repeat([0, 1, 2], [40, 220, 40])], jnp.int32)
_SLOPES4 = jnp.array([0.5, 0.25, 0.125, 0.0625], jnp.float32)
_TPU_SEG = jnp.array([[1] * 10 + [2] * 15 + [3] * 9, [1] * 20 + [2] * 14], jnp.int32)
_F16, _BF16 = jnp.float16, jnp.bfloat16

# The shared cases: ``check_attention`` keyword arguments (shape, dtype, flash_attention
# options). Lengths are mostly not tile multiples, so padded edge blocks and the [masked |
# interior | masked] loop split are exercised; each lowering runs the cases listed with it.
ATTENTION_CASES = {
    "mha_noncausal": dict(heads=2, kv_heads=2, q_len=40, kv_len=40),
    "causal_gqa_segments": dict(causal=True, segment_ids=_segments([[10, 20, 7], [37]])),
    "window_softcap_mqa": dict(kv_heads=1, q_len=45, kv_len=45, causal=True, sliding_window=9,
                               logits_soft_cap=2.0),
    "decode_q_offset": dict(q_len=3, kv_len=45, q_offset=42, causal=True),
    "chunk_q_offset_window": dict(q_len=21, kv_len=45, q_offset=24, causal=True,
                                  sliding_window=20),
    "short_q_mqa_alibi": dict(q_len=24, kv_len=53, kv_heads=1, alibi_slopes=_SLOPES4),
    "long_q_causal_alibi_softcap": dict(q_len=53, kv_len=24, causal=True, alibi_slopes=_SLOPES4,
                                        logits_soft_cap=5.0),
    "head_dim_128_causal": dict(batch=1, q_len=20, kv_len=20, heads=2, kv_heads=1,
                                head_dim=128, causal=True),
    "head_dim_256": dict(batch=1, q_len=20, kv_len=20, heads=2, kv_heads=2, head_dim=256),
    "bfloat16_causal_gqa": dict(dtype=_BF16, causal=True),
    "float16_window": dict(dtype=_F16, heads=2, kv_heads=2, causal=True, sliding_window=12),
    # Batch 0: queries 10.. (segment 5) find no key of segment 5. Batch 1: only keys 0..19 are in
    # the queries' segment 1, so with a window of 4 queries 23.. see none of them.
    "dead_rows_segments_window": dict(
        q_segment_ids=jnp.array([[0] * 10 + [5] * 27, [1] * 37], jnp.int32),
        kv_segment_ids=jnp.array([[0] * 37, [1] * 20 + [2] * 17], jnp.int32),
        causal=True, sliding_window=4),
    "mha_ragged": dict(q_len=37, kv_len=30, heads=2, kv_heads=2),
    "causal_gqa_offset": dict(batch=1, q_len=29, kv_len=45, causal=True, q_offset=16),
    "decode_mqa": dict(batch=1, q_len=1, kv_len=43, kv_heads=1, causal=True, q_offset=42),
    "window_softcap_scale": dict(batch=1, q_len=40, kv_len=40, heads=2, kv_heads=1, causal=True,
                                 sliding_window=13, logits_soft_cap=2.5, scale=0.4),
    "alibi_head_dim_128_offset": dict(batch=1, q_len=21, kv_len=35, heads=2, kv_heads=2,
                                      head_dim=128, causal=True, q_offset=14,
                                      alibi_slopes=jnp.array([0.5, 0.125])),
    # Packed sequences; query segment 9 has no keys, so rows 28.. of batch 0 are dead.
    "causal_gqa_segments_alibi_dead_rows": dict(
        q_len=34, kv_len=34, heads=2, kv_heads=1, causal=True,
        q_segment_ids=_TPU_SEG.at[0, 28:].set(9), kv_segment_ids=_TPU_SEG,
        alibi_slopes=jnp.array([0.25, 2.0])),
    # Queries at positions 34..57, a window of 3 over 37 keys: rows 5.. see nothing, the second
    # 16-row query block sees no key block at all and key blocks 0-1 are seen by no query block.
    "window_beyond_the_keys": dict(batch=1, q_len=24, kv_len=37, heads=2, kv_heads=1,
                                   causal=True, sliding_window=3, q_offset=34),
    "bfloat16_causal_softcap": dict(batch=1, q_len=40, kv_len=40, heads=2, kv_heads=1,
                                    dtype=_BF16, causal=True, logits_soft_cap=5.0),
    "float16_head_dim_256_default_tiles": dict(batch=1, q_len=12, kv_len=20, heads=2,
                                               kv_heads=1, head_dim=256, dtype=_F16,
                                               default_tiles=True, causal=True, q_offset=8),
    # Segments (with rows that see nothing) and a decoding offset: cuDNN's explicit mask.
    "bfloat16_segments_q_offset": dict(
        batch=1, q_len=21, kv_len=45, dtype=_BF16, causal=True, q_offset=24,
        **_sorted_segments(5, 21, 45, dead_rows=3)),
    # The Mosaic GPU kernels in interpret mode: 64-row tiles, so several key blocks per CTA and
    # the pipeline wraps around its ring.
    "bfloat16_gqa_padded": dict(batch=1, q_len=100, kv_len=200, heads=2, kv_heads=1,
                                dtype=_BF16),
    # head_dim 128 (with SPLIT_DQ_MIN_LEN 0: the dK/dV kernel's consumers split dQ's columns).
    "bfloat16_head_dim_128_causal_gqa": dict(batch=1, q_len=130, kv_len=200, heads=2, kv_heads=1,
                                             head_dim=128, dtype=_BF16, causal=True,
                                             q_offset=70),
    "bfloat16_every_mask": dict(batch=1, q_len=100, kv_len=160, heads=2, kv_heads=1,
                                dtype=_BF16, causal=True, sliding_window=70, q_offset=30,
                                logits_soft_cap=5.0, **_sorted_segments(1, 100, 160, 5)),
    # ALiBi in the Mosaic kernels: the non-causal keys 0..191 and the causal rows' keys below
    # their CTA's first query are unmasked interior blocks, where ALiBi still applies.
    "bfloat16_alibi_gqa_segments": dict(batch=1, q_len=100, kv_len=200, heads=2, kv_heads=1,
                                        dtype=_BF16, alibi_slopes=jnp.array([0.08, 0.02]),
                                        **_sorted_segments(6, 100, 200, 3)),
    "bfloat16_causal_alibi_offset": dict(batch=1, q_len=100, kv_len=230, heads=2, kv_heads=1,
                                         dtype=_BF16, causal=True, q_offset=130,
                                         alibi_slopes=jnp.array([0.03, 0.1])),
    # head_dim 256 at the default tiles: a one-slot ring and dK/dV in two passes.
    "float16_head_dim_256_causal_gqa_alibi_segments": dict(
        batch=1, q_len=100, kv_len=100, heads=2, kv_heads=1, head_dim=256, dtype=_F16,
        default_tiles=True, causal=True, alibi_slopes=jnp.array([0.05, 0.2]),
        segment_ids=_segments([[40, 60]])),
    # Causal, equal lengths, no offset (cuDNN's built-in mask with an explicit segment mask):
    # queries 0..9 (id 1) have their segment's keys only in the future, so they see no key.
    "bfloat16_causal_future_segment": dict(
        batch=1, q_len=20, kv_len=20, heads=2, kv_heads=1, dtype=_BF16, causal=True,
        q_segment_ids=jnp.array([[1] * 10 + [2] * 10], jnp.int32),
        kv_segment_ids=jnp.array([[2] * 10 + [1] * 10], jnp.int32)),
    "bfloat16_head_dim_256_padded": dict(batch=1, q_len=70, kv_len=130, heads=1, kv_heads=1,
                                         head_dim=256, dtype=_BF16, default_tiles=True),
    "bfloat16_causal_documents": dict(batch=2, q_len=300, kv_len=300, heads=4, kv_heads=2,
                                      dtype=_BF16, causal=True, segment_ids=_DOCUMENTS),
    "bfloat16_documents": dict(batch=2, q_len=300, kv_len=300, heads=2, kv_heads=2, dtype=_BF16,
                               segment_ids=_DOCUMENTS),
    "bfloat16_causal_long_documents": dict(batch=2, q_len=300, kv_len=300, heads=2, kv_heads=1,
                                           dtype=_BF16, causal=True, segment_ids=_LONG_DOCUMENTS),
    "bfloat16_long_documents": dict(batch=2, q_len=300, kv_len=300, heads=2, kv_heads=2,
                                    dtype=_BF16, segment_ids=_LONG_DOCUMENTS),
    # Compiled Mosaic GPU kernels at their default tiles.
    "hopper_d128": dict(batch=1, q_len=256, kv_len=256, heads=2, kv_heads=2, head_dim=128,
                        dtype=_BF16),
    "hopper_d128_gqa_ragged": dict(batch=1, q_len=300, kv_len=333, heads=8, kv_heads=2,
                                   head_dim=128, dtype=_BF16),
    "hopper_d64_causal_mqa": dict(batch=1, q_len=333, kv_len=333, heads=4, kv_heads=1,
                                  dtype=_BF16, causal=True),
    "hopper_d128_window_offset": dict(batch=1, q_len=200, kv_len=300, heads=2, kv_heads=1,
                                      head_dim=128, dtype=_BF16, causal=True,
                                      sliding_window=70, q_offset=100),
    "hopper_d64_segments_softcap": dict(batch=1, q_len=256, kv_len=320, heads=2, kv_heads=2,
                                        dtype=_BF16, logits_soft_cap=30.0,
                                        **_sorted_segments(2, 256, 320, 17)),
    "hopper_f16_causal_segments": dict(batch=1, q_len=512, kv_len=512, heads=2, kv_heads=1,
                                       head_dim=128, dtype=_F16, causal=True,
                                       **_sorted_segments(3, 512, 512)),
    "hopper_d128_alibi_segments": dict(batch=1, q_len=300, kv_len=400, heads=4, kv_heads=2,
                                       head_dim=128, dtype=_BF16,
                                       alibi_slopes=jnp.array([0.5, 0.1, 0.03, 0.01]),
                                       **_sorted_segments(4, 300, 400, 9)),
    "hopper_d64_causal_alibi_window": dict(batch=1, q_len=333, kv_len=333, heads=2, kv_heads=1,
                                           dtype=_BF16, causal=True, sliding_window=150,
                                           alibi_slopes=jnp.array([0.2, 0.02])),
    "hopper_d256_causal_gqa_alibi": dict(batch=1, q_len=300, kv_len=300, heads=4, kv_heads=2,
                                         head_dim=256, dtype=_BF16, causal=True,
                                         alibi_slopes=jnp.array([0.25, 0.06, 0.015, 0.004])),
    "hopper_d128_causal_documents": dict(batch=2, q_len=1200, kv_len=1200, heads=4, kv_heads=2,
                                         head_dim=128, dtype=_BF16, causal=True,
                                         segment_ids=jnp.repeat(_DOCUMENTS, 4, axis=1)),
    "hopper_d128_causal_one_document": dict(batch=2, q_len=1024, kv_len=1024, heads=2,
                                            kv_heads=2, head_dim=128, dtype=_BF16, causal=True,
                                            segment_ids=jnp.ones((2, 1024), jnp.int32)),
    "hopper_d256_f16_offset_padded": dict(batch=1, q_len=200, kv_len=333, heads=2, kv_heads=2,
                                          head_dim=256, dtype=_F16, causal=True, q_offset=133),
}

_TRITON_CASES = (
    "mha_noncausal", "causal_gqa_segments", "window_softcap_mqa", "decode_q_offset",
    "chunk_q_offset_window", "short_q_mqa_alibi", "long_q_causal_alibi_softcap",
    "head_dim_128_causal", "head_dim_256", "bfloat16_causal_gqa", "float16_window",
    "dead_rows_segments_window", "bfloat16_causal_documents", "bfloat16_documents",
    "bfloat16_long_documents",
)
_HOPPER_CASES = tuple(name for name in ATTENTION_CASES if name.startswith("hopper_"))
_CUDNN_CASES = ("bfloat16_causal_gqa", "float16_window", "bfloat16_segments_q_offset",
                "bfloat16_gqa_padded", "bfloat16_causal_future_segment")


def _cudnn_as_xla(monkeypatch):
    """cuDNN's path on CPU: jax's XLA attention stands in for cuDNN, and the dispatch sees a GPU
    target (the test runs no other GPU implementation)."""
    original = jax.nn.dot_product_attention

    def xla_instead(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    monkeypatch.setattr(_api, "target_platform", lambda: "gpu")


# 16-wide tiles keep interpret mode cheap and make short sequences span several blocks.
TRITON = Lowering("triton", "triton", dict(
    interpret=True, tiles=triton.Tiles(*[triton.KernelTiles(16, 16, 4, 2)] * 3)), _TRITON_CASES)
TPU = Lowering("tpu", "tpu", dict(interpret=True, tiles=tpu.Tiles(16, 16, 16, 16)), (
    "mha_ragged", "causal_gqa_offset", "decode_mqa", "window_softcap_scale",
    "alibi_head_dim_128_offset", "causal_gqa_segments_alibi_dead_rows", "window_beyond_the_keys",
    "bfloat16_causal_softcap", "float16_head_dim_256_default_tiles",
))


def walk_all_blocks(monkeypatch):
    """The GPU kernels' document spans off (``common.SKIP_DOCUMENTS``, on by default): packed
    rows walk every block, masking the other documents' keys."""
    monkeypatch.setattr(fa_common, "SKIP_DOCUMENTS", False)


MOSAIC_GPU = Lowering("mosaic_gpu", "mosaic_gpu", dict(interpret=True, tiles=mosaic_gpu.Tiles(
    *(mosaic_gpu.KernelTiles(64, 64, stages) for stages in (3, 2, 2)))),
    ("bfloat16_gqa_padded", "bfloat16_head_dim_128_causal_gqa", "bfloat16_every_mask",
     "bfloat16_alibi_gqa_segments",
     "bfloat16_causal_alibi_offset", "float16_head_dim_256_causal_gqa_alibi_segments",
     "bfloat16_head_dim_256_padded", "bfloat16_causal_future_segment",
     "bfloat16_causal_documents", "bfloat16_documents", "bfloat16_causal_long_documents",
     "bfloat16_long_documents"))
# Cases with segment ids, with the document spans off (the lowerings above run them on).
MOSAIC_GPU_ALL_BLOCKS = dataclasses.replace(
    MOSAIC_GPU, label="mosaic_gpu_all_blocks",
    cases=("bfloat16_causal_documents", "float16_head_dim_256_causal_gqa_alibi_segments"),
    setup=walk_all_blocks)
# The dQ kernel at head_dim 64 (``DQ_IN_DKV`` off; head_dim 128's short rows and head_dim 256's
# cases above take it by default).
MOSAIC_GPU_DQ_KERNEL = dataclasses.replace(
    MOSAIC_GPU, label="mosaic_gpu_dq_kernel",
    cases=("bfloat16_every_mask", "bfloat16_causal_long_documents"),
    setup=lambda monkeypatch: monkeypatch.setattr(mosaic_gpu, "DQ_IN_DKV", False))


def split_dq_at_any_length(monkeypatch):
    """dQ inside the dK/dV kernel with split columns (head_dim 128) however short the keys."""
    monkeypatch.setattr(mosaic_gpu, "SPLIT_DQ_MIN_LEN", 0)


MOSAIC_GPU_SPLIT_DQ = dataclasses.replace(
    MOSAIC_GPU, label="mosaic_gpu_split_dq", cases=("bfloat16_head_dim_128_causal_gqa",),
    setup=split_dq_at_any_length)
TRITON_ALL_BLOCKS = dataclasses.replace(
    TRITON, label="triton_all_blocks",
    cases=("bfloat16_documents", "causal_gqa_segments"), setup=walk_all_blocks)
# cuDNN's masks, checked on CPU through jax's XLA attention (which has no float16 there).
CUDNN_AS_XLA = Lowering("cudnn_as_xla", "cudnn", {},
                        tuple(c for c in _CUDNN_CASES if not c.startswith("float16")),
                        setup=_cudnn_as_xla)
ATTENTION_LOWERINGS = (
    TRITON, TRITON_ALL_BLOCKS, TPU, MOSAIC_GPU, MOSAIC_GPU_ALL_BLOCKS, MOSAIC_GPU_DQ_KERNEL,
    MOSAIC_GPU_SPLIT_DQ, CUDNN_AS_XLA,
    Lowering("triton_compiled", "triton", {}, _TRITON_CASES, (NEEDS_GPU,)),
    Lowering("mosaic_gpu_compiled", "mosaic_gpu", {}, _HOPPER_CASES, (NEEDS_HOPPER,)),
    Lowering("mosaic_gpu_split_dq_compiled", "mosaic_gpu", {}, (
        "hopper_d128_gqa_ragged", "hopper_d128_window_offset", "hopper_d128_alibi_segments",
        "hopper_d128_causal_documents"), (NEEDS_HOPPER,), setup=split_dq_at_any_length),
    Lowering("cudnn", "cudnn", {}, _CUDNN_CASES, (NEEDS_GPU,)),
)
