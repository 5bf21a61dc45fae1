"""pallas_kernels.causal_conv1d: the Triton kernel (interpret mode) against the float32 plain-JAX
form, forward and the gradients of x, kernel and bias, on fresh random inputs; the plain-JAX form
against ``lax.conv_general_dilated``; dispatch, errors, the abstract-H100 lowering, and the
``CausalConv1d`` layer running it per device on a sharded mesh.

Tolerances (``assert_close``: relative to the largest reference magnitude): float32 1e-5 (the
same float32 sums in another order); bfloat16 1e-2 against the reference on the same rounded
inputs and cotangent (outputs and ``dx`` are rounded to bfloat16, ~4e-3; ``dkernel``/``dbias``
are float32 sums).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import assert_close, verified_triton_modules

from meshlm import sharding
from meshlm.config import MeshConfig
from meshlm.layers.conv import CausalConv1d
from pallas_kernels import lowering_for
from pallas_kernels.causal_conv1d import causal_conv1d, reference, triton
from pallas_kernels.causal_conv1d.api import DISPATCH
from pallas_kernels.causal_conv1d.common import Call

pytestmark = pytest.mark.usefixtures("fast_compile")

BATCH, LENGTH, CHANNELS, K = 2, 37, 70, 4
TILES = triton.Tiles(block_t=16, block_c=32, num_warps=4)  # 37 = 2 * 16 + 5, 70 = 2 * 32 + 6
# A program walks 2 blocks: the last program's second block is past the end.
LOOP_TILES = triton.Tiles(block_t=16, block_c=32, num_warps=4, blocks=2)
SPLIT_TILES = triton.Tiles(block_t=16, block_c=32, num_warps=4, blocks=2, split_bwd=True)
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}
# Row 0: documents starting at 0, 10 (inside a tile) and 16 (a tile edge), then one of 2 steps
# (shorter than the kernel); row 1 continues a document begun 2 steps before the call.
DOC_POS = np.stack([np.r_[np.arange(10), np.arange(6), np.arange(2), np.arange(19)],
                    np.arange(LENGTH) + 2]).astype(np.int32)


def _inputs(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (BATCH, LENGTH, CHANNELS), jnp.float32).astype(dtype)
    kernel = jax.random.normal(k[1], (K, CHANNELS), jnp.float32)
    bias = jax.random.normal(k[2], (CHANNELS,), jnp.float32)
    dy = jax.random.normal(k[3], x.shape, jnp.float32).astype(dtype)
    return x, kernel, bias, dy


def _value_and_grads(fn, x, kernel, bias, dy):
    y, vjp = jax.vjp(fn, x, kernel, bias)
    return y, vjp(dy)


@pytest.mark.parametrize("dtype,activation,documents,with_bias,tiles", [
    (jnp.float32, "silu", True, True, TILES),
    (jnp.float32, None, True, True, TILES),
    (jnp.bfloat16, "silu", True, True, TILES),
    (jnp.float32, "silu", False, False, TILES),
    (jnp.float32, "silu", True, True, LOOP_TILES),
    (jnp.float32, "silu", True, True, SPLIT_TILES),
    (jnp.bfloat16, "silu", True, True, SPLIT_TILES),
    (jnp.float32, None, True, False, SPLIT_TILES),
], ids=["f32-silu-docs", "f32-docs", "bf16-silu-docs", "f32-silu-plain", "f32-loop",
        "f32-split", "bf16-split", "f32-split-linear"])
def test_triton_matches_float32_reference(dtype, activation, documents, with_bias, tiles):
    x, kernel, bias, dy = _inputs(dtype)
    doc_pos = jnp.asarray(DOC_POS) if documents else None
    if not with_bias:
        bias = None

    def run(x, kernel, b):
        return causal_conv1d(x, kernel, b if with_bias else None, doc_pos, activation=activation,
                             implementation="triton", interpret=True, tiles=tiles)

    def oracle(x, kernel, b):
        return reference.causal_conv1d(x, kernel, b if with_bias else None, doc_pos,
                                       activation=activation)

    b = bias if with_bias else jnp.zeros((CHANNELS,))
    got = jax.jit(lambda *a: _value_and_grads(run, *a))(x, kernel, b, dy)
    f32 = lambda v: v.astype(jnp.float32)
    want = _value_and_grads(oracle, f32(x), kernel, b, f32(dy))
    assert got[0].dtype == dtype and got[1][0].dtype == dtype
    tol = TOL[jnp.dtype(dtype)]
    assert_close("y", got[0], want[0], tol)
    names = ("dx", "dkernel", "dbias") if with_bias else ("dx", "dkernel")
    for name, g, w in zip(names, got[1], want[1]):
        assert_close(name, g, w, tol)
    if documents:  # the first step of a document ignores the previous one's inputs
        start = 16
        moved = x.at[0, start - 3:start].add(1.0)
        assert_close("y", jax.jit(run)(moved, kernel, b)[0, start:], got[0][0, start:], 0.0)


def test_reference_matches_lax_conv():
    """The plain-JAX form is PyTorch's ``Conv1d(groups=channels, padding=K - 1)`` truncated."""
    x, kernel, bias, _ = _inputs(jnp.float32, seed=1)
    got = reference.causal_conv1d(x, kernel, bias)
    want = jax.lax.conv_general_dilated(
        x, kernel[:, None, :], window_strides=(1,), padding=[(K - 1, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=CHANNELS,
        precision=jax.lax.Precision.HIGHEST) + bias
    assert_close("y", got, want, 1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(x=jnp.ones((2, 8))), r"x must be \(batch, length, channels\)"),
    (dict(x=jnp.ones((2, 8, 6), jnp.int32)), "x must be bfloat16, float16 or float32"),
    (dict(kernel=jnp.ones((4, 5))), r"kernel must be \(K, channels\) with K >= 1 and channels = 6"),
    (dict(kernel=jnp.ones((4, 6), jnp.int32)), "kernel must be a float array"),
    (dict(bias=jnp.ones((5,))), r"bias must be \(channels,\) = \(6,\)"),
    (dict(doc_pos=jnp.ones((2, 8))), r"doc_pos must be an int \(batch, length\) = \(2, 8\)"),
    (dict(activation="relu"), r"activation must be one of \(None, 'silu'\)"),
    (dict(implementation="cuda"), "implementation must be one of"),
    (dict(implementation="triton"), "needs a GPU backend, got cpu"),
    (dict(implementation="triton", interpret=True, tiles=triton.Tiles(16, 24, 4)),
     r"tiles.block_c \(24\) must be a power of two"),
    (dict(implementation="triton", interpret=True, tiles=triton.Tiles(16, 32, 4, split_bwd=1)),
     r"tiles.split_bwd must be True or False, got 1"),
])
def test_bad_input_is_a_clear_error(change, message):
    args = dict(x=jnp.ones((2, 8, 6)), kernel=jnp.ones((4, 6)), bias=None, doc_pos=None)
    args.update({k: change.pop(k) for k in list(change) if k in args})
    with pytest.raises(ValueError, match=message):
        causal_conv1d(**args, **change)


def test_auto_is_xla_on_cpu_and_the_kernel_lowers_for_an_abstract_gpu():
    """"auto" is the plain-JAX form on this CPU host (interpret never changes it) and the Triton
    kernel with its default tiles for an H100, whose forward and backward (split by default: two
    kernels; fused: one) lower for CUDA and pass the MLIR verifier."""
    call = Call((BATCH, LENGTH, CHANNELS), K, True, True, "silu")
    assert DISPATCH.choose("auto", call, interpret=True) == ("xla", None)
    sds = jax.ShapeDtypeStruct
    args = (sds((1, 300, 200), jnp.bfloat16), sds((K, 200), jnp.float32),
            sds((200,), jnp.float32), sds((1, 300), jnp.int32))

    def fwd_bwd(x, kernel, bias, doc_pos, implementation="auto", tiles=None):
        fn = functools.partial(causal_conv1d, doc_pos=doc_pos, activation="silu",
                               implementation=implementation, tiles=tiles)
        y, vjp = jax.vjp(fn, x, kernel, bias)
        return vjp(jnp.ones(y.shape, y.dtype))

    fused = functools.partial(fwd_bwd, implementation="triton",
                              tiles=triton.Tiles(32, 64, 4, split_bwd=False))
    with verified_triton_modules() as checked, lowering_for("NVIDIA H100"):
        assert DISPATCH.choose("auto", call, interpret=False) == (
            "triton", triton.DEFAULT_TILES[""])
        assert triton.DEFAULT_TILES[""].split_bwd
        texts = [jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
                 for f in (fwd_bwd, fused)]
    assert [t.count("__gpu$xla.gpu.triton") for t in texts] == [3, 2] and checked[0] == 5


@pytest.mark.parametrize("channels,channel_axes", [
    ((16,), ("inner",)),  # Mamba's conv_x: channels split over "tensor"
    ((2, 1, 8), (None, None, "state")),  # Mamba-2's conv_bc: flattened for the call
], ids=["inner", "bc"])
def test_layer_runs_the_kernel_per_device(channels, channel_axes):
    """On 8 devices (data=4, tensor=2) ``CausalConv1d`` runs the kernel on each device's rows and
    channels (``per_shard``) and matches the plain-JAX layer, output and parameter gradients."""
    x = jax.random.normal(jax.random.key(3), (4, 12, *channels), jnp.float32)
    doc_pos = jnp.asarray(np.tile(np.r_[np.arange(5), np.arange(7)], (4, 1)))
    layer = CausalConv1d(K, channel_axes, activation="silu")
    params = layer.init(jax.random.key(4), x)["params"]
    mesh_cfg = MeshConfig(data=4, tensor=2)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.axis_rules(mesh_cfg)

    def run(impl):
        m = layer.clone(implementation=impl, interpret=impl == "triton")
        loss = lambda p, v: jnp.sum(jnp.sin(m.apply({"params": p}, v, None, doc_pos)[0]))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    with sharding.activate(mesh, rules):
        got = run("triton")
    want = run("xla")
    assert_close("loss", got[0], want[0], 1e-5)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert_close("gradient", g, w, 1e-5)
