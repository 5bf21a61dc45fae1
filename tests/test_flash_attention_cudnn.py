"""cuDNN's packed-rows path of flash attention (``flash_attention/cudnn.py``).

On CPU: segment ids -> cuDNN's segment lengths and offsets against a plain loop; the whole path
(layout, run-time choice, the explicit-mask fallback) against the float32 reference with JAX's
XLA attention standing in for cuDNN, its packed layout read back by an independent mask; and the
program lowered for an H100, whose packed branch holds no ``(L, L)`` mask. On a Hopper GPU: the
real cuDNN kernels against the reference, forward and gradients (they passed on an H200, so
``cudnn.PACKED_ROWS`` is on by default).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core
from kernel_checks import Lowering, check_attention, gpu_arch

from pallas_kernels import _api, lowering_for
from pallas_kernels.flash_attention import cudnn, flash_attention
from pallas_kernels.flash_attention.common import AttentionSpec

M = cudnn.MAX_SEGMENTS
XLA_ATTENTION = jax.nn.dot_product_attention  # before a test replaces it


def test_on_by_default_and_off_takes_the_explicit_mask(monkeypatch):
    """``PACKED_ROWS`` is on; turned off (to time the mask), packed rows take the explicit mask."""
    monkeypatch.setattr(cudnn, "_cudnn_version", lambda: 90600)
    with lowering_for("NVIDIA H100"):
        assert cudnn.packed_applies((2, 64, 4, 64), (2, 64, 2, 64), True, AttentionSpec())
        monkeypatch.setattr(cudnn, "PACKED_ROWS", False)
        assert not cudnn.packed_applies((2, 64, 4, 64), (2, 64, 2, 64), True, AttentionSpec())


def _packed_rows(seed, batch, length, segments):
    """Rows of ``segments[b]`` documents of random lengths (ids 1, 2, ...), the last row's tail
    padding (id 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b, n in enumerate(segments):
        used = length - (length // 4 if b == batch - 1 else 0)
        cuts = np.sort(rng.choice(np.arange(1, used), n - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [used]]))
        rows.append(np.concatenate([np.repeat(np.arange(1, n + 1), lengths),
                                    np.zeros(length - used, np.int64)]))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _layout_by_loop(row, max_segments):
    runs = []  # [first, length, id]
    for t, i in enumerate(np.asarray(row).tolist()):
        if runs and runs[-1][2] == i:
            runs[-1][1] += 1
        else:
            runs.append([t, 1, i])
    fits = len(runs) <= max_segments and len({r[2] for r in runs}) == len(runs)
    kept = runs[:max_segments] if fits else []
    pad = max_segments - len(kept)
    return ([r[1] for r in kept] + [-1] * pad, [r[0] for r in kept] + [-1] * (pad + 1), fits)


# ----------------------------------------------------------------------------- the layout


def test_packed_layout_by_hand():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5] * 8, [1, 1, 2, 2, 1, 1, 3, 3],
                     [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
    seqlens, offsets, fits = cudnn.packed_layout(seg, 4)
    np.testing.assert_array_equal(seqlens[:2], [[3, 2, 1, 2], [8, -1, -1, -1]])
    np.testing.assert_array_equal(offsets[:2], [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1]])
    # id 1 in two runs (the reference lets them see each other); eight runs > 4
    np.testing.assert_array_equal(fits, [True, True, False, False])


def test_packed_layout_random_rows():
    seg = _packed_rows(0, 4, 96, [1, 5, M, 9])
    seg = seg.at[3].set(jnp.where(seg[3] == 7, 2, seg[3]))  # id 2 comes back: does not fit
    over = _packed_rows(1, 2, 96, [M + 1, 3])  # a row of more runs than slots
    for rows in (seg, over):
        seqlens, offsets, fits = jax.jit(cudnn.packed_layout, static_argnums=1)(rows, M)
        want = [_layout_by_loop(r, M) for r in rows]
        assert np.asarray(fits).tolist() == [w[2] for w in want]
        for b, (lens, offs, ok) in enumerate(want):
            if ok:
                np.testing.assert_array_equal(seqlens[b], lens)
                np.testing.assert_array_equal(offsets[b], offs)


@pytest.mark.parametrize("spec, q_len, kv_len, applies", [
    (AttentionSpec(causal=True), 64, 64, True),
    (AttentionSpec(), 64, 64, True),
    (AttentionSpec(causal=True, q_offset=8), 56, 64, False),
    (AttentionSpec(causal=True), 48, 64, False),
    (AttentionSpec(causal=True, sliding_window=16), 64, 64, False),
])
def test_packed_applies(monkeypatch, spec, q_len, kv_len, applies):
    monkeypatch.setattr(cudnn, "_cudnn_version", lambda: 90600)
    with lowering_for("NVIDIA H100"):
        assert cudnn.packed_applies((2, q_len, 4, 64), (2, kv_len, 2, 64), True, spec) == applies
        assert not cudnn.packed_applies((2, 64, 4, 64), (2, 64, 2, 64), False, spec)
    with lowering_for("NVIDIA A100-SXM4-80GB"):  # JAX refuses the packed layout before Hopper
        assert not cudnn.packed_applies((2, 64, 4, 64), (2, 64, 2, 64), True, spec)
    monkeypatch.setattr(cudnn, "_cudnn_version", lambda: 90500)
    with lowering_for("NVIDIA H100"):
        assert not cudnn.packed_applies((2, 64, 4, 64), (2, 64, 2, 64), True, spec)


# ----------------------------------------------------------------------------- CPU numerics


def _packed_by_mask(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type,
                    qkv_layout):
    """cuDNN's packed call as documented (``fused_attention_stablehlo.dot_product_attention``):
    segment s of a row is tokens ``offsets[s] .. offsets[s] + seqlen[s] - 1``; causal masks are
    aligned at each segment's start. Read back as an explicit mask for JAX's XLA attention."""
    assert qkv_layout == "BTNH"

    def slot_and_local(seqlen, offsets, length):
        t = jnp.arange(length)[None, :, None]
        first, n = offsets[:, None, :-1], seqlen[:, None, :]
        inside = (n >= 0) & (t >= first) & (t < first + n)
        slot = jnp.where(inside.any(-1), jnp.argmax(inside, -1), -1)
        return slot, t[..., 0] - jnp.sum(jnp.where(inside, first, 0), -1)

    q_slot, q_local = slot_and_local(q_seqlen, q_offsets, q.shape[1])
    k_slot, k_local = slot_and_local(kv_seqlen, kv_offsets, k.shape[1])
    mask = (q_slot[:, :, None] == k_slot[:, None, :]) & (q_slot[:, :, None] >= 0)
    if mask_type == cudnn.cudnn_fmha.MaskType.PADDING_CAUSAL:
        mask &= k_local[:, None, :] <= q_local[:, :, None]
    else:
        assert mask_type == cudnn.cudnn_fmha.MaskType.PADDING
    return XLA_ATTENTION(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")


def _nan_attention(q, *args, **kwargs):
    return jnp.full_like(q, jnp.nan)


def _emulated(packed, masked):
    """The cuDNN path on CPU for a Hopper target: ``packed`` stands for cuDNN's packed call,
    ``masked`` for ``jax.nn.dot_product_attention``'s cuDNN call."""

    def setup(monkeypatch):
        monkeypatch.setattr(_api, "target_platform", lambda: "gpu")
        monkeypatch.setattr(cudnn, "_arch", lambda: 9.0)
        monkeypatch.setattr(cudnn, "_cudnn_version", lambda: 90600)
        monkeypatch.setattr(cudnn.cudnn_fmha, "dot_product_attention", packed)

        def xla_instead(*args, implementation=None, **kwargs):
            assert implementation == "cudnn"
            return masked(*args, implementation="xla", **kwargs)

        monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)

    return setup


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("fits", [True, False], ids=["packed", "fallback"])
def test_cpu_emulated_matches_reference(monkeypatch, causal, fits):
    """Rows that fit run packed (the explicit-mask call returns NaN, so it must not be the one
    that ran); a row of more runs than slots runs on the explicit mask (the packed call returns
    NaN). Either way forward and gradients match the float32 reference."""
    if fits:
        _emulated(_packed_by_mask, _nan_attention)(monkeypatch)
        seg = _packed_rows(2, 2, 48, [3, M - 1])  # M runs with the padding
    else:
        _emulated(_nan_attention, XLA_ATTENTION)(monkeypatch)
        seg = _packed_rows(3, 2, 48, [2, M])
    check_attention(Lowering("cudnn_emulated", "cudnn"), f"packed-{causal}-{fits}", batch=2,
                    q_len=48, kv_len=48, heads=2, kv_heads=1, head_dim=16, dtype=jnp.bfloat16,
                    causal=causal, segment_ids=seg)


def test_cpu_emulated_unequal_ids_take_the_mask(monkeypatch):
    """Query and key ids that differ (same lengths) are not one packed layout: the explicit
    mask runs, and queries of a segment without keys get zeros."""
    _emulated(_nan_attention, XLA_ATTENTION)(monkeypatch)
    seg = _packed_rows(4, 2, 32, [2, 3])
    check_attention(Lowering("cudnn_emulated", "cudnn"), "unequal-ids", batch=2, q_len=32,
                    kv_len=32, heads=2, kv_heads=1, head_dim=16, dtype=jnp.bfloat16, causal=True,
                    q_segment_ids=seg, kv_segment_ids=seg.at[:, :5].set(9))


# ----------------------------------------------------------------------------- H100 program


def _shapes_by_branch(jaxpr, path=()):
    """``{path: set of array shapes}`` of every equation's outputs, a cond's branches under
    ``path + ("cond<i>",)`` (branch 1: the predicate true, the packed call)."""
    found = {}
    for eqn in jaxpr.eqns:
        found.setdefault(path, set()).update(
            tuple(x.aval.shape) for x in eqn.outvars if hasattr(x.aval, "shape"))
        if eqn.primitive.name == "cond":
            subs = [(f"cond{i}", b.jaxpr) for i, b in enumerate(eqn.params["branches"])]
        else:
            subs = [(eqn.primitive.name, s.jaxpr if isinstance(s, core.ClosedJaxpr) else s)
                    for p in eqn.params.values()
                    for s in (p if isinstance(p, (tuple, list)) else [p])
                    if isinstance(s, (core.Jaxpr, core.ClosedJaxpr))]
        for name, sub in subs:
            for key, shapes in _shapes_by_branch(sub, path + (name,)).items():
                found.setdefault(key, set()).update(shapes)
    return found


def test_packed_program_for_h100_has_no_square_mask(monkeypatch):
    """Forward and backward lowered for an H100 (cuDNN 9.10 assumed): the packed cuDNN calls
    (``max_seg_per_batch`` slots, no bias operand) and, outside the fallback branch, no array
    with a ``(L, L)`` pair of dimensions, not even a residual of the fallback."""
    monkeypatch.setattr(cudnn.cudnn_fmha, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn.cudnn_fmha, "check_compute_capability", lambda cc: True)
    batch, length = 2, 64
    sds = jax.ShapeDtypeStruct
    args = (sds((batch, length, 4, 64), jnp.bfloat16), sds((batch, length, 2, 64), jnp.bfloat16),
            sds((batch, length, 2, 64), jnp.bfloat16), sds((batch, length), jnp.int32))

    def fwd_bwd(q, k, v, seg):
        out, vjp = jax.vjp(lambda *a: flash_attention(*a, causal=True, segment_ids=seg,
                                                      implementation="cudnn"), q, k, v)
        return out, vjp(out)

    with lowering_for("NVIDIA H100"):
        shapes = _shapes_by_branch(jax.make_jaxpr(fwd_bwd)(*args).jaxpr)
        text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    def square(s):
        return len(s) >= 2 and s[-2:] == (length, length)

    fallback = {p for p in shapes if any(name == "cond0" for name in p)}
    assert fallback and any(square(s) for p in fallback for s in shapes[p])
    for path in set(shapes) - fallback:
        assert not any(square(s) for s in shapes[path]), path
    packed = [line for line in text.splitlines() if f"max_seg_per_batch\\22: {M}" in line]
    assert len(packed) == 2  # forward and backward
    assert "@__cudnn$fmhaSoftmax(" in packed[0] and "@__cudnn$fmhaSoftmaxBackward(" in packed[1]
    for line in packed:
        operands = re.search(r"\} : \((.*?)\) ->", line).group(1)
        assert f"x{length}x{length}x" not in operands  # no (batch, 1, L, L) bias


# ----------------------------------------------------------------------------- on the GPU

CUDNN = Lowering("cudnn", "cudnn")
NEEDS_HOPPER = pytest.mark.skipif(float(gpu_arch() or 0) < cudnn.PACKED_MIN_ARCH,
                                  reason="cuDNN's packed layout needs a Hopper or newer GPU")


@NEEDS_HOPPER
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments, fits", [([4, 1, M - 1], True), ([3, M + 3, 2], False)],
                         ids=["packed", "fallback"])
def test_gpu_matches_reference(causal, segments, fits):
    """The real cuDNN kernels, forward and gradients, against the float32 reference (bfloat16
    tolerance); the first rows fit the packed layout (the last one's padding is its M-th
    segment), the second have a row of too many."""
    seg = _packed_rows(5, 3, 256, segments)
    assert bool(jnp.all(cudnn.packed_layout(seg, M)[2])) == fits
    check_attention(CUDNN, f"gpu-packed-{causal}-{segments}", batch=3, q_len=256, kv_len=256,
                    heads=4, kv_heads=2, head_dim=64, dtype=jnp.bfloat16, causal=causal,
                    segment_ids=seg)


@NEEDS_HOPPER
def test_gpu_unequal_ids_take_the_mask():
    """Query and key ids that differ: cuDNN's explicit mask under its built-in causal mask, the
    queries that see no key zeroed."""
    seg = _packed_rows(6, 2, 128, [2, 3])
    check_attention(CUDNN, "gpu-unequal-ids", batch=2, q_len=128, kv_len=128, heads=4,
                    kv_heads=2, head_dim=64, dtype=jnp.bfloat16, causal=True, q_segment_ids=seg,
                    kv_segment_ids=seg.at[:, :5].set(9))
