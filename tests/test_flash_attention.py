"""flash_attention: the Triton kernels (interpret mode on CPU) against the float32 reference.

Every case checks ``out``, ``lse`` and ``dq, dk, dv`` (with a random cotangent on both ``out`` and
``lse``) on fresh random inputs whose lengths are not multiples of the 16-wide test tiles, so the
padded edge blocks and the [masked | interior | masked] loop split are always exercised.

Tolerances are relative to the largest reference magnitude: 1e-5 for float32 inputs (the kernels
then use exact float32 products), 2e-2 for bfloat16 and 4e-3 for float16 (P and dS are rounded to
the input dtype before their matmuls, as on the GPU).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import BlockSizes, flash_attention

pytestmark = pytest.mark.usefixtures("fast_compile")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
# 16-wide tiles keep interpret mode cheap and make short sequences span several blocks.
SMALL_TILES = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _inputs(name, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 5)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
    d_lse = jax.random.normal(keys[4], (batch, heads, q_len), jnp.float32)
    return q, k, v, d_out, d_lse


def _forward_backward(implementation, q, k, v, d_out, d_lse, **kwargs):
    """``(out, lse, dq, dk, dv)`` with cotangents on both outputs (none on rows with lse=-inf)."""
    if implementation != "xla":
        kwargs = dict(kwargs, interpret=True, block_sizes=SMALL_TILES)

    def attend(q, k, v):
        return flash_attention(
            q, k, v, return_lse=True, implementation=implementation, **kwargs
        )

    @jax.jit
    def run(q, k, v, d_out, d_lse):
        (out, lse), vjp = jax.vjp(attend, q, k, v)
        return (out, lse, *vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0))))

    return run(q, k, v, d_out, d_lse)


def _assert_close(name, got, want, tol):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{name}: inf pattern")
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{name}: inf values")
    scale = max(float(np.abs(want[finite]).max(initial=0.0)), 1e-6)
    np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol * scale, err_msg=name)


def _check(name, *, batch=2, q_len=37, kv_len=37, heads=4, kv_heads=2, head_dim=64,
           dtype=jnp.float32, **kwargs):
    inputs = _inputs(name, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    got = _forward_backward("triton", *inputs, **kwargs)
    want = _forward_backward("xla", *inputs, **kwargs)
    for field, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype, (field, g.dtype, w.dtype)
        _assert_close(f"{name}/{field}", g, w, TOL[dtype])
    return got


def _segments(lengths_per_row):
    """Segment ids ``(batch, sum(lengths))`` with ids 0, 1, 2, ... of the given run lengths."""
    return jnp.array([np.repeat(np.arange(len(r)), r) for r in lengths_per_row], jnp.int32)


SLOPES4 = jnp.array([0.5, 0.25, 0.125, 0.0625], jnp.float32)

CASES = {
    "mha_noncausal": dict(heads=2, kv_heads=2, q_len=40, kv_len=40),
    "causal_gqa_segments": dict(causal=True, segment_ids=_segments([[10, 20, 7], [37]])),
    "window_softcap_mqa": dict(
        kv_heads=1, q_len=45, kv_len=45, causal=True, sliding_window=9, logits_soft_cap=2.0
    ),
    "decode_q_offset": dict(q_len=3, kv_len=45, q_offset=42, causal=True),
    "chunk_q_offset_window": dict(q_len=21, kv_len=45, q_offset=24, causal=True, sliding_window=20),
    "short_q_mqa_alibi": dict(q_len=24, kv_len=53, kv_heads=1, alibi_slopes=SLOPES4),
    "long_q_causal_alibi_softcap": dict(
        q_len=53, kv_len=24, causal=True, alibi_slopes=SLOPES4, logits_soft_cap=5.0
    ),
    "head_dim_128_causal": dict(batch=1, q_len=20, kv_len=20, heads=2, kv_heads=1, head_dim=128,
                                causal=True),
    "head_dim_256": dict(batch=1, q_len=20, kv_len=20, heads=2, kv_heads=2, head_dim=256),
    "bfloat16_causal_gqa": dict(dtype=jnp.bfloat16, causal=True),
    "float16_window": dict(dtype=jnp.float16, heads=2, kv_heads=2, causal=True, sliding_window=12),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name):
    _check(name, **CASES[name])


def test_rows_that_see_no_key_give_zeros_and_zero_grads():
    # Batch 0: queries 10.. (segment 5) find no key of segment 5. Batch 1: only keys 0..19 are in
    # the queries' segment 1, so with a window of 4 queries 23.. see none of them.
    q_seg = jnp.array([[0] * 10 + [5] * 27, [1] * 37], jnp.int32)
    kv_seg = jnp.array([[0] * 37, [1] * 20 + [2] * 17], jnp.int32)
    out, lse, dq, _, _ = _check(
        "dead_rows", q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=True, sliding_window=4
    )
    dead = np.zeros((2, 37), bool)
    dead[0, 10:] = True
    dead[1, 23:] = True
    out, lse, dq = (np.asarray(x) for x in (out, lse, dq))
    assert (out[dead] == 0).all() and np.isfinite(out).all()
    assert (dq[dead] == 0).all() and np.isfinite(dq).all()
    assert np.isneginf(lse.transpose(0, 2, 1)[dead]).all()
    assert np.isfinite(lse.transpose(0, 2, 1)[~dead]).all()
