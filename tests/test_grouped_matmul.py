"""pallas_kernels.grouped_matmul: the Triton kernels in interpret mode (and compiled, and JAX's
Hopper kernels, where a GPU is present) against the float32 reference, forward and both
gradients on fresh random inputs; the dispatch; bad input.

Tolerance: relative to the largest reference magnitude (``kernel_checks.assert_close``), 1e-5
for float32 (exact float32 products in interpret mode; tf32 compiled: 2e-2), 2e-2 for bfloat16
operands against the reference on the same rounded inputs (outputs rounded to bfloat16).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernel_checks import NEEDS_GPU, NEEDS_HOPPER, assert_close, verified_triton_modules

from pallas_kernels import lowering_for
from pallas_kernels.grouped_matmul import grouped_matmul, mosaic_gpu, reference, triton
from pallas_kernels.grouped_matmul.api import DISPATCH, Call

pytestmark = pytest.mark.usefixtures("fast_compile")

_KT = triton.KernelTiles(16, 16, 16, 4, 1)
TINY = triton.Tiles(_KT, _KT, _KT)

# (m, k, n, group sizes, dtype): zero-sized groups, groups that are no multiple of the 16-row
# block and several groups in one block, a sum below m (trailing rows get zeros), one group.
CASES = {
    "ragged_sum_below_m": (70, 40, 36, [0, 13, 30, 0, 20], jnp.float32),
    "single_group": (33, 24, 20, [33], jnp.float32),
    "bfloat16_blocks_straddled": (48, 32, 48, [5, 3, 27, 13], jnp.bfloat16),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(m, k, n, groups, dtype, seed=None):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
    return normal(m, k), normal(groups, k, n), normal(m, n)


def _fwd_bwd(lhs, rhs, group_sizes, dout, **kwargs):
    """``(out, d_lhs, d_rhs)`` of one jitted VJP; ``kwargs`` empty: the float32 reference."""

    def fn(a, b):
        if not kwargs:
            return reference.grouped_matmul(a, b, group_sizes)
        return grouped_matmul(a, b, group_sizes, **kwargs)

    @jax.jit
    def run(lhs, rhs, dout):
        out, vjp = jax.vjp(fn, lhs, rhs)
        return (out, *vjp(dout.astype(out.dtype)))

    return run(lhs, rhs, dout)


def _check(m, k, n, sizes, dtype, tol=None, **kwargs):
    group_sizes = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, dout = _inputs(m, k, n, len(sizes), dtype)
    got = _fwd_bwd(lhs, rhs, group_sizes, dout, **kwargs)
    f32 = lambda x: x.astype(jnp.float32)
    want = _fwd_bwd(f32(lhs), f32(rhs), group_sizes, f32(dout))
    for name, g, w, like in zip(("out", "d_lhs", "d_rhs"), got, want, (lhs, lhs, rhs)):
        assert g.shape == like.shape[:-1] + (w.shape[-1],) and g.dtype == dtype, (name, g.dtype)
        assert_close(name, g, w, tol or TOL[dtype])
    past = int(np.sum(sizes))
    assert not np.asarray(got[0][past:], np.float32).any(), "rows past the sum must be zero"
    assert not np.asarray(got[1][past:], np.float32).any(), "their gradient must be zero"
    return got


@pytest.mark.parametrize("case", CASES)
def test_triton_interpret_matches_reference(case):
    _check(*CASES[case], implementation="triton", interpret=True, tiles=TINY)


def test_triton_under_vmap():
    """A batch of independent grouped matmuls (each with its own group sizes), output and
    gradients, by pallas_call's batching rule."""
    lhs, rhs, dout = _inputs(40, 16, 16, 6, jnp.float32)
    lhs, rhs, dout = lhs.reshape(2, 20, 16), rhs.reshape(2, 3, 16, 16), dout.reshape(2, 20, 16)
    sizes = jnp.array([[10, 0, 7], [20, 0, 0]], jnp.int32)
    kernel = lambda a, b, s: grouped_matmul(a, b, s, implementation="triton", interpret=True,
                                            tiles=TINY)

    def fwd_bwd(fn):
        out, vjp = jax.vjp(lambda a, b: jax.vmap(fn)(a, b, sizes), lhs, rhs)
        return (out, *vjp(dout))

    for name, g, w in zip(("out", "d_lhs", "d_rhs"), fwd_bwd(kernel),
                          fwd_bwd(reference.grouped_matmul)):
        assert_close(name, g, w, 1e-5)


def test_xla_is_ragged_dot_and_matches_reference():
    """``"xla"`` (jax.lax.ragged_dot and its autodiff) against the reference, and
    ``preferred_element_type`` giving a float32 result from bfloat16 operands."""
    _check(*CASES["ragged_sum_below_m"], implementation="xla")
    lhs, rhs, _ = _inputs(20, 16, 8, 2, jnp.bfloat16)
    sizes = jnp.array([7, 9], jnp.int32)
    out = grouped_matmul(lhs, rhs, sizes, implementation="xla", preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    assert_close("out", out, reference.grouped_matmul(lhs, rhs, sizes, jnp.float32), 1e-5)


def test_triton_float32_result_from_bfloat16_and_work_items():
    """A float32 result from bfloat16 operands; every row of every group is visited once by
    ``work_items`` and the surplus visits are empty."""
    lhs, rhs, _ = _inputs(40, 16, 16, 3, jnp.bfloat16)
    sizes = jnp.array([17, 0, 15], jnp.int32)
    out = grouped_matmul(lhs, rhs, sizes, implementation="triton", interpret=True, tiles=TINY,
                         preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    assert_close("out", out, reference.grouped_matmul(lhs, rhs, sizes, jnp.float32), 1e-5)
    group, block, lo, hi = map(np.asarray, triton.work_items(sizes, 40, 16))
    covered = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
    np.testing.assert_array_equal(np.sort(covered), np.arange(40))  # incl. the rows past the sum
    assert np.all((lo // 16 == block) | (lo == hi)) and np.all(hi - lo <= 16)
    # group 0: rows 0..16 (blocks 0, 1), 2: 17..31 (block 1), 3 = past the sum: 32..39 (block 2)
    np.testing.assert_array_equal(group[lo < hi], [0, 0, 2, 3])


@pytest.mark.parametrize("k", [96, 128])
def test_triton_kernels_lower_to_modules_the_gpu_accepts(k):
    """Forward and both gradients lowered for an H100 with the device-default tiles: every Triton
    module passes the verifier (k = 128 is one contraction step, where the loop bound was once a
    bool and the device refused the module)."""
    lhs, rhs = jnp.ones((300, k), jnp.bfloat16), jnp.ones((4, k, 160), jnp.bfloat16)
    sizes = jnp.array([0, 100, 77, 90], jnp.int32)

    def fwd_bwd(a, b):
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, implementation="triton"),
                           a, b)
        return out, vjp(out)

    with verified_triton_modules() as checked, lowering_for("NVIDIA H100 80GB HBM3"):
        jax.jit(fwd_bwd).trace(lhs, rhs).lower(lowering_platforms=("cuda",))
    assert checked[0] == 3


@NEEDS_GPU
def test_triton_compiled_default_tiles():
    _check(300, 96, 160, [0, 100, 77, 90], jnp.bfloat16, implementation="triton")
    _check(300, 96, 160, [120, 0, 150, 30], jnp.float32, tol=2e-2, implementation="triton")


@NEEDS_HOPPER
def test_mosaic_gpu_compiled_default_tiles():
    """JAX's Hopper kernels (compiled only): shapes that meet their 64/128-multiple tiles."""
    _check(304, 128, 256, [0, 100, 77, 90], jnp.bfloat16, implementation="mosaic_gpu")
    _check(512, 256, 128, [64, 0, 448, 0], jnp.bfloat16, implementation="mosaic_gpu")


def test_dispatch():
    """"auto" is "xla" on CPU; Triton needs power-of-2 tiles; the Hopper kernels state their
    constraints and have no interpret mode; tiles need a named lowering."""
    call = Call(64, 32, 48, 4, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))
    assert DISPATCH.choose("auto", call, interpret=True) == ("xla", None)
    with lowering_for("NVIDIA H200"):  # the measured fastest where it applies, else ragged_dot
        hopper_call = Call(304, 128, 256, 4, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))
        assert DISPATCH.choose("auto", hopper_call, interpret=False)[0] == "triton"
    bad = triton.Tiles(_KT, triton.KernelTiles(16, 24, 16, 4, 1), _KT)
    assert "tiles.dlhs.block_k (24) must be a power of two" in triton.supports(call, bad)
    warps = triton.Tiles(_KT, _KT, triton.KernelTiles(16, 16, 16, 6, 1))
    assert "tiles.drhs.num_warps (6) must be a power of two" in triton.supports(call, warps)
    hopper = mosaic_gpu.default_tiles(call)
    assert "multiple of tiles.fwd.block_k (64)" in mosaic_gpu.supports(call, hopper)
    wide = call._replace(k=64)
    assert "multiple of tiles.fwd.block_n (128)" in mosaic_gpu.supports(wide, hopper)
    assert "bfloat16 or float16" in mosaic_gpu.supports(call._replace(dtype=jnp.float32), hopper)
    ok = Call(1000, 1024, 2304, 8, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))
    assert mosaic_gpu.supports(ok, hopper) is None
    assert "m (1001) must be a multiple of 8" in mosaic_gpu.supports(ok._replace(m=1001), hopper)
    lhs, rhs, _ = _inputs(8, 64, 128, 2, jnp.bfloat16)
    sizes = jnp.array([3, 4], jnp.int32)
    with pytest.raises(ValueError, match="no interpret mode"):
        grouped_matmul(lhs, rhs, sizes, implementation="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="name it with implementation="):
        grouped_matmul(lhs, rhs, sizes, tiles=TINY)
    with pytest.raises(ValueError, match="implementation must be one of"):
        grouped_matmul(lhs, rhs, sizes, implementation="cuda")


def test_lowers_for_a_hopper_gpu_ahead_of_time():
    """Lowered on this host for an H200: the Triton kernels at their default tiles (forward,
    d_lhs, d_rhs: three Triton calls, no ragged_dot), and JAX's Hopper forward kernel
    lowers with the default tiles, rhs read plain and transposed (its rhs-gradient kernel asks
    the local device for its SM count, so it lowers only on a GPU)."""
    sizes = jnp.array([100, 0, 120, 50], jnp.int32)

    def fwd_bwd(lhs, rhs, dout):
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, implementation="triton"),
                           lhs, rhs)
        return (out, *vjp(dout))

    with lowering_for("NVIDIA H200"):
        for shape in ((300, 72, 100), (304, 128, 256)):  # masked edges; whole tiles
            lhs, rhs, dout = _inputs(*shape, 4, jnp.bfloat16)
            text = jax.jit(fwd_bwd).trace(lhs, rhs, dout).lower(lowering_platforms=("cuda",))
            assert text.as_text().count("__gpu$xla.gpu.triton") == 3
            assert "ragged" not in text.as_text()
        tiles = mosaic_gpu.default_tiles(None).fwd
        for transpose, w in ((False, rhs), (True, jnp.swapaxes(rhs, 1, 2))):
            fn = lambda a, b: mosaic_gpu.gmm(a, b, sizes, transpose_rhs=transpose,
                                             out_dtype=a.dtype, tiles=tiles, interpret=False)
            text = jax.jit(fn).trace(lhs, w).lower(lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text


def test_inside_shard_map_sums_the_replicated_rhs_gradient():
    """Lowered for an H200 inside shard_map, rows split and rhs replicated: the kernels run per
    shard and d_rhs is summed over the shards (an all-reduce). (Interpret mode cannot run
    there: jax 0.11.2's interpreter fails on a varying ref indexed by a program id.)"""
    lhs, rhs, _ = _inputs(2 * 64, 32, 32, 3, jnp.bfloat16)
    sizes = jnp.array([[20, 0, 40], [64, 0, 0]], jnp.int32)

    def loss(lhs, rhs):
        per_shard = lambda a, b, s: grouped_matmul(a[0], b, s[0], implementation="triton")[None]
        out = jax.shard_map(per_shard, in_specs=(P("x"), P(), P("x")), out_specs=P("x"))(
            lhs.reshape(2, 64, 32), rhs, sizes)
        return jnp.sum(out.astype(jnp.float32))

    with lowering_for("NVIDIA H200"):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(lhs, rhs).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # d_lhs, d_rhs (grad drops the forward)
    assert "all_reduce" in text


@pytest.mark.parametrize("args, match", [
    (((4, 8, 2), (2, 8, 4), (2,)), r"lhs must be \(m, k\)"),
    (((4, 8), (8, 4), (2,)), r"rhs must be \(groups, k, n\)"),
    (((4, 8), (2, 6, 4), (2,)), "must have lhs's k = 8"),
    (((4, 8), (2, 8, 4), (3,)), r"group_sizes must be \(groups,\) = \(2,\)"),
])
def test_bad_shapes(args, match):
    lhs, rhs, sizes = (jnp.ones(s, jnp.float32) for s in args)
    with pytest.raises(ValueError, match=match):
        grouped_matmul(lhs, rhs, sizes.astype(jnp.int32))


def test_bad_dtypes():
    lhs, rhs, sizes = jnp.ones((4, 8)), jnp.ones((2, 8, 4)), jnp.array([1, 3], jnp.int32)
    with pytest.raises(ValueError, match="group_sizes must be integers"):
        grouped_matmul(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="same dtype, one of bfloat16, float16, float32"):
        grouped_matmul(lhs, rhs.astype(jnp.bfloat16), sizes)
    with pytest.raises(ValueError, match="same dtype"):
        grouped_matmul(lhs.astype(jnp.int32), rhs.astype(jnp.int32), sizes)
    with pytest.raises(ValueError, match="preferred_element_type must be one of"):
        grouped_matmul(lhs, rhs, sizes, preferred_element_type=jnp.int8)



def test_moe_layer_runs_the_kernels():
    """``MoeMlp(grouped_matmul="triton")`` (interpret mode) equals the ragged_dot layer, output
    and every gradient. (Not inside the expert-parallel shard_map: jax 0.11.2's interpret mode
    fails there on a varying ref indexed by a program id, "dynamic_slice requires varying manual
    axes to match"; compiled kernels do not take that path.)"""
    from flax.core import meta

    from meshlm.layers.moe import MoeMlp

    layer = MoeMlp(n_experts=4, top_k=2, d_ff=32)
    x = jnp.asarray(np.random.default_rng().standard_normal((4, 4, 16)), jnp.float32)
    params = meta.unbox(layer.init(jax.random.key(0), x)["params"])
    params = jax.tree.map(lambda p: p * 20.0, params)  # weights of order one, routing spread
    w = jnp.asarray(np.random.default_rng().standard_normal(x.shape), jnp.float32)

    def grads(implementation):
        kernel = layer.clone(grouped_matmul=implementation, interpret=True)
        loss = lambda p, x: jnp.sum(kernel.apply({"params": p}, x) * w)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    want, got = grads("xla"), grads("triton")
    for g, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close("moe", g, ref, 1e-5)


def test_moe_layer_auto_keeps_ragged_dot_where_a_kernel_would_be_gathered(monkeypatch):
    """With the experts' d_ff split over ``tensor`` (an axis the layer's shard_map leaves to the
    partitioner, which would gather a kernel's operands), "auto" stays with ragged_dot even where
    it would pick the Triton kernels (a GPU target, faked here: the Triton kernel cannot compile
    on this CPU, so picking it would fail)."""
    from flax.core import meta

    from meshlm import sharding
    from meshlm.config import load_config
    from meshlm.layers.moe import MoeMlp
    from pallas_kernels import _api

    layer = MoeMlp(n_experts=4, top_k=2, d_ff=32)
    x = jnp.asarray(np.random.default_rng().standard_normal((4, 4, 16)), jnp.float32)
    params = meta.unbox(layer.init(jax.random.key(0), x)["params"])
    cfg = load_config(None, ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2"])
    want = layer.clone(grouped_matmul="xla").apply({"params": params}, x)
    from pallas_kernels.grouped_matmul import api

    monkeypatch.setattr(_api, "target_platform", lambda: "gpu")
    # a dispatch whose "auto" takes the Triton kernels on a GPU target
    monkeypatch.setattr(api, "DISPATCH", _api.Dispatch(api.DISPATCH.package,
                                                       (_api.Lowering("triton", "gpu"),)))
    call = Call(64, 16, 32, 4, jnp.dtype(jnp.float32), jnp.dtype(jnp.float32))
    assert api.DISPATCH.choose("auto", call, interpret=False)[0] == "triton"
    with sharding.activate(sharding.make_mesh(cfg.mesh), sharding.axis_rules(cfg.mesh)):
        got = jax.jit(layer.apply)({"params": params}, x)
    assert_close("out", got, want, 1e-5)


@pytest.mark.parametrize("implementation, marker", [("auto", "__gpu$xla.gpu.triton"),
                                                     ("mosaic_gpu", "mosaic_gpu")])
def test_moe_expert_parallel_lowers_with_the_kernels(monkeypatch, implementation, marker):
    """The MoE layer on a data x expert mesh, lowered for an H200 with "auto" (the Triton
    kernels) and with JAX's Hopper kernels, forward and backward: inside the expert-parallel
    shard_map every gradient carries its input's varying axes (the Hopper kernels' outputs name
    none). The Hopper rhs-gradient kernel asks the local device for its SM count, faked here
    (this host has no GPU)."""
    import flax.linen as nn
    from flax.core import meta
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    from meshlm import sharding
    from meshlm.config import load_config
    from meshlm.layers.moe import MoeMlp

    class _Jax:  # jax, but devices() is one Hopper with its 132 SMs
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def devices():
            return [type("Device", (), {"core_count": 132})()]

    monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", _Jax())
    layer = MoeMlp(n_experts=4, top_k=2, d_ff=128, dtype=jnp.bfloat16,
                   grouped_matmul=implementation)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 128)), jnp.bfloat16)
    # (initialised on this host, where only ragged_dot runs)
    params = meta.unbox(layer.clone(grouped_matmul="xla").init(jax.random.key(0), x)["params"])
    cfg = load_config(None, ["mesh.data=2", "mesh.expert=2"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
    loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32))  # noqa: E731
    with verified_triton_modules(), lowering_for("NVIDIA H200", mesh=mesh), \
            nn.logical_axis_rules(sharding.axis_rules(cfg.mesh)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace({"params": params}, x).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "all_to_all" in text and marker in text
