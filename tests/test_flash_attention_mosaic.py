"""Mosaic-GPU flash attention (pallas_kernels.flash_attention.mosaic_gpu).

The kernels run on CPU under Mosaic GPU interpret mode: three simulated warpgroups, real barriers
and TMA copies, with the tile products taken by XLA (the interpreter has no wgmma with a register
operand). Each case checks forward and gradients against the float32 reference on fresh random
inputs; on a Hopper GPU the same checks run the compiled kernels (skipped elsewhere). The
interpreter runs the warpgroups on XLA's host thread pool, which needs the 8 fake CPU
devices that tests/conftest.py sets up (with the 2 threads of a 2-core machine the warpgroups can
starve each other).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import mosaic_gpu, reference
from pallas_kernels.flash_attention.common import AttentionSpec, BlockSizes

# Small tiles keep several key blocks per CTA (so the pipeline wraps around its ring) at tiny
# sequence lengths.
_BLOCKS = BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def _run(seed, *, lq, lk, heads, kv_heads, head_dim, dtype=jnp.bfloat16, segments=False,
         dead_rows=0, interpret=True, blocks=_BLOCKS, **spec_kw):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (1, lq, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (1, lk, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (1, lk, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (1, lq, heads, head_dim), jnp.float32).astype(dtype)
    q_seg = kv_seg = None
    if segments:
        q_seg = jnp.sort(jax.random.randint(keys[4], (1, lq), 0, 3), axis=1)
        kv_seg = jnp.sort(jax.random.randint(keys[5], (1, lk), 0, 3), axis=1)
        q_seg = q_seg.at[:, :dead_rows].set(7)  # segment 7 has no keys: these rows see nothing
    spec = AttentionSpec(scale=head_dim**-0.5, has_segment_ids=segments, **spec_kw)
    assert mosaic_gpu.supports(q.shape, k.shape, dtype, spec, blocks) is None

    kw = dict(spec=spec, block_sizes=blocks, interpret=interpret)
    out, lse = mosaic_gpu.forward(q, k, v, q_seg, kv_seg, None, **kw)
    dq, dk, dv = mosaic_gpu.backward(q, k, v, q_seg, kv_seg, None, out, lse, do, **kw)

    def ref(q, k, v):
        return reference.attention(q, k, v, q_seg, kv_seg, None, spec=spec)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (r_out, r_lse), vjp = jax.vjp(ref, *f32)
    r_dq, r_dk, r_dv = vjp((do.astype(jnp.float32), jnp.zeros_like(r_lse)))

    # bf16 operands with float32 accumulation: relative L2 error well under 1e-2.
    tol = 1e-2
    assert _rel(out, r_out) < tol
    assert _rel(dq, r_dq) < tol
    assert _rel(dk, r_dk) < tol
    assert _rel(dv, r_dv) < tol
    visible = np.isfinite(np.asarray(r_lse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), ~visible)
    np.testing.assert_allclose(np.asarray(lse)[visible], np.asarray(r_lse)[visible], atol=1e-3)
    if dead_rows:
        assert not np.any(np.asarray(out[:, :dead_rows], np.float32))
        assert not np.any(np.asarray(dq[:, :dead_rows], np.float32))


def test_gqa_padded_lengths():
    """Non-causal GQA (2 query heads per kv head), lengths that are not multiples of the tiles."""
    _run(0, lq=100, lk=200, heads=2, kv_heads=1, head_dim=64)


def test_causal_window_offset_segments_soft_cap():
    """Every mask at once: causal band with a window, queries offset into the keys, packed
    segments with rows that see no key, and soft-capped logits."""
    _run(1, lq=100, lk=160, heads=2, kv_heads=1, head_dim=64, causal=True, sliding_window=70,
         q_offset=30, segments=True, dead_rows=5, logits_soft_cap=5.0)


@pytest.mark.skipif(not _on_hopper(), reason="compiled Mosaic GPU kernels need a Hopper GPU")
@pytest.mark.parametrize(
    "case",
    [
        dict(lq=256, lk=256, heads=2, kv_heads=2, head_dim=128),
        dict(lq=300, lk=333, heads=8, kv_heads=2, head_dim=128),
        dict(lq=333, lk=333, heads=4, kv_heads=1, head_dim=64, causal=True),
        dict(lq=200, lk=300, heads=2, kv_heads=1, head_dim=128, causal=True, sliding_window=70,
             q_offset=100),
        dict(lq=256, lk=320, heads=2, kv_heads=2, head_dim=64, segments=True, dead_rows=17,
             logits_soft_cap=30.0),
        dict(lq=512, lk=512, heads=2, kv_heads=1, head_dim=128, dtype=jnp.float16, causal=True,
             segments=True),
    ],
)
def test_compiled_on_hopper(case):
    """The compiled kernels with their default tiles (wgmma, TMA, warp specialisation)."""
    _run(2, interpret=False, blocks=BlockSizes(), **case)


@pytest.mark.parametrize(
    ("head_dim", "dtype", "spec_kw", "reason"),
    [
        (256, jnp.bfloat16, {}, "head_dim must be one of"),
        (128, jnp.float32, {}, "dtype must be bfloat16 or float16"),
        (128, jnp.bfloat16, {"has_alibi": True}, "ALiBi"),
    ],
)
def test_supports_reasons(head_dim, dtype, spec_kw, reason):
    spec = AttentionSpec(scale=1.0, **spec_kw)
    why = mosaic_gpu.supports((1, 128, 2, head_dim), (1, 128, 2, head_dim), dtype, spec, BlockSizes())
    assert why is not None and reason in why


def test_supports_block_sizes():
    spec = AttentionSpec(scale=1.0)
    shape = (1, 128, 2, 128)
    assert mosaic_gpu.supports(shape, shape, jnp.bfloat16, spec, BlockSizes()) is None
    assert "multiple of 64" in mosaic_gpu.supports(
        shape, shape, jnp.bfloat16, spec, BlockSizes(block_k=96))
    assert "shared memory" in mosaic_gpu.supports(
        shape, shape, jnp.bfloat16, spec, BlockSizes(block_k=256, block_q=256))



def _kernel_modules(layers: int) -> int:
    """How many Mosaic GPU kernel modules the lowering of ``layers`` chained forward + backward
    calls holds (lowered for a CUDA device: no GPU needed)."""
    spec = AttentionSpec(scale=0.125, causal=True)
    kw = dict(spec=spec, block_sizes=BlockSizes(), interpret=False)

    def model(q, k, v, do):
        for _ in range(layers):
            out, lse = mosaic_gpu.forward(q, k, v, None, None, None, **kw)
            dq, dk, dv = mosaic_gpu.backward(q, k, v, None, None, None, out, lse, do, **kw)
            q, k, v = out + dq, k + dk, v + dv
        return q, k, v

    x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    text = jax.jit(model).trace(x, x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("kernel_hash")


def test_layers_share_kernel_builds():
    """Identical calls (one per layer) share one lowering and one kernel build: the forward, dK/dV
    and dQ kernels appear once however many layers call them, so compile time does not grow
    with depth."""
    assert _kernel_modules(2) == _kernel_modules(4) == 3
