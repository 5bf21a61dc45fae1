"""The gated RMSNorm kernel against its plain-JAX reference: outputs and every gradient on fresh
random inputs (float32 and bfloat16, one and several groups, rows and channels that fill no
block), bad input, and the choice "auto" makes."""

import jax
import jax.numpy as jnp
import pytest

from kernel_checks import rel_err, verified_triton_modules
from pallas_kernels import lowering_for
from pallas_kernels.gated_rms_norm import gated_rms_norm, reference, triton
from pallas_kernels.gated_rms_norm.api import DISPATCH
from pallas_kernels.layer_norm.common import Call

pytestmark = pytest.mark.usefixtures("fast_compile")


def _inputs(shape, dtype, seed):
    k = jax.random.split(jax.random.key(seed), 4)
    y, z, dout = (jax.random.normal(k[i], shape).astype(dtype) for i in (0, 1, 3))
    scale = 1.0 + 0.3 * jax.random.normal(k[2], (shape[-1],))
    return y, z, scale, dout


def _value_and_grads(fn, y, z, scale, dout):
    out, vjp = jax.vjp(fn, y, z, scale)
    return (out, *vjp(dout))


# float32: products and sums are float32 in both (1e-5); bf16: the inputs are bf16 in both but the
# kernel stores its gradients in bf16 straight from float32 (one rounding, 1e-2).
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("groups,tiles", [(1, None), (3, triton.Tiles(2, 4, 4))])
def test_triton_matches_reference(dtype, tol, groups, tiles):
    """111 rows (no whole block), 96 channels (groups of 96 or 32: padded to a power of two);
    the second case has 28 backward programs, each summing its rows' share of dscale."""
    y, z, scale, dout = _inputs((3, 37, 96), dtype, seed=groups)

    def run(impl, **kw):
        return _value_and_grads(lambda *a: gated_rms_norm(
            *a, groups=groups, epsilon=1e-5, implementation=impl, **kw), y, z, scale, dout)

    got = run("triton", interpret=True, tiles=tiles)
    f32 = lambda v: v.astype(jnp.float32)
    want = _value_and_grads(lambda y, z, s: reference.gated_rms_norm(
        f32(y), f32(z), s, groups=groups, epsilon=1e-5, dtype=jnp.float32), y, z, scale,
        f32(dout))
    for name, g, w in zip(("out", "dy", "dz", "dscale"), got, want):
        assert g.dtype == (scale.dtype if name == "dscale" else dtype), name
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


def test_auto_is_xla_on_cpu_and_triton_for_an_abstract_gpu():
    """On this CPU host "auto" is the reference (bit-identical); targeting an H100 it takes the
    Triton kernels, which pass the MLIR verifier forward and backward."""
    y, z, scale, dout = _inputs((2, 5, 48), jnp.float32, seed=7)
    auto = gated_rms_norm(y, z, scale, groups=2)
    assert (auto == reference.gated_rms_norm(y, z, scale, groups=2, epsilon=1e-5,
                                             dtype=jnp.float32)).all()
    sds = jax.ShapeDtypeStruct
    args = (sds((4, 300, 1536), jnp.bfloat16),) * 2 + (sds((1536,), jnp.float32),)

    def fwd_bwd(y, z, scale):
        out, vjp = jax.vjp(gated_rms_norm, y, z, scale)
        return vjp(jnp.ones(out.shape, out.dtype))

    with verified_triton_modules() as checked, lowering_for("NVIDIA H100"):
        assert DISPATCH.choose("auto", Call(1200, 1, 1536), interpret=False)[0] == "triton"
        text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2 and checked[0] == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(z=jnp.ones((2, 9))), "one shape"),
    (dict(scale=jnp.ones((7,))), r"scale must have shape \(features,\) = \(8,\)"),
    (dict(groups=3), "groups must be a positive int dividing features"),
    (dict(epsilon=0.0), "epsilon must be > 0"),
    (dict(y=jnp.ones((2, 0)), z=jnp.ones((2, 0)), scale=jnp.ones((0,))), "at least one feature"),
    (dict(implementation="triton", interpret=True, tiles=triton.Tiles(3, 6, 4)),
     "block_rows .* must be a power of two"),
])
def test_bad_input(kwargs, match):
    args = dict(y=jnp.ones((2, 8)), z=jnp.full((2, 8), 0.5), scale=jnp.ones((8,)))
    args |= kwargs
    with pytest.raises(ValueError, match=match):
        gated_rms_norm(args.pop("y"), args.pop("z"), args.pop("scale"), **args)
