"""flash_attention's implementations against its float32 reference, on the shared cases.

Every case checks ``out``, ``lse`` and ``dq, dk, dv`` (random cotangents on ``out`` and ``lse``) on
fresh random inputs, per ``kernel_checks.check_attention``. On CPU the Pallas lowerings run in
interpret mode (Mosaic GPU's with three simulated warpgroups, real barriers and TMA copies, the
tile products taken by XLA; its warpgroups run on XLA's host thread pool, which needs the 8 fake
CPU devices of tests/conftest.py) and cuDNN's masking runs through jax's XLA attention; with a
GPU the compiled lowerings run too.
"""

from __future__ import annotations

import re

import pytest
from kernel_checks import ATTENTION_CASES, ATTENTION_LOWERINGS, check_attention

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize(
    "lowering, case", [param for lowering in ATTENTION_LOWERINGS for param in lowering.params()])
def test_matches_reference(lowering, case, monkeypatch):
    if lowering.setup is not None:
        lowering.setup(monkeypatch)
    check_attention(lowering, case, **ATTENTION_CASES[case])


def _spans_by_loop(q_seg, kv_seg, ctas, rows, block, num_blocks):
    """``document_spans`` from every (query, key) pair of each CTA: the first and last block
    holding a key that shares a query's id (every block where a row's ids are not one run each
    or differ between the sides), and the blocks whose every key has the id of all the CTA's
    rows."""
    out = []
    for q_row, kv_row in zip(q_seg.tolist(), kv_seg.tolist()):
        runs = [i for t, i in enumerate(q_row) if t == 0 or i != q_row[t - 1]]
        whole = len(runs) != len(set(runs)) or q_row != kv_row
        for c in range(ctas):
            first = min(c * rows, len(q_row) - 1)
            ids = set(q_row[first:first + rows])
            seen = [t for t, i in enumerate(kv_row) if i in ids]
            inner = [] if whole or len(ids) > 1 else [
                b for b in range(num_blocks) if set(range(b * block, (b + 1) * block)) <= set(seen)]
            out.append(([0, num_blocks] if whole else [seen[0] // block, seen[-1] // block + 1],
                        inner))
    return out


def test_document_spans_match_a_loop():
    """The block ranges the Mosaic GPU kernels narrow their loops to, and the blocks inside one
    document that need no segment mask, on fresh random packed rows (documents of 1-90 tokens, a
    row of one document, a row with an id repeated apart, a row whose sides differ), at the
    forward's and the dK/dV kernel's CTA shapes, CTAs past the end included."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.flash_attention.common import document_spans

    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    rows = [np.repeat(np.arange(40), rng.integers(1, 90, 40))[:300] for _ in range(3)]
    rows[1] = np.where(np.arange(300) >= 250, rows[1][0], rows[1])  # the first id again
    rows.append(np.full(300, rng.integers(1, 9)))
    q_seg = np.stack(rows).astype(np.int32)
    kv_seg = q_seg.copy()
    kv_seg[2, 7] += 1
    for ctas, cta_rows, block in ((3, 128, 64), (4, 128, 128), (5, 64, 32), (10, 32, 16)):
        num_blocks = -(-300 // block) + 1
        got = np.asarray(document_spans(jnp.asarray(q_seg), jnp.asarray(kv_seg), ctas, cta_rows,
                                        block, num_blocks)).reshape(-1, 4).tolist()
        want = _spans_by_loop(q_seg, kv_seg, ctas, cta_rows, block, num_blocks)
        assert [([lo, hi], list(range(a, b))) for lo, hi, a, b in got] == want, (
            seed, ctas, cta_rows, block)
    assert want[0][0] != [0, num_blocks]  # the first row's spans narrow
    assert any(inner for _, inner in want[:ctas])  # and some of its CTAs have inner blocks
    assert want[-1] == ([0, 19], list(range(18)))  # one document: every whole block of it


@pytest.mark.parametrize("causal", [True, False])
def test_triton_documents_pass_the_verifier(monkeypatch, causal):
    """With ``SKIP_DOCUMENTS``, the Triton kernels (forward, dK/dV, dQ) lowered for an A100 take
    the spans and pass the MLIR verifier: the clipped loop bounds keep one integer type."""
    import jax
    import jax.numpy as jnp
    from kernel_checks import verified_triton_modules

    from pallas_kernels import lowering_for
    from pallas_kernels.flash_attention import common, flash_attention

    monkeypatch.setattr(common, "SKIP_DOCUMENTS", True)
    sds = jax.ShapeDtypeStruct
    q, k = sds((2, 300, 4, 64), jnp.bfloat16), sds((2, 300, 2, 64), jnp.bfloat16)
    seg = sds((2, 300), jnp.int32)

    def fwd_bwd(q, k, v, seg):
        fn = lambda *a: flash_attention(*a, causal=causal, segment_ids=seg)  # noqa: E731
        out, vjp = jax.vjp(fn, q, k, v)
        return vjp(out)

    with verified_triton_modules() as checked, lowering_for("NVIDIA A100-SXM4-80GB"):
        text = jax.jit(fwd_bwd).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3 and checked[0] == 3
    calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    assert all(re.search(r"tensor<2x\d+x4xi32>", call) for call in calls)  # the spans


@pytest.mark.parametrize("head_dim, length, joined", [
    (64, 256, True), (128, 2048, False), (128, 16384, True)])
def test_dq_joins_the_dkv_kernel_where_it_measured_faster(head_dim, length, joined):
    """Lowered for an H100, the Mosaic GPU backward sums dQ inside the dK/dV kernel (which then
    takes the float32 sum as an aliased operand) at head_dim 64, and at head_dim 128 only from
    ``SPLIT_DQ_MIN_LEN`` keys; elsewhere a dQ kernel computes it."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import lowering_for
    from pallas_kernels.flash_attention import flash_attention

    x = jax.ShapeDtypeStruct((1, length, 2, head_dim), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(flash_attention(
        q, k, v, causal=True).astype(jnp.float32)), argnums=(0, 1, 2)))
    with lowering_for("NVIDIA H100"):
        text = grad.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    kernels = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert len(kernels) == 3
    assert ("output_operand_aliases" in kernels[1]) == joined
