"""flash_attention's implementations against its float32 reference, on the shared cases.

Every case checks ``out``, ``lse`` and ``dq, dk, dv`` (random cotangents on ``out`` and ``lse``) on
fresh random inputs, per ``kernel_checks.check_attention``. On CPU the Pallas lowerings run in
interpret mode (Mosaic GPU's with three simulated warpgroups, real barriers and TMA copies, the
tile products taken by XLA; its warpgroups run on XLA's host thread pool, which needs the 8 fake
CPU devices of tests/conftest.py) and cuDNN's masking runs through jax's XLA attention; with a
GPU the compiled lowerings run too.
"""

from __future__ import annotations

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
    holding a key that shares a query's id; every block where a row's ids are not one run each
    or differ between the sides."""
    out = []
    for q_row, kv_row in zip(q_seg.tolist(), kv_seg.tolist()):
        runs = [i for t, i in enumerate(q_row) if t == 0 or i != q_row[t - 1]]
        whole = len(runs) != len(set(runs)) or q_row != kv_row
        for c in range(ctas):
            first = min(c * rows, len(q_row) - 1)
            ids = set(q_row[first:first + rows])
            seen = [t for t, i in enumerate(kv_row) if i in ids]
            out += [0, num_blocks] if whole else [seen[0] // block, seen[-1] // block + 1]
    return out


def test_document_spans_match_a_loop():
    """The block ranges the Mosaic GPU kernels narrow their loops to, on fresh random packed rows
    (documents of 1-90 tokens, a row with an id repeated apart, a row whose sides differ), at
    the forward's and the dK/dV kernel's CTA shapes, CTAs past the end included."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.flash_attention.common import document_spans

    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    rows = [np.repeat(np.arange(40), rng.integers(1, 90, 40))[:300] for _ in range(3)]
    rows[1] = np.where(np.arange(300) >= 250, rows[1][0], rows[1])  # the first id again
    q_seg = np.stack(rows).astype(np.int32)
    kv_seg = q_seg.copy()
    kv_seg[2, 7] += 1
    for ctas, cta_rows, block in ((3, 128, 64), (4, 128, 128), (5, 64, 32)):
        num_blocks = -(-300 // block) + 1
        got = document_spans(jnp.asarray(q_seg), jnp.asarray(kv_seg), ctas, cta_rows, block,
                             num_blocks)
        want = _spans_by_loop(q_seg, kv_seg, ctas, cta_rows, block, num_blocks)
        assert np.asarray(got).tolist() == want, (seed, ctas, cta_rows, block)
    assert want[:2] != [0, num_blocks]  # the first row's spans narrow
