"""flash_attention with T5's relative position bias (``RelativeBias``): the bucket edges against
T5's float32 log formula, the Triton kernels in interpret mode against the float32 reference
(forward, dq, dk, dv and the table's gradient, within 1e-5 relative to the largest reference
magnitude for float32 inputs, 2e-2 for bfloat16), what each lowering says about the bias,
argument errors, and the compiled modules for an H100 (lowered and verified on this host)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import (TRITON, assert_close, attention_inputs, t5_relative_bucket,
                           verified_triton_modules)

from pallas_kernels import lowering_for
from pallas_kernels.flash_attention import RelativeBias, RelativeBuckets, flash_attention
from pallas_kernels.flash_attention.api import DISPATCH
from pallas_kernels.flash_attention.common import AttentionSpec, Call

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("num_buckets, max_distance",
                         [(32, 128), (8, 12), (8, 20), (10, 6), (64, 1000)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_the_t5_formula(num_buckets, max_distance, bidirectional):
    rel = np.arange(-3 * max_distance, 3 * max_distance)
    rb = RelativeBuckets(num_buckets, bidirectional, max_distance)
    got = np.asarray(rb.bucket(jnp.asarray(rel)))
    np.testing.assert_array_equal(
        got, t5_relative_bucket(rel, bidirectional, num_buckets, max_distance))
    assert got.min() == 0 and got.max() == num_buckets - 1


def test_buckets_reject_too_few_or_too_short():
    with pytest.raises(ValueError, match="num_buckets"):
        RelativeBuckets(2, True, 8)
    with pytest.raises(ValueError, match="max_distance"):
        RelativeBuckets(32, True, 8)  # 8 exact buckets per direction reach 8 already


def _packed_positions(batch, length, seed):
    """Segment ids from 1 (random run lengths, the same per row here only by chance) and
    positions restarting at 0 in each segment."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=2, replace=False))
        for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length])):
            seg[b, lo:hi] = s + 1
            pos[b, lo:hi] = np.arange(hi - lo)
    return jnp.asarray(seg), jnp.asarray(pos)


# (q_len, kv_len, heads, kv_heads, causal, packed, num_buckets, max_distance, dtype): a length
# that is no multiple of the 16-wide tile, GQA (the dK/dV kernel reads a group's table rows),
# causal unidirectional buckets, cross lengths with their own positions, offsets beyond
# max_distance, bfloat16 inputs (T5's) against the reference on the same rounded inputs.
F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
CASES = {
    "bidirectional_packed_gqa": (37, 37, 4, 2, False, True, 8, 12, F32),
    "causal_packed": (40, 40, 3, 3, True, True, 6, 9, F32),
    "cross_lengths": (21, 45, 2, 1, False, False, 10, 30, F32),
    "bfloat16_t5_buckets": (48, 48, 2, 2, False, True, 32, 128, BF16),
}
TOL = {F32: 1e-5, BF16: 2e-2}


def _run(case, dtype, **options):
    q_len, kv_len, heads, kv_heads, causal, packed, num_buckets, max_distance, _ = CASES[case]
    batch = 2
    q, k, v, d_out, d_lse = attention_inputs(case, batch, q_len, kv_len, heads, kv_heads, 16,
                                             CASES[case][-1])
    q, k, v, d_out = (x.astype(dtype) for x in (q, k, v, d_out))
    table = jax.random.normal(jax.random.key(len(case)), (num_buckets, heads), jnp.float32)
    kwargs = dict(causal=causal, scale=1.0)
    if packed:
        seg, pos = _packed_positions(batch, q_len, len(case))
        kwargs["segment_ids"] = seg
        q_pos = kv_pos = pos
    else:
        q_pos = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
        kv_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len)) - 7

    @jax.jit
    def run(q, k, v, table):
        def f(q, k, v, table):
            rb = RelativeBias(table, q_pos, kv_pos, not causal, max_distance)
            return flash_attention(q, k, v, relative_bias=rb, return_lse=True, **kwargs,
                                   **options)

        (out, lse), vjp = jax.vjp(f, q, k, v, table)
        return (out, lse, *vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0))))

    return run(q, k, v, table)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_the_reference(case):
    """Cotangents on out and lse, so the table's gradient also goes through the lse path."""
    dtype = CASES[case][-1]
    got = _run(case, dtype, **TRITON.kwargs, implementation="triton")
    want = _run(case, F32, implementation="xla")
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dtable"), got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert g.dtype == (dtype if name in ("out", "dq", "dk", "dv") else F32), (name, g.dtype)
        assert_close(f"{case}/{name}", g, w, TOL[dtype])
    assert float(jnp.abs(want[-1]).max()) > 0.1  # the table's gradient is not trivially zero


def test_the_bias_changes_the_output():
    """Guards the reference: a bias of all zeros equals no bias, a random one does not."""
    q, k, v, *_ = attention_inputs("bias", 1, 20, 20, 2, 2, 16, jnp.float32)
    pos = jnp.arange(20, dtype=jnp.int32)[None]
    plain = flash_attention(q, k, v, implementation="xla")
    zeros = flash_attention(q, k, v, implementation="xla",
                            relative_bias=RelativeBias(jnp.zeros((8, 2)), pos, pos, True, 16))
    table = jax.random.normal(jax.random.key(0), (8, 2))
    biased = flash_attention(q, k, v, implementation="xla",
                             relative_bias=RelativeBias(table, pos, pos, True, 16))
    np.testing.assert_allclose(zeros, plain, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(biased - plain).max()) > 0.1


def test_only_triton_takes_the_bias():
    """On an H100 "auto" skips the Mosaic GPU kernels for Triton; TPU and cuDNN decline too."""
    spec = AttentionSpec(relative=RelativeBuckets(32, True, 128), scale=1.0)
    call = Call((2, 128, 4, 64), (2, 128, 4, 64), jnp.dtype(jnp.bfloat16), spec)
    with lowering_for("NVIDIA H100"):
        assert DISPATCH.choose("auto", call, interpret=False)[0] == "triton"
        for name in ("mosaic_gpu", "cudnn"):
            with pytest.raises(ValueError, match="relative position bias"):
                DISPATCH.choose(name, call, interpret=False)
    with lowering_for("TPU v5 lite", "tpu"):
        assert DISPATCH.choose("auto", call, interpret=False)[0] == "xla"


@pytest.mark.parametrize("bad, match", [
    (lambda t, p: (t[:, :1], p, p), r"table must be a float array \(num_buckets, heads=2\)"),
    (lambda t, p: (t.astype(jnp.int32), p, p), "table must be a float array"),
    (lambda t, p: (t, p.astype(jnp.float32), p), "q_positions must be integers"),
    (lambda t, p: (t, p, p[:, :5]), r"kv_positions must be integers of shape \(batch, kv_len\)"),
])
def test_bad_arguments_are_named(bad, match):
    q = jnp.zeros((1, 8, 2, 16))
    table, pos = jnp.zeros((8, 2)), jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, q, q, relative_bias=RelativeBias(*bad(table, pos)))


def test_bad_buckets_and_type_are_named():
    q = jnp.zeros((1, 8, 2, 16))
    table, pos = jnp.zeros((8, 2)), jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="max_distance"):  # 2 exact buckets per direction
        flash_attention(q, q, q, relative_bias=RelativeBias(table, pos, pos, True, 2))
    with pytest.raises(ValueError, match="max_distance must be a static int"):
        flash_attention(q, q, q, relative_bias=RelativeBias(table, pos, pos, True, 9.0))
    with pytest.raises(ValueError, match="must be a RelativeBias"):
        flash_attention(q, q, q, relative_bias=(table, pos, pos))


@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernels_lower_to_modules_the_gpu_accepts(causal):
    """Forward, dK/dV and dQ with the bias, segment ids and the lse cotangent, lowered for an
    H100 with its default tiles (T5's 12 heads and 32 buckets)."""
    q = jnp.zeros((2, 200, 12, 64), jnp.bfloat16)
    pos = jnp.zeros((2, 200), jnp.int32)

    def fwd_bwd(q, table):
        def f(q, table):
            rb = RelativeBias(table, pos, pos, not causal, 128)
            return flash_attention(q, q, q, causal=causal, segment_ids=pos, relative_bias=rb,
                                   scale=1.0, implementation="triton", return_lse=True)

        out, vjp = jax.vjp(f, q, table)
        return vjp(out)

    with verified_triton_modules() as checked, lowering_for("NVIDIA H100 80GB HBM3"):
        jax.jit(fwd_bwd).trace(q, jnp.zeros((32, 12))).lower(lowering_platforms=("cuda",))
    assert checked[0] == 5  # forward, then dK/dV and dQ for dO and for the lse cotangent
