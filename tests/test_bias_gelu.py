"""``pallas_kernels.bias_gelu``: GPT-2's ``gelu_tanh(h + bias)`` against autodiff of
``jax.nn.gelu(approximate=True)`` (values, both gradients, what the VJP saves), the Triton backward
(interpret mode) against the reference on fresh inputs, the MLP layer's parameters and gradients
through it, bad arguments, and the choice "auto" makes."""

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm.layers.mlp import Mlp
from pallas_kernels import lowering_for
from pallas_kernels.bias_gelu import bias_gelu, reference, triton
from pallas_kernels.bias_gelu.common import Call

TRITON = dict(implementation="triton", interpret=True)


def _seed():
    return int(np.random.default_rng().integers(2**31))


def _inputs(seed, shape, dtype):
    """Pre-activations spanning both tails of the GELU, a bias, an output gradient."""
    k = jax.random.split(jax.random.key(seed), 3)
    h = (4.0 * jax.random.normal(k[0], shape)).astype(dtype)
    bias = jax.random.normal(k[1], shape[-1:]).astype(dtype)
    g = jax.random.normal(k[2], shape).astype(dtype)
    return h, bias, g


def _autodiff(h, bias, g):
    """Value and ``(dh, dbias)`` of ``jax.nn.gelu(h + bias)`` by autodiff, float32."""
    f32 = lambda a: a.astype(jnp.float32)
    y, vjp = jax.vjp(lambda h, b: jax.nn.gelu(h + b, approximate=True), f32(h), f32(bias))
    return y, vjp(f32(g))


@pytest.mark.parametrize("impl", [dict(implementation="xla"), TRITON], ids=["xla", "triton"])
@pytest.mark.parametrize("shape, tiles", [((3, 37, 300), triton.Tiles(8, 128, 32, 4)),
                                          ((2, 64, 256), None)],  # default tiles
                         ids=["ragged", "default"])
def test_matches_autodiff_float32(impl, shape, tiles):
    """float32: value, dh and dbias to 1e-5 relative of the largest entry (the same float32
    math; the kernel's derivative is written out and its column sums run in another order),
    rows and features that fill no tile included."""
    seed = _seed()
    h, bias, g = _inputs(seed, shape, jnp.float32)
    kw = dict(impl, tiles=tiles) if impl is TRITON else impl
    y, vjp = jax.vjp(lambda h, b: bias_gelu(h, b, **kw), h, bias)
    want_y, (want_dh, want_db) = _autodiff(h, bias, g)
    dh, db = vjp(g)
    for got, want in ((y, want_y), (dh, want_dh), (db, want_db)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0, err_msg=f"seed {seed}")


@pytest.mark.parametrize("impl", [dict(implementation="xla"), TRITON], ids=["xla", "triton"])
def test_bfloat16_and_no_bias(impl):
    """bfloat16 (gradients stay bfloat16; one rounding of float32 math, 1e-2 relative L2), and
    without a bias (its gradient absent)."""
    seed = _seed()
    h, bias, g = _inputs(seed, (4, 50, 192), jnp.bfloat16)
    _, (want_dh, want_db) = _autodiff(h, bias, g)
    dh, db = jax.vjp(lambda h, b: bias_gelu(h, b, **impl), h, bias)[1](g)
    assert dh.dtype == db.dtype == jnp.bfloat16
    for got, want in ((dh, want_dh), (db, want_db)):
        err = jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want)
        assert float(err) < 1e-2, f"seed {seed}: {float(err)}"
    dh_alone = jax.vjp(lambda h: bias_gelu(h, **impl), h + bias)[1](g)[0]
    np.testing.assert_allclose(np.asarray(dh_alone, np.float32),
                               np.asarray(reference.backward(h + bias, g)[0], np.float32),
                               rtol=1e-2, atol=1e-2)


def test_saves_only_the_pre_activation(capsys):
    """The VJP keeps the pre-activation alone; autodiff of ``jax.nn.gelu`` also saves tanh terms,
    activation-sized arrays written forward and read backward."""
    h, bias, _ = _inputs(_seed(), (64, 96), jnp.float32)

    def saved(act):
        jax.ad_checkpoint.print_saved_residuals(lambda h, b: jnp.sum(act(h, b)), h, bias)
        return [line for line in capsys.readouterr().out.splitlines() if "[64,96]" in line]

    ours = saved(lambda h, b: bias_gelu(h, b, implementation="xla"))
    assert len(ours) == 1 and ours[0].startswith("f32[64,96] output of add"), ours
    assert len(saved(lambda h, b: jax.nn.gelu(h + b, approximate=True))) > 1


@pytest.mark.parametrize("kernel", [False, True], ids=["xla", "triton"])
def test_mlp_keeps_dense_parameters_and_gradients(kernel):
    """The GELU MLP's ``wi`` has ``nn.Dense``'s parameters (names, shapes, logical axes, initial
    values), and its output and gradients are those of ``nn.Dense`` + ``jax.nn.gelu``, with the
    XLA path or the kernel (interpret mode)."""
    seed = _seed()
    x = jax.random.normal(jax.random.key(seed), (2, 24, 32))
    mlp = Mlp(d_ff=160, implementation="triton" if kernel else "xla", interpret=kernel)
    variables = mlp.init(jax.random.key(1), x)

    class Plain(nn.Module):  # the layer as nn.Dense + jax.nn.gelu
        @nn.compact
        def __call__(self, x):
            dense = lambda f, axes, name: nn.Dense(f, kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), axes), bias_init=nn.with_logical_partitioning(
                nn.initializers.zeros, axes[1:]), name=name)
            h = jax.nn.gelu(dense(160, ("embed", "mlp"), "wi")(x), approximate=True)
            return dense(32, ("mlp", "embed"), "wo")(h)

    plain = Plain().init(jax.random.key(1), x)
    boxes = lambda v: jax.tree.map(lambda p: (p.value.shape, p.names), v,
                                   is_leaf=lambda p: isinstance(p, nn.Partitioned))
    assert boxes(variables) == boxes(plain)
    np.testing.assert_array_equal(nn.unbox(variables)["params"]["wi"]["kernel"],
                                  nn.unbox(plain)["params"]["wi"]["kernel"])
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1),
                                                                p.shape), nn.unbox(variables))
    loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
    got, want = jax.grad(loss(mlp))(params), jax.grad(loss(Plain()))(params)
    np.testing.assert_allclose(mlp.apply(params, x), Plain().apply(params, x), atol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                                   err_msg=f"seed {seed}")


@pytest.mark.parametrize("mesh_shape", [dict(data=2, tensor=2), dict(fsdp=2, sequence=2)],
                         ids=["data-tensor", "fsdp-sequence"])
def test_kernel_runs_per_device_on_a_mesh(mesh_shape):
    """On a mesh the kernel (interpret mode) runs inside shard_map on each device's rows and
    columns: the loss and every gradient (the bias's summed over the row shards) equal the
    single-device XLA path's."""
    from meshlm import sharding
    from meshlm.config import MeshConfig

    seed = _seed()
    x = jax.random.normal(jax.random.key(seed), (4, 8, 32))
    mesh_cfg = MeshConfig(**mesh_shape)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4])
    kernel, plain = Mlp(d_ff=64, implementation="triton", interpret=True), Mlp(d_ff=64,
                                                                              implementation="xla")
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1),
                                                                p.shape),
                          nn.unbox(plain.init(jax.random.key(1), x)))
    loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
    want_value, want_grad = jax.value_and_grad(loss(plain))(params)
    with sharding.activate(mesh, sharding.axis_rules(mesh_cfg)):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss(kernel)))(params))
        value, grad = jax.jit(jax.value_and_grad(loss(kernel)))(params)
    assert "shard_map" in jaxpr and "bias_gelu_bwd" in jaxpr
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                                   err_msg=f"seed {seed}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(h=jnp.ones((2, 8), jnp.int32)), "h must be bfloat16, float16 or float32"),
    (dict(bias=jnp.ones((7,))), r"bias must have shape \(features,\) = \(8,\)"),
    (dict(tiles=triton.Tiles(12, 128, 48, 4), **TRITON), r"block_rows \(12\) must be a power"),
    (dict(tiles=triton.Tiles(16, 128, 40, 4), **TRITON), r"rows_per_program \(40\) must be a "
                                                         r"multiple of tiles.block_rows \(16\)"),
    (dict(tiles=triton.Tiles(64, 256, 64, 4), **TRITON), "exceeds the 8192 values"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(h=jnp.ones((2, 8)), bias=jnp.ones((8,))) | kwargs
    with pytest.raises(ValueError, match=match):
        bias_gelu(args.pop("h"), args.pop("bias"), **args)


@pytest.mark.parametrize("implementation, kernel", [("triton", True), ("auto", False)])
def test_the_kernel_lowers_for_a_gpu_and_auto_waits_for_its_timing(implementation, kernel):
    """Named, the Triton backward lowers for an H100 with its default tiles; "auto" keeps XLA's
    fusion there until the kernel is timed (``triton.auto_declines``), and on this CPU."""
    h = jax.ShapeDtypeStruct((8, 128, 3072), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((3072,), jnp.bfloat16)
    fn = jax.jit(jax.grad(lambda h, b: bias_gelu(h, b, implementation=implementation).astype(
        jnp.float32).sum(), (0, 1)))
    with lowering_for("NVIDIA H100"):
        gpu = fn.trace(h, bias).lower(lowering_platforms=("cuda",)).as_text()
        assert triton.supports(Call(1024, 3072), triton.default_tiles(Call(1024, 3072))) is None
    assert ("bias_gelu_bwd" in gpu) == kernel
    if not kernel:
        assert "bias_gelu_bwd" not in fn.trace(h, bias).lower().as_text()
