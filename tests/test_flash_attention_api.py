"""flash_attention under jax transformations, its dispatch and tiles, its argument validation, the
key-block range math, and the lowerings' code for targets that are not this host (lowered, not
run). Kernels run in interpret mode on CPU, checked against the float32 reference at 1e-5
(float32 inputs)."""

from __future__ import annotations

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from kernel_checks import TPU, TRITON

from pallas_kernels import lowering_for
from pallas_kernels.flash_attention import (
    flash_attention,
    flash_attention_backward,
    mosaic_gpu,
    tpu,
    triton,
)
from pallas_kernels.flash_attention.api import DISPATCH
from pallas_kernels.flash_attention.common import AttentionSpec, Call, key_blocks, query_blocks

pytestmark = pytest.mark.usefixtures("fast_compile")

TOL = 1e-5
TRITON_KW = dict(TRITON.kwargs, implementation="triton")


def _qkv(seed, batch, length, heads, kv_heads, head_dim=64, lead=()):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (*lead, batch, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (*lead, batch, length, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (*lead, batch, length, kv_heads, head_dim), jnp.float32)
    return q, k, v


def _close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=TOL, atol=TOL * scale)


def _loss(q, k, v, **kwargs):
    """Uses both outputs so the lse cotangent path of the custom VJP is exercised too."""
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, **kwargs)
    return jnp.sum(out * jnp.sin(out)) + 0.1 * jnp.sum(jnp.sin(lse))


# ----------------------------------------------------------------------------- transformations


@pytest.mark.parametrize("lowering", [TRITON, TPU], ids=lambda x: x.label)
def test_vmap_of_value_and_grad(lowering):
    # vmap adds a grid axis to the kernels (the TPU interpreter's dimension semantics too).
    q, k, v = _qkv(1, batch=1, length=19, heads=2, kv_heads=1, lead=(2,))
    grad = lambda **kw: jax.jit(  # noqa: E731
        jax.vmap(jax.value_and_grad(functools.partial(_loss, **kw), argnums=(0, 1, 2)))
    )
    _close(grad(implementation=lowering.name, **lowering.kwargs)(q, k, v),
           grad(implementation="xla")(q, k, v))


def test_grad_of_lse_alone():
    # With only lse used, the output cotangent reaches the custom VJP as a symbolic zero.
    q, k, v = _qkv(2, batch=1, length=21, heads=2, kv_heads=2)

    def lse_loss(q, k, v, **kw):
        _, lse = flash_attention(q, k, v, return_lse=True, **kw)
        return jnp.sum(jnp.cos(lse))

    def grad(**kw):
        return jax.jit(jax.grad(functools.partial(lse_loss, **kw), argnums=(0, 1, 2)))

    _close(grad(**TRITON_KW)(q, k, v), grad(implementation="xla")(q, k, v))


@pytest.mark.parametrize("kw", [dict(implementation="xla"), TRITON_KW], ids=["xla", "triton"])
def test_backward_alone_from_the_final_output_and_lse(kw):
    """``flash_attention_backward`` of two key blocks, each fed the output and log-sum-exp of
    attention over both (as ring attention does), sums to the gradient of the whole; with one
    block it is the ordinary gradient. Packed segments and a causal first block."""
    q, k, v = _qkv(3, batch=2, length=24, heads=4, kv_heads=2)
    seg = jnp.asarray(np.repeat([[1] * 15 + [2] * 9], 2, axis=0), jnp.int32)
    d_out = jax.random.normal(jax.random.key(4), q.shape, jnp.float32)
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=seg,
                                                       implementation="xla"), q, k, v)
    want = vjp(d_out)
    _, lse = flash_attention(q, k, v, causal=True, segment_ids=seg, return_lse=True,
                             implementation="xla")
    one = flash_attention_backward(q, k, v, out, lse, d_out, causal=True, segment_ids=seg, **kw)
    _close(one, want)
    # keys 0..11 (causal for queries 0..11, all visible to 12..23) and keys 12..23 (queries
    # 12..23 only, causal with q_offset 0 on their own block)
    h = 12
    a = flash_attention_backward(q, k[:, :h], v[:, :h], out, lse, d_out, q_segment_ids=seg,
                                 kv_segment_ids=seg[:, :h], causal=True, **kw)
    b = flash_attention_backward(q[:, h:], k[:, h:], v[:, h:], out[:, h:], lse[..., h:],
                                 d_out[:, h:], causal=True, segment_ids=seg[:, h:], **kw)
    dq = a[0].at[:, h:].add(b[0])
    _close((dq, jnp.concatenate([a[1], b[1]], 1), jnp.concatenate([a[2], b[2]], 1)), want)


def test_shard_map_heads_over_mesh_axis():
    # 8 fake CPU devices: batch over "data" (2), query and kv heads over "heads" (4), GQA 2:1.
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "heads"))
    q, k, v = _qkv(3, batch=2, length=18, heads=8, kv_heads=4)
    spec = P("data", None, "heads", None)

    def sharded(**kw):
        @jax.jit
        @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3)
        def step(q, k, v):
            # Every term of the loss is local to a shard, so the local gradient is the global one.
            return jax.grad(functools.partial(_loss, **kw), argnums=(0, 1, 2))(q, k, v)

        return step

    _close(sharded(**TRITON_KW)(q, k, v), sharded(implementation="xla")(q, k, v))
    out = jax.jit(
        jax.shard_map(
            functools.partial(flash_attention, causal=True, **TRITON_KW),
            mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
        )
    )(q, k, v)
    _close(out, flash_attention(q, k, v, causal=True, implementation="xla"))


def test_jit_with_static_options():
    q, k, v = _qkv(4, batch=1, length=17, heads=2, kv_heads=2)
    attend = jax.jit(
        flash_attention,
        static_argnames=("causal", "sliding_window", "implementation", "interpret", "tiles"),
    )
    got = attend(q, k, v, causal=True, sliding_window=5, **TRITON_KW)
    _close(got, flash_attention(q, k, v, causal=True, sliding_window=5, implementation="xla"))


# ----------------------------------------------------------------------------- dispatch


def _call(head_dim=128, dtype=jnp.bfloat16, length=1000, **spec):
    return Call((2, length, 8, head_dim), (2, length, 2, head_dim), jnp.dtype(dtype),
                AttentionSpec(**spec))


def test_auto_on_cpu_is_the_reference_whatever_interpret_says():
    q, k, v = _qkv(5, batch=1, length=9, heads=2, kv_heads=1)  # head_dim 64: Triton would take it
    for kwargs in (dict(), dict(interpret=True), dict(causal=True, logits_soft_cap=3.0)):
        jaxpr = str(jax.make_jaxpr(functools.partial(flash_attention, **kwargs))(q, k, v))
        assert "pallas_call" not in jaxpr
        got = flash_attention(q, k, v, **kwargs)
        want = flash_attention(q, k, v, implementation="xla", **kwargs)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "device_kind, platform, call, want",
    [
        # Hopper: Mosaic GPU where it applies, else Triton, else the reference; never cuDNN.
        ("NVIDIA H100", "gpu", _call(), ("mosaic_gpu", mosaic_gpu.DEFAULT_TILES[""][128])),
        # ALiBi and head_dim 256: Mosaic GPU too (each measured faster than Triton)
        ("NVIDIA H100", "gpu", _call(has_alibi=True),
         ("mosaic_gpu", mosaic_gpu.DEFAULT_TILES[""][128])),
        ("NVIDIA H100", "gpu", _call(head_dim=256),
         ("mosaic_gpu", mosaic_gpu.DEFAULT_TILES[""][256])),
        ("NVIDIA H100", "gpu", _call(dtype=jnp.float32),
         ("triton", triton.DEFAULT_TILES["9.0"][128])),
        ("NVIDIA H100", "gpu", _call(head_dim=96), ("xla", None)),
        # Ampere: Triton with the sm_80 table.
        ("NVIDIA A100-SXM4-80GB", "gpu", _call(head_dim=64),
         ("triton", triton.DEFAULT_TILES["8.0"][64])),
        # TPU: the default tiles, shrunk to the (short) lengths.
        ("TPU v5 lite", "tpu", _call(length=40), ("tpu", tpu.Tiles(48, 128, 128, 128))),
    ],
    ids=["h100", "h100-alibi", "h100-d256", "h100-f32", "h100-d96", "a100", "tpu-v5e"],
)
def test_auto_follows_the_target_device(device_kind, platform, call, want):
    with lowering_for(device_kind, platform):
        assert DISPATCH.choose("auto", call, interpret=False) == want
        # interpret never changes what "auto" picks
        assert DISPATCH.choose("auto", call, interpret=True) == want


def test_named_lowering_takes_the_target_default_tiles():
    call = _call(head_dim=64)
    with lowering_for("NVIDIA H100"):
        assert DISPATCH.choose("triton", call, interpret=False) == (
            "triton", triton.DEFAULT_TILES["9.0"][64])
    assert DISPATCH.choose("triton", call, interpret=True) == (
        "triton", triton.DEFAULT_TILES[""][64])  # this CPU host


_Q = jnp.zeros((1, 8, 4, 64))
_K = jnp.zeros((1, 8, 2, 64))
_T16 = TRITON.kwargs["tiles"]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((_Q[0], _K, _K), {}, "q must have rank 4"),
        ((_Q, _K.astype(jnp.bfloat16), _K), {}, "share one dtype"),
        ((_Q.astype(jnp.int32),) * 3, {}, "share one dtype"),
        ((_Q, _K, _K[:, :4]), {}, "k and v must have the same shape"),
        ((_Q, jnp.zeros((1, 8, 3, 64)), jnp.zeros((1, 8, 3, 64))), {}, r"multiple of kv_heads"),
        ((_Q, _K[..., :32], _K[..., :32]), {}, "same head_dim"),
        ((_Q, _K, _K), dict(sliding_window=4), "sliding_window requires causal=True"),
        ((_Q, _K, _K), dict(causal=True, sliding_window=0), "sliding_window must be a positive"),
        ((_Q, _K, _K), dict(scale=-1.0), "scale must be finite and > 0"),
        ((_Q, _K, _K), dict(logits_soft_cap=0.0), "logits_soft_cap must be finite and > 0"),
        ((_Q, _K, _K), dict(q_offset=-1), "q_offset must be an int >= 0"),
        ((_Q, _K, _K), dict(alibi_slopes=jnp.ones(2)), r"alibi_slopes must be .* \(4,\)"),
        ((_Q, _K[:, :4], _K[:, :4]), dict(segment_ids=jnp.zeros((1, 8), jnp.int32)),
         "segment_ids needs q_len == kv_len"),
        ((_Q, _K, _K), dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), "given together"),
        ((_Q, _K, _K), dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), r"\(batch, q_len\)"),
        ((_Q, _K, _K), dict(return_lse=1), "return_lse must be a bool"),
        ((_Q, _K, _K), dict(implementation="cuda"), "implementation must be one of"),
        ((_Q, _K, _K), dict(implementation="triton"), "needs a GPU backend"),
        ((_Q, _K, _K), dict(implementation="mosaic_gpu"), "mosaic_gpu"),
        ((_Q, _K, _K), dict(implementation="cudnn"), "'cudnn' needs a GPU backend"),
        ((_Q, _K, _K), dict(implementation="cudnn", interpret=True), "no interpret mode"),
        # tiles: only with a named Pallas lowering, of its own type, positive, of its shape.
        ((_Q, _K, _K), dict(tiles=_T16), "name it with implementation="),
        ((_Q, _K, _K), dict(implementation="xla", tiles=_T16), "name it with implementation="),
        ((_Q, _K, _K), dict(implementation="tpu", interpret=True, tiles=_T16),
         r"tiles must be a pallas_kernels\.flash_attention\.tpu\.Tiles, got .*triton\.Tiles"),
        ((_Q, _K, _K), dict(implementation="tpu", interpret=True, tiles=(64, 64, 64, 64)),
         "tiles must be a"),
        ((_Q, _K, _K), dict(implementation="tpu", interpret=True, tiles=tpu.Tiles(0, 8, 8, 8)),
         "tiles.block_q must be a positive int"),
        ((_Q, _K, _K), dict(implementation="tpu", interpret=True, tiles=tpu.Tiles(8, 12, 8, 8)),
         "tiles.block_k must be a positive multiple of 8"),
        ((_Q, _K, _K), dict(implementation="triton", interpret=True, tiles=triton.Tiles(
            _T16.fwd, triton.KernelTiles(16, 24, 4, 2), _T16.dq)),
         r"tiles\.dkv\.block_k must be a power of 2"),
        ((_Q[..., :48], _K[..., :48], _K[..., :48]), dict(implementation="triton", interpret=True),
         "head_dim must be one of"),
    ],
)
def test_invalid_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*args, **kwargs)


def test_cudnn_refuses_what_it_lacks(monkeypatch):
    monkeypatch.setattr("pallas_kernels._api.target_platform", lambda: "gpu")  # cuDNN's target
    q = _Q.astype(jnp.bfloat16)
    k = _K.astype(jnp.bfloat16)
    for kwargs, match in [
        (dict(return_lse=True), "returns no log-sum-exp"),
        (dict(alibi_slopes=jnp.ones(4)), "ALiBi"),
        (dict(logits_soft_cap=5.0), "soft-capping"),
        (dict(tiles=_T16), "takes no tiles"),
    ]:
        with pytest.raises(ValueError, match=match):
            flash_attention(q, k, k, implementation="cudnn", **kwargs)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        flash_attention(_Q, _K, _K, implementation="cudnn")


@pytest.mark.parametrize(
    ("head_dim", "dtype", "spec_kw", "reason"),
    [
        (96, jnp.bfloat16, {}, "head_dim must be one of"),
        (128, jnp.float32, {}, "dtype must be bfloat16 or float16"),
        (256, jnp.bfloat16, {}, "exceed the 227 KiB of shared memory"),  # head_dim 128's tiles
    ],
)
def test_mosaic_gpu_supports_reasons(head_dim, dtype, spec_kw, reason):
    call = _call(head_dim=head_dim, dtype=dtype, **spec_kw)
    why = mosaic_gpu.supports(call, mosaic_gpu.DEFAULT_TILES[""][128])
    assert why is not None and reason in why


def test_mosaic_gpu_supports_tiles():
    call, default = _call(), mosaic_gpu.DEFAULT_TILES[""][128]
    assert mosaic_gpu.supports(call, default) is None
    fwd = lambda **kw: mosaic_gpu.Tiles(  # noqa: E731
        mosaic_gpu.KernelTiles(**{"owned": 64, "streamed": 128, "stages": 2, **kw}),
        default.dkv, default.dq)
    assert "multiple of 64" in mosaic_gpu.supports(call, fwd(streamed=96))
    assert "shared memory" in mosaic_gpu.supports(call, fwd(owned=256, streamed=256))
    # head_dim 256: its tiles fit; a 128-row owned tile fits shared memory with one slot, but its
    # float32 accumulator (128 x 256) would take 256 registers per thread.
    call, d256 = _call(head_dim=256), mosaic_gpu.DEFAULT_TILES[""][256]
    assert mosaic_gpu.supports(call, d256) is None
    big = mosaic_gpu.Tiles(mosaic_gpu.KernelTiles(128, 64, 1), d256.dkv, d256.dq)
    assert "256 registers per thread" in mosaic_gpu.supports(call, big)


def test_mosaic_gpu_counts_the_dq_tiles_in_the_dkv_kernel(monkeypatch):
    """dK/dV tiles of 128 keys x 128 query rows at head_dim 64 fill 128 KiB; with dQ summed in
    that kernel its dS and float32 dQ tiles add 128 KiB more, over the limit: refused then, and
    accepted with the dQ kernel instead."""
    call, d64 = _call(head_dim=64), mosaic_gpu.DEFAULT_TILES[""][64]
    tiles = mosaic_gpu.Tiles(d64.fwd, mosaic_gpu.KernelTiles(128, 128, 2), d64.dq)
    assert "dK/dV tiles" in mosaic_gpu.supports(call, tiles)
    monkeypatch.setattr(mosaic_gpu, "DQ_IN_DKV", False)
    assert mosaic_gpu.supports(call, tiles) is None


# ----------------------------------------------------------------------------- key-block ranges


def _visible(spec, q_pos, k_pos):
    seen = np.ones((len(q_pos), len(k_pos)), bool)
    if spec.causal:
        seen &= k_pos[None, :] <= q_pos[:, None]
        if spec.sliding_window is not None:
            seen &= k_pos[None, :] > q_pos[:, None] - spec.sliding_window
    return seen


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, 5), (True, 40)])
def test_block_ranges_match_the_mask(causal, window):
    """key_blocks / query_blocks against the brute-force mask: every block holding a visible pair
    is in [lo, hi), the blocks outside it hold none, and [full_lo, full_hi) are fully visible
    (no padded key)."""
    for q_offset, kv_len, rows, block in itertools.product((0, 3, 21), (30, 32), (8, 16), (8, 16)):
        spec = AttentionSpec(causal=causal, sliding_window=window, q_offset=q_offset)
        q_len = kv_len - q_offset if causal else 24
        nk, nq = -(-kv_len // block), -(-q_len // rows)
        padded = kv_len if nk * block != kv_len else None
        k_pos, q_pos = np.arange(nk * block), q_offset + np.arange(nq * rows)
        seen = _visible(spec, q_pos, k_pos) & (k_pos < kv_len)[None, :]
        for i in range(nq):  # rows of query block i against key blocks
            q_first = q_offset + i * rows
            lo, full_lo, full_hi, hi = key_blocks(q_first, rows, block, nk, spec, padded)
            per_block = seen[i * rows:(i + 1) * rows].reshape(rows, nk, block)
            any_, all_ = per_block.any(axis=(0, 2)), per_block.all(axis=(0, 2))
            assert all(not any_[j] for j in range(nk) if not lo <= j < hi), (spec, i)
            assert all(all_[j] for j in range(full_lo, full_hi)), (spec, i)
            assert lo <= full_lo <= full_hi <= hi
        for j in range(nk):  # keys of block j against query blocks of ``rows``
            lo, full_lo, full_hi, hi = query_blocks(j * block, block, rows, nq, spec, padded)
            per_block = seen[:, j * block:(j + 1) * block].reshape(nq, rows, block)
            any_, all_ = per_block.any(axis=(1, 2)), per_block.all(axis=(1, 2))
            assert all(not any_[i] for i in range(nq) if not lo <= i < hi), (spec, j)
            assert all(all_[i] for i in range(full_lo, full_hi)), (spec, j)
            assert lo <= full_lo <= full_hi <= hi
    # Traced positions give the same blocks as static ones.
    spec = AttentionSpec(causal=True, sliding_window=5, q_offset=3)
    traced = jax.jit(lambda p: jnp.stack(key_blocks(p, 16, 8, 4, spec, 30)))(jnp.int32(16))
    assert tuple(np.asarray(traced)) == key_blocks(16, 16, 8, 4, spec, 30)


# ----------------------------------------------------------------------------- other targets


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # non-causal with padded keys: the plainest loop bounds
        dict(causal=True, sliding_window=129, logits_soft_cap=30.0, alibi_slopes=jnp.ones(8),
             segment_ids=jnp.zeros((2, 1000), jnp.int32)),
    ],
    ids=["plain", "all_features"],
)
def test_triton_lowers_for_cuda(kwargs):
    # Interpret mode never runs the Triton lowering rules; lowering for an abstract H100 from this
    # CPU host (as jax.export would) catches kernel code that only interprets.
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
    attend = functools.partial(flash_attention, implementation="triton", **kwargs)

    def fwd_bwd(q, k, v):
        return jax.vjp(attend, q, k, v)[1](jnp.ones(q.shape, q.dtype))

    with lowering_for("NVIDIA H100"):
        text = jax.jit(fwd_bwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ


def _kernel_modules(layers: int) -> int:
    """How many Mosaic GPU kernel modules the lowering of ``layers`` chained forward + backward
    calls holds (lowered for a CUDA device: no GPU needed)."""
    spec = AttentionSpec(scale=0.125, causal=True)
    kw = dict(spec=spec, tiles=mosaic_gpu.DEFAULT_TILES[""][64], interpret=False)

    def model(q, k, v, do):
        for _ in range(layers):
            out, lse = mosaic_gpu.forward(q, k, v, None, None, None, **kw)
            dq, dk, dv = mosaic_gpu.backward(q, k, v, None, None, None, out, lse, do, **kw)
            q, k, v = out + dq, k + dk, v + dv
        return q, k, v

    x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    text = jax.jit(model).trace(x, x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("kernel_hash")


def test_mosaic_gpu_layers_share_kernel_builds():
    """Identical calls (one per layer) share one lowering and one kernel build: the forward, dK/dV
    and dQ kernels appear once however many layers call them, so compile time does not grow
    with depth."""
    assert _kernel_modules(2) == _kernel_modules(4) == 3


def test_tpu_lowers_to_mosaic():
    """Interpret mode skips the Mosaic lowering; export for a TPU target (no TPU needed) runs it,
    with every feature on, bfloat16, default tiles, ragged lengths and vmap."""
    spec = AttentionSpec(
        causal=True, sliding_window=100, logits_soft_cap=30.0, scale=0.125, q_offset=400,
        has_segment_ids=True, has_alibi=True,
    )
    sds = jax.ShapeDtypeStruct

    with lowering_for("TPU v5 lite", "tpu"):
        tiles = tpu.default_tiles(Call((1, 300, 4, 64), (1, 700, 2, 64), jnp.dtype(jnp.bfloat16),
                                       spec))

        def fwd_bwd(q, k, v, q_seg, kv_seg, slopes):
            kw = dict(spec=spec, tiles=tiles, interpret=False)
            out, lse = tpu.forward(q, k, v, q_seg, kv_seg, slopes, **kw)
            return tpu.backward(q, k, v, q_seg, kv_seg, slopes, out, lse, out, **kw)

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


@pytest.mark.parametrize(
    "head_dim, spec_kw, kernels",
    [
        (128, dict(), 3),
        (128, dict(causal=True, sliding_window=70, q_offset=100, has_segment_ids=True,
                   logits_soft_cap=30.0, has_alibi=True), 3),
        (256, dict(causal=True, has_segment_ids=True, has_alibi=True), 4),  # dV and dK passes
    ],
    ids=["plain", "every_mask_alibi", "head_dim_256_alibi"],
)
def test_mosaic_gpu_lowers_for_cuda(head_dim, spec_kw, kernels):
    """The Mosaic GPU lowering (which interpret mode skips) of the forward and backward kernels,
    static and traced block ranges, with keys and queries that are not tile multiples, at the
    head_dim's default tiles."""
    spec = AttentionSpec(scale=0.125, **spec_kw)
    kw = dict(spec=spec, tiles=mosaic_gpu.DEFAULT_TILES[""][head_dim], interpret=False)
    seg = jax.ShapeDtypeStruct((1, 300), jnp.int32) if spec.has_segment_ids else None
    slopes = jax.ShapeDtypeStruct((4,), jnp.float32) if spec.has_alibi else None

    def fwd_bwd(q, k, v, q_seg, kv_seg, slopes):
        out, lse = mosaic_gpu.forward(q, k, v, q_seg, kv_seg, slopes, **kw)
        return mosaic_gpu.backward(q, k, v, q_seg, kv_seg, slopes, out, lse, out, **kw)

    q = jax.ShapeDtypeStruct((1, 300, 4, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 300, 2, head_dim), jnp.bfloat16)
    with lowering_for("NVIDIA H100"):
        text = jax.jit(fwd_bwd).trace(q, k, k, seg, seg, slopes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("kernel_hash") == kernels


@pytest.mark.parametrize("nproc, warns", [("2", True), ("3", False), ("8", False)])
def test_mosaic_interpret_warns_when_callback_threads_are_few(monkeypatch, nproc, warns):
    """Mosaic GPU interpret mode runs a CTA's 3 warpgroups as host callbacks that wait on one
    another: fewer XLA CPU threads (NPROC, else one per core) than that can hang, so it says so."""
    monkeypatch.setenv("NPROC", nproc)
    mosaic_gpu._warn_if_callback_threads_are_few.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mosaic_gpu._interpret_params(True) is not None
    mosaic_gpu._warn_if_callback_threads_are_few.cache_clear()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert bool(said) == warns
    if warns:
        assert "needs 3 host-callback threads" in said[0] and "has 2" in said[0]
        assert "NPROC=4" in said[0]
