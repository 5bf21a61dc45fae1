"""``pallas_kernels._triton_scan.linear_recurrence``: a Pallas Triton kernel's parallel scan of
``h_t = a_t h_{t-1} + b_t``, against a step-by-step loop, in interpret mode and lowered for an
H100 through the MLIR verifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from kernel_checks import NEEDS_GPU, verified_triton_modules

from pallas_kernels import lowering_for
from pallas_kernels._triton_scan import linear_recurrence


def _by_loop(a, b, axis):
    a, b = np.moveaxis(np.asarray(a, np.float64), axis, 0), np.moveaxis(np.asarray(b), axis, 0)
    prod, h, prods, hs = np.ones(a.shape[1:]), np.zeros(a.shape[1:]), [], []
    for a_t, b_t in zip(a, b):
        prod, h = prod * a_t, a_t * h + b_t
        prods.append(prod)
        hs.append(h)
    return np.moveaxis(np.stack(prods), 0, axis), np.moveaxis(np.stack(hs), 0, axis)


def _inputs(shape):
    seed = int(np.random.default_rng().integers(2**31))
    k = jax.random.split(jax.random.key(seed), 2)
    return jax.random.uniform(k[0], shape, minval=0.3, maxval=1.0), jax.random.normal(k[1], shape)


def _kernel(axis):
    def kernel(a_ref, b_ref, prod_ref, h_ref):
        prod_ref[...], h_ref[...] = linear_recurrence(a_ref[...], b_ref[...], axis=axis)

    return kernel


def _pallas(a, b, axis, interpret):
    out = [jax.ShapeDtypeStruct(a.shape, a.dtype)] * 2
    return pl.pallas_call(_kernel(axis), out_shape=out, interpret=interpret)(a, b)


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=NEEDS_GPU)],
                         ids=["interpret", "compiled"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_matches_a_loop_in_a_kernel(axis, interpret):
    """Fresh random decays in [0.3, 1) and inputs, a (16, 8, 4) tile scanned along each axis
    inside a kernel (interpret mode; with a GPU also compiled, Triton's scan): the cumulative
    products and states to float32 rounding."""
    a, b = _inputs((16, 8, 4))
    prod, h = _pallas(a, b, axis, interpret=interpret)
    want_prod, want_h = _by_loop(a, b, axis)
    np.testing.assert_allclose(prod, want_prod, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)


def test_vmap_and_bad_input():
    a, b = _inputs((3, 10, 5))
    h = jax.vmap(lambda x, y: linear_recurrence(x, y, axis=0)[1])(a, b)
    np.testing.assert_allclose(h, _by_loop(a, b, 1)[1], rtol=1e-5, atol=1e-5)
    h = jax.vmap(lambda y: linear_recurrence(a[0], y, axis=0)[1])(b)  # a not batched
    np.testing.assert_allclose(h[1], _by_loop(a[0], b[1], 0)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a and b must share shape and dtype"):
        linear_recurrence(a, b[:, :4])


def test_lowers_to_a_verified_triton_scan():
    """Lowered for an H100, the kernel is one Triton module that passes the MLIR verifier."""
    a = jax.ShapeDtypeStruct((16, 8, 4), jnp.float32)
    with verified_triton_modules() as checked, lowering_for("NVIDIA H100"):
        jax.jit(lambda x, y: _pallas(x, y, 0, interpret=False)).trace(a, a).lower(
            lowering_platforms=("cuda",))
    assert checked[0] == 1
