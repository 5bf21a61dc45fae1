"""``flash_attention_qkv``: self-attention of a fused projection's ``(batch, len, heads, 3,
head_dim)`` output. The Mosaic GPU kernels read it in place (interpret mode here) and write its
gradient in that layout; every other implementation slices it. Values and gradients against
``flash_attention`` over the slices in float32 on fresh random inputs; the model's fused q/k/v
product against its three separate projections."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import NEEDS_HOPPER

from pallas_kernels import lowering_for
from pallas_kernels.flash_attention import common as fa_common
from pallas_kernels.flash_attention import flash_attention, flash_attention_qkv, mosaic_gpu

pytestmark = pytest.mark.usefixtures("fast_compile")

MOSAIC = dict(implementation="mosaic_gpu", interpret=True,
              tiles=mosaic_gpu.Tiles(*(mosaic_gpu.KernelTiles(64, 64, s) for s in (3, 2, 2))))


def _inputs(seed, batch, length, heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 2)
    qkv = jax.random.normal(keys[0], (batch, length, heads, 3, head_dim), jnp.float32)
    weights = jax.random.normal(keys[1], (batch, length, heads, head_dim), jnp.float32)
    return qkv.astype(dtype), weights


def _loss(attention, weights, **kwargs):
    return lambda qkv: jnp.sum(attention(qkv, **kwargs).astype(jnp.float32) * weights)


def _sliced(qkv, **kwargs):
    return flash_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], **kwargs)


def _rel(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _documents(batch, length):
    """Two documents per row, split at 4/7 of ``length`` (ids differ between rows too)."""
    cut = 4 * length // 7
    return jnp.asarray(np.repeat([[1, 2], [3, 4]][:batch], [cut, length - cut], axis=1), jnp.int32)


# Packed documents with and without causality (the first as every GPT step runs it), and
# causality with a window and ALiBi; interpret mode and compiled alike.
CASES = {
    "causal_segments": lambda batch, length: dict(causal=True,
                                                  segment_ids=_documents(batch, length)),
    "segments": lambda batch, length: dict(causal=False, segment_ids=_documents(batch, length)),
    "causal_window_alibi": lambda batch, length: dict(causal=True, sliding_window=30,
                                                      alibi_slopes=jnp.array([0.05, 0.2])),
}


def _check_packed(kwargs, batch, length, **run):
    """bf16 ``qkv`` (``length`` padded inside to the tiles): output and the gradient of each of
    q, k, v within 1e-2 of the float32 reference's (bf16 inputs and products)."""
    seed = int(np.random.default_rng().integers(2**31))
    qkv, weights = _inputs(seed, batch, length, 2, 64, jnp.bfloat16)
    out = flash_attention_qkv(qkv, **kwargs, **run)
    grad = jax.grad(_loss(flash_attention_qkv, weights, **kwargs, **run))(qkv)
    f32 = qkv.astype(jnp.float32)
    want = _sliced(f32, **kwargs, implementation="xla")
    want_grad = jax.grad(_loss(_sliced, weights, **kwargs, implementation="xla"))(f32)
    assert out.shape == want.shape and grad.shape == qkv.shape and grad.dtype == qkv.dtype
    assert _rel(out, want) < 1e-2, seed
    for i, name in enumerate("qkv"):
        assert _rel(grad[:, :, :, i], want_grad[:, :, :, i]) < 1e-2, (seed, name)


@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_packed_matches_the_reference(case):
    _check_packed(CASES[case](2, 70), 2, 70, **MOSAIC)


@NEEDS_HOPPER
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_mosaic_packed_matches_the_reference(case):
    """The compiled kernels at their default tiles, 1000 steps (padded to the tiles)."""
    _check_packed(CASES[case](2, 1000), 2, 1000, implementation="mosaic_gpu")


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_other_implementations_slice_it(implementation):
    """Anything but Mosaic GPU runs ``flash_attention`` on the slices: the same value and
    gradient (float32, 1e-5)."""
    qkv, weights = _inputs(1, 1, 40, 2, 16, jnp.float32)
    kwargs = dict(causal=True, implementation=implementation, interpret=implementation != "xla")
    value, grad = jax.value_and_grad(_loss(flash_attention_qkv, weights, **kwargs))(qkv)
    want, want_grad = jax.value_and_grad(_loss(_sliced, weights, causal=True,
                                               implementation="xla"))(qkv)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-5)


@pytest.mark.parametrize("dq_in_dkv", [True, False])
def test_auto_on_hopper_reads_it_in_place(monkeypatch, dq_in_dkv):
    """Lowered for an H100, "auto" runs the packed Mosaic GPU kernels: the kernel that writes dQ
    (the one casting the dK/dV kernel's float32 dQ sum, or the dQ kernel) takes the dK/dV
    kernel's packed output as its last operand and returns it (aliased: written in place), with
    no concatenation or dynamic update in XLA; the dK/dV kernel adds into the dQ sum in place."""
    monkeypatch.setattr(mosaic_gpu, "DQ_IN_DKV", dq_in_dkv)
    qkv = jax.ShapeDtypeStruct((2, 256, 2, 3, 64), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(flash_attention_qkv(x, causal=True)
                                              .astype(jnp.float32))))
    with lowering_for("NVIDIA H100"):
        text = grad.trace(qkv).lower(lowering_platforms=("cuda",)).as_text()
    kernels = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert len(kernels) == 3  # forward, dK/dV, then the dQ cast or the dQ kernel
    dkv_call, dq_call = kernels[1:]
    assert "output_operand_aliases" in dq_call
    assert f"operand_index = {1 if dq_in_dkv else 6}" in dq_call
    assert dq_call.endswith("-> tensor<2x256x6x64xbf16>")
    assert ("output_operand_aliases" in dkv_call) == dq_in_dkv
    assert "dynamic_update_slice" not in text and "concatenate" not in text


def test_packed_documents_on_hopper_pass_block_spans(monkeypatch):
    """With segment ids and ``SKIP_DOCUMENTS``, the Mosaic GPU kernels that walk blocks (forward
    and dK/dV; the third only casts dQ's sum) lowered for an H100 take the ``document_spans``
    (one flat int32 operand), by which they skip other documents' blocks; without the switch
    neither does, and turning it on after a call of the same shapes is not hidden by the
    kernels' jit cache."""
    qkv = jax.ShapeDtypeStruct((2, 256, 2, 3, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    for skip in (False, True):
        monkeypatch.setattr(fa_common, "SKIP_DOCUMENTS", skip)
        grad = jax.jit(jax.grad(lambda x, s: jnp.sum(flash_attention_qkv(
            x, causal=True, segment_ids=s).astype(jnp.float32))))
        with lowering_for("NVIDIA H100"):
            text = grad.trace(qkv, seg).lower(lowering_platforms=("cuda",)).as_text()
        kernels = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
        assert len(kernels) == 3
        for call, walks in zip(kernels, (True, True, False)):
            operands = call.rpartition(" : (")[2].partition(") ->")[0]
            assert bool(re.search(r"tensor<\d+xi32>", operands)) == (skip and walks), operands


@pytest.mark.parametrize("shape", [(2, 8, 2, 16), (1, 8, 2, 2, 16)])
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, len, heads, 3, head_dim\)"):
        flash_attention_qkv(jnp.ones(shape, jnp.bfloat16))


def test_model_fuses_its_projections_without_changing_anything():
    """GPT-2's attention (no RoPE, kv heads = heads) with ``model.fuse_qkv``: one product into a
    (batch, len, heads, 3, head_dim) array, the same parameter tree, and the loss and every
    gradient of the three separate projections (float32, 1e-5)."""
    from meshlm.config import model_config

    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    toks = jnp.asarray(rng.integers(0, 64, (2, 17)), jnp.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.asarray(np.repeat([[1, 2]], [9, 7], axis=1).repeat(2, 0)),
             "loss_mask": jnp.ones((2, 16))}
    runs, params = {}, None
    for fuse in (True, False):
        cfg = model_config("gpt", vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                           max_seq_len=16, norm="layernorm", position="learned",
                           dtype="float32", fuse_qkv=fuse)
        model = cfg.build()
        fresh = model.init(jax.random.key(0), batch["inputs"])["params"]
        if params is None:  # perturbed off the initial values (zero biases)
            params = jax.tree.map(
                lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), fresh)
        assert jax.tree.structure(fresh) == jax.tree.structure(params)
        loss = jax.value_and_grad(lambda p: cfg.loss(model, p, batch)[0])
        runs[fuse] = (str(jax.make_jaxpr(loss)(params)), *jax.jit(loss)(params))
    (fused_text, fused, fused_grads), (text, separate, grads) = runs[True], runs[False]
    assert "f32[2,16,4,3,8]" in fused_text and "f32[2,16,4,3,8]" not in text
    np.testing.assert_allclose(fused, separate, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-5)
