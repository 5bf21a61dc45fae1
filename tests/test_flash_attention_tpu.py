"""The Pallas TPU flash-attention kernels in TPU interpret mode on CPU, against the reference.

Shapes are tiny and block sizes small so that every case still crosses several query and key
blocks (lengths are deliberately not block multiples) while staying fast in the interpreter.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import AttentionSpec, BlockSizes, flash_attention, tpu

BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
F32_TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    d_out = jax.random.normal(kd, q.shape, jnp.float32).astype(dtype)
    return q, k, v, d_out


def _run(implementation, q, k, v, d_out, blocks=BLOCKS, **kwargs):
    """``(out, lse, dq, dk, dv)`` with the cotangent ``d_out`` on ``out``."""
    extra = {"interpret": True, "block_sizes": blocks} if implementation == "tpu" else {}

    def f(q, k, v):
        return flash_attention(
            q, k, v, return_lse=True, implementation=implementation, **extra, **kwargs
        )

    @jax.jit
    def run(q, k, v, d_out):
        (out, lse), vjp = jax.vjp(f, q, k, v)
        return (out, lse, *vjp((d_out, jnp.zeros_like(lse))))

    return run(q, k, v, d_out)


def _check(q, k, v, d_out, tol=F32_TOL, blocks=BLOCKS, **kwargs):
    got = _run("tpu", q, k, v, d_out, blocks, **kwargs)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    want = _run("xla", *f32, **kwargs)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.dtype == (jnp.float32 if name == "lse" else q.dtype), name
        assert g.shape == w.shape, name
        np.testing.assert_allclose(
            np.asarray(g.astype(jnp.float32)), np.asarray(w), err_msg=name, **tol
        )
    return got


@pytest.mark.parametrize(
    "case",
    [
        # name: (batch, q_len, kv_len, heads, kv_heads, head_dim), flash_attention kwargs
        ("mha", (2, 37, 30, 2, 2, 64), {}),
        ("causal_gqa_offset", (1, 29, 45, 4, 2, 64), dict(causal=True, q_offset=16)),
        ("decode_mqa", (1, 1, 43, 4, 1, 64), dict(causal=True, q_offset=42)),
        ("window_softcap", (1, 40, 40, 2, 1, 64),
         dict(causal=True, sliding_window=13, logits_soft_cap=2.5, scale=0.4)),
        ("alibi_head_dim_128", (1, 21, 35, 2, 2, 128),
         dict(causal=True, q_offset=14, alibi_slopes=jnp.array([0.5, 0.125]))),
    ],
    ids=lambda c: c[0],
)
def test_matches_reference(case):
    name, dims, kwargs = case
    q, k, v, d_out = _inputs(zlib.crc32(name.encode()), *dims, jnp.float32)
    _check(q, k, v, d_out, **kwargs)


def _assert_dead(out, lse, dq, rows):
    """Rows that see no key: exactly zero output and dq, lse = -inf."""
    b, i = rows
    assert np.all(np.asarray(out[b, i]) == 0)
    assert np.all(np.isneginf(np.asarray(lse[b, :, i])))
    assert np.all(np.asarray(dq[b, i]) == 0)


def test_causal_gqa_segment_ids_with_dead_rows():
    """Packed sequences; query segment 9 has no keys, so its rows are dead."""
    q, k, v, d_out = _inputs(1, 2, 34, 34, 2, 1, 64, jnp.float32)
    seg = jnp.array([[1] * 10 + [2] * 15 + [3] * 9, [1] * 20 + [2] * 14], jnp.int32)
    q_seg = seg.at[0, 28:].set(9)
    out, lse, dq, _, _ = _check(
        q, k, v, d_out, causal=True, q_segment_ids=q_seg, kv_segment_ids=seg,
        alibi_slopes=jnp.array([0.25, 2.0]),
    )
    _assert_dead(out, lse, dq, (0, slice(28, None)))
    assert np.all(np.isfinite(np.asarray(lse[1])))


def test_window_beyond_the_keys():
    """Queries at positions 34..57 with a window of 3 over 37 keys: rows 5.. see nothing, the second
    query block sees no key block at all and key blocks 0-1 are seen by no query block."""
    q, k, v, d_out = _inputs(2, 1, 24, 37, 2, 1, 64, jnp.float32)
    out, lse, dq, dk, dv = _check(q, k, v, d_out, causal=True, sliding_window=3, q_offset=34)
    _assert_dead(out, lse, dq, (0, slice(5, None)))
    assert np.all(np.asarray(dk[0, :32]) == 0) and np.all(np.asarray(dv[0, :32]) == 0)


def test_bfloat16():
    q, k, v, d_out = _inputs(4, 1, 40, 40, 2, 1, 64, jnp.bfloat16)
    tol = 8 * float(jnp.finfo(jnp.bfloat16).eps)
    _check(q, k, v, d_out, tol=dict(atol=tol, rtol=tol), causal=True, logits_soft_cap=5.0)


def test_float16_head_dim_256_default_blocks():
    q, k, v, d_out = _inputs(3, 1, 12, 20, 2, 1, 256, jnp.float16)
    tol = 4 * float(jnp.finfo(jnp.float16).eps)
    _check(q, k, v, d_out, tol=dict(atol=tol, rtol=tol), blocks=None, causal=True, q_offset=8)


def test_vmap_and_lse_cotangent():
    """Gradients through both outputs of a vmapped call (vmap adds a grid axis to the kernels)."""
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    q = jax.random.normal(keys[0], (2, 1, 24, 2, 64))
    k, v = (jax.random.normal(key, (2, 1, 24, 1, 64)) for key in keys[1:3])
    w = jax.random.normal(keys[3], q.shape)

    def loss(implementation, q, k, v):
        extra = {"interpret": True, "block_sizes": BLOCKS} if implementation == "tpu" else {}
        attend = functools.partial(
            flash_attention, causal=True, return_lse=True, implementation=implementation, **extra
        )
        out, lse = jax.vmap(attend)(q, k, v)
        return jnp.sum(out * w) + jnp.sum(jnp.sin(lse))

    got = jax.jit(jax.grad(functools.partial(loss, "tpu"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=name, **F32_TOL)


def test_lowers_to_mosaic_for_tpu():
    """Interpret mode skips the Mosaic lowering; export for a TPU target (no TPU needed) runs it,
    with every feature on, bfloat16, default blocks, ragged lengths and vmap."""
    spec = AttentionSpec(
        causal=True, sliding_window=100, logits_soft_cap=30.0, scale=0.125, q_offset=400,
        has_segment_ids=True, has_alibi=True,
    )
    sds = jax.ShapeDtypeStruct

    def fwd_bwd(q, k, v, q_seg, kv_seg, slopes):
        kw = dict(spec=spec, block_sizes=BlockSizes(), interpret=False)
        out, lse = tpu.forward(q, k, v, q_seg, kv_seg, slopes, **kw)
        return tpu.backward(q, k, v, q_seg, kv_seg, slopes, out, lse, out, **kw)

    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        # ALiBi slopes are per-model constants, so they are not batched.
        batched = jax.vmap(fwd_bwd, in_axes=(0, 0, 0, 0, 0, None))
        exported = jax.export.export(jax.jit(batched), platforms=["tpu"])(
            sds((2, 1, 300, 4, 64), jnp.bfloat16),
            sds((2, 1, 700, 2, 64), jnp.bfloat16),
            sds((2, 1, 700, 2, 64), jnp.bfloat16),
            sds((2, 1, 300), jnp.int32),
            sds((2, 1, 700), jnp.int32),
            sds((4,), jnp.float32),
        )
    assert exported.mlir_module().count("tpu_custom_call") == 3


def test_rejects_misaligned_block_sizes():
    q, k, v, _ = _inputs(6, 1, 16, 16, 1, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="block_k to be a positive multiple of 8"):
        flash_attention(q, k, v, implementation="tpu", interpret=True,
                        block_sizes=BlockSizes(block_k=12))
