"""The LayerNorm / RMSNorm kernels against their plain-JAX reference: outputs and every gradient
on fresh random inputs with a non-zero mean (float32 and bfloat16, with and without centring and
bias, rows and channels that fill no block), the reference against Flax's layers, bad input, and
the choice "auto" makes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kernel_checks import rel_err, verified_triton_modules
from pallas_kernels import lowering_for
from pallas_kernels.layer_norm import layer_norm, reference, triton
from pallas_kernels.layer_norm.api import DISPATCH
from pallas_kernels.layer_norm.common import Call

pytestmark = pytest.mark.usefixtures("fast_compile")

FORMS = {"layernorm": (True, True), "layernorm-nobias": (True, False), "rmsnorm": (False, False)}


def _inputs(shape, dtype, seed):
    k = jax.random.split(jax.random.key(seed), 4)
    x = (0.7 + 1.5 * jax.random.normal(k[0], shape)).astype(dtype)
    dout = jax.random.normal(k[1], shape).astype(dtype)
    scale = 1.0 + 0.3 * jax.random.normal(k[2], (shape[-1],))
    bias = 0.5 * jax.random.normal(k[3], (shape[-1],))
    return x, scale, bias, dout


# float32: products and sums are float32 in both (1e-5); bf16: the inputs are bf16 in both but the
# kernel stores its gradients in bf16 straight from float32 (one rounding, 1e-2).
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tiles", [None, triton.Tiles(2, 4, 4), triton.Tiles(2, 8, 4, 2)],
                         ids=["default", "2x4x4", "2x8x4x2"])
def test_triton_matches_reference(dtype, tol, form, tiles):
    """111 rows (no whole block), 96 channels (padded to 128); the 2x4x4 tiles run 28 backward
    programs, each summing its rows' share of dscale and dbias."""
    subtract_mean, biased = FORMS[form]
    x, scale, bias, dout = _inputs((3, 37, 96), dtype, seed=len(form))
    bias = bias if biased else None
    f32 = lambda v: v.astype(jnp.float32)

    def value_and_grads(fn, x, dout):
        params = (scale, bias) if biased else (scale,)
        out, vjp = jax.vjp(lambda x, *p: fn(x, *p), x, *params)
        return (out, *vjp(dout))

    got = value_and_grads(lambda *a: layer_norm(
        *a, subtract_mean=subtract_mean, implementation="triton", interpret=True, tiles=tiles),
        x, dout)
    want = value_and_grads(lambda x, s, b=None: reference.layer_norm(
        x, s, b, subtract_mean=subtract_mean, epsilon=1e-5, dtype=jnp.float32), f32(x),
        f32(dout))
    for name, g, w in zip(("out", "dx", "dscale", "dbias"), got, want, strict=False):
        assert g.dtype == (dtype if name in ("out", "dx") else jnp.float32), name
        assert rel_err(g, w) < tol, (name, rel_err(g, w))
    assert len(got) == len(want) == (4 if biased else 3)


@pytest.mark.parametrize("form", FORMS)
def test_reference_is_flax(form):
    """The reference is Flax's ``LayerNorm(use_fast_variance=False)`` / ``RMSNorm`` (the layers
    meshlm's norms replace), bfloat16 in and out with float32 parameters."""
    subtract_mean, biased = FORMS[form]
    x, scale, bias, _ = _inputs((4, 10, 64), jnp.bfloat16, seed=3)
    params = {"scale": scale, **({"bias": bias} if biased else {})}
    layer = (nn.LayerNorm(use_bias=biased, use_fast_variance=False, dtype=jnp.bfloat16)
             if subtract_mean else nn.RMSNorm(dtype=jnp.bfloat16))
    want = layer.apply({"params": params}, x)
    got = reference.layer_norm(x, scale, bias if biased else None, subtract_mean=subtract_mean,
                               epsilon=1e-6, dtype=jnp.bfloat16)
    assert got.dtype == want.dtype and rel_err(got, want) < 4e-3, rel_err(got, want)


def test_auto_and_the_kernels_lowered_for_an_abstract_gpu():
    """"auto" is the reference on this CPU host (bit-identical); for an H100 it takes the kernels
    for LayerNorm (measured faster in a train step) and XLA's form for RMSNorm (measured as
    fast). The forward and backward lower for CUDA and pass the MLIR verifier."""
    x, scale, bias, _ = _inputs((2, 5, 48), jnp.float32, seed=7)
    auto = layer_norm(x, scale, bias)
    assert (auto == reference.layer_norm(x, scale, bias, subtract_mean=True, epsilon=1e-5,
                                         dtype=jnp.float32)).all()
    sds = jax.ShapeDtypeStruct
    args = (sds((4, 300, 768), jnp.bfloat16), sds((768,), jnp.float32), sds((768,), jnp.float32))

    def fwd_bwd(x, scale, bias, subtract_mean=True):
        fn = lambda *a: layer_norm(*a, subtract_mean=subtract_mean)
        out, vjp = jax.vjp(fn, x, scale, bias)
        return vjp(jnp.ones(out.shape, out.dtype))

    with verified_triton_modules() as checked, lowering_for("NVIDIA H100"):
        assert DISPATCH.choose("auto", Call(1200, 1, 768, True), interpret=False) == (
            "triton", triton.default_tiles(Call(1200, 1, 768, True)))
        assert DISPATCH.choose("auto", Call(1200, 1, 768), interpret=False) == ("xla", None)
        texts = [jax.jit(fwd_bwd, static_argnums=3).trace(*args, centred).lower(
            lowering_platforms=("cuda",)).as_text() for centred in (True, False)]
    assert [t.count("__gpu$xla.gpu.triton") for t in texts] == [2, 0] and checked[0] == 2


def test_backward_pipeline_depth_reaches_the_kernel():
    """``Tiles.bwd_stages`` is the lowered backward kernel's ``num_stages`` (its row-block loop);
    the forward, which has no loop, keeps 1."""
    sds = jax.ShapeDtypeStruct
    args = (sds((4, 300, 768), jnp.bfloat16), sds((768,), jnp.float32), sds((768,), jnp.float32))

    def fwd_bwd(x, scale, bias):
        fn = lambda *a: layer_norm(*a, implementation="triton", tiles=triton.Tiles(4, 64, 8, 3))
        out, vjp = jax.vjp(fn, x, scale, bias)
        return vjp(jnp.ones(out.shape, out.dtype))

    with lowering_for("NVIDIA H100"):
        text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    stages = {name: line.split("num_stages = ")[1].split(" ")[0] for line in calls
              for name in ("layer_norm_fwd", "layer_norm_bwd") if f'name = "{name}' in line}
    assert stages == {"layer_norm_fwd": "1", "layer_norm_bwd": "3"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=jnp.ones((2, 8), jnp.int32)), "x must be bfloat16, float16 or float32"),
    (dict(scale=jnp.ones((7,))), r"scale must have shape \(features,\) = \(8,\)"),
    (dict(bias=jnp.ones((8, 1))), r"bias must have shape \(features,\) = \(8,\)"),
    (dict(epsilon=0.0), "epsilon must be > 0"),
    (dict(x=jnp.ones((2, 0)), scale=jnp.ones((0,))), "features >= 1"),
    (dict(implementation="triton", interpret=True, tiles=triton.Tiles(3, 6, 4)),
     "block_rows .* must be a power of two"),
    (dict(implementation="triton", interpret=True, tiles=triton.Tiles(2, 4, 4, 0)),
     "tiles.bwd_stages must be a positive int, got 0"),
    (dict(implementation="triton", interpret=True, tiles=triton.Tiles(16, 16, 4),
          x=jnp.ones((2, 1024)), scale=jnp.ones((1024,))), "exceeds the 8192 values"),
])
def test_bad_input(kwargs, match):
    args = dict(x=jnp.ones((2, 8)), scale=jnp.ones((8,)))
    args |= kwargs
    with pytest.raises(ValueError, match=match):
        layer_norm(args.pop("x"), args.pop("scale"), **args)
