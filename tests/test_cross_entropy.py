"""``pallas_kernels.cross_entropy``: the Triton forward (interpret mode) against the float32
reference, values and gradients on fresh random logits; bad arguments; the GPU lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lowering_for
from pallas_kernels.cross_entropy import common, cross_entropy, reference, triton

TRITON = dict(implementation="triton", interpret=True)


def _inputs(seed, shape, vocab, dtype, scale=4.0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(*shape, vocab)) * scale, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)
    return logits, targets


@pytest.mark.parametrize("vocab, tiles", [(1000, triton.Tiles(256, 4)),  # last block partial
                                          (64, triton.Tiles(128, 4)),  # one block, most masked
                                          (4096, None)])  # the default tiles
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-6)])
def test_triton_matches_reference(vocab, tiles, dtype, tol):
    """Values to ``tol`` relative (both compute in float32 from the same inputs) and the
    gradient of a weighted sum (the backward kernel from the forward's log-sum-exp)."""
    seed = int(np.random.default_rng().integers(2**31))
    logits, targets = _inputs(seed, (3, 5), vocab, dtype)
    weights = jnp.asarray(np.random.default_rng(seed + 1).uniform(size=(3, 5)), jnp.float32)
    want = reference.forward(logits, targets)[0]
    got = cross_entropy(logits, targets, tiles=tiles, **TRITON)
    assert got.dtype == jnp.float32 and got.shape == targets.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"seed {seed}")
    loss = lambda impl: lambda x: jnp.sum(cross_entropy(x, targets, **impl) * weights)
    grad = jax.grad(loss(dict(TRITON, tiles=tiles)))(logits)
    expected = jax.grad(lambda x: jnp.sum(reference.forward(x, targets)[0] * weights))(logits)
    assert grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected, np.float32),
                               atol=1e-6 if dtype == jnp.float32 else 1e-2, err_msg=f"seed {seed}")


@pytest.mark.parametrize("rows, vocab, block_v", [(7, 1000, 256),  # last block partial
                                                  (3, 64, 128),  # one block, half masked
                                                  (4, 512, 128)])  # whole blocks
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_kernel_matches_the_elementwise_form(rows, vocab, block_v, dtype):
    """The Triton backward against ``common.backward`` on fresh logits, log-sum-exps and
    cotangents: the same float32 arithmetic, so equal to a rounding of the output dtype at
    every entry (the last, partial block's included)."""
    seed = int(np.random.default_rng().integers(2**31))
    logits, targets = _inputs(seed, (rows,), vocab, dtype)
    rng = np.random.default_rng(seed + 1)
    g = jnp.asarray(rng.uniform(-2, 2, size=(rows,)), jnp.float32)
    lse = reference.forward(logits, targets)[1]
    cfg = triton.config(common.Call(rows, vocab), triton.Tiles(block_v, 4), interpret=True)
    got = triton.backward(logits, lse, targets, g, cfg)
    want = common.backward(logits, lse, targets, g)
    assert got.dtype == dtype and got.shape == logits.shape
    ulp = 1e-6 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=ulp, atol=1e-7, err_msg=f"seed {seed}")


def test_masked_and_large_logits():
    """``-inf`` entries (a masked vocabulary) and magnitudes that overflow a naive exp."""
    logits, targets = _inputs(3, (2, 4), 700, jnp.float32, scale=300.0)
    logits = logits.at[0, :, 100:650].set(-jnp.inf)
    targets = targets.at[0].set(5)
    got = cross_entropy(logits, targets, tiles=triton.Tiles(128, 4), **TRITON)
    np.testing.assert_allclose(got, reference.forward(logits, targets)[0], rtol=1e-6)


def test_xla_is_the_reference_with_a_one_pass_backward():
    logits, targets = _inputs(4, (6,), 300, jnp.bfloat16)
    np.testing.assert_array_equal(cross_entropy(logits, targets, implementation="xla"),
                                  reference.forward(logits, targets)[0])


@pytest.mark.parametrize("change, match", [
    (lambda l, t: (l.astype(jnp.int32), t), "logits must be bfloat16"),
    (lambda l, t: (l, t[:, :2]), r"targets must be integer ids of shape"),
    (lambda l, t: (l, t.astype(jnp.float32)), r"targets must be integer ids"),
    (lambda l, t: (l[..., :0], t), r"vocab >= 1"),
])
def test_bad_arguments_raise(change, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(*change(*_inputs(0, (2, 3), 16, jnp.float32)))


def test_bad_tiles_raise():
    with pytest.raises(ValueError, match=r"tiles.block_v \(96\) must be a power of two"):
        cross_entropy(*_inputs(0, (2,), 16, jnp.float32), tiles=triton.Tiles(96, 4), **TRITON)


def test_auto_is_the_kernel_on_a_gpu_and_xla_on_the_cpu():
    """"auto" for an H100 lowers the Triton forward and backward; for this CPU it is the XLA
    form."""
    logits = jax.ShapeDtypeStruct((8, 50304), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((8,), jnp.int32)
    fn = jax.jit(jax.grad(lambda x, t: cross_entropy(x, t).sum()))
    with lowering_for("NVIDIA H100"):
        gpu = fn.trace(logits, targets).lower(lowering_platforms=("cuda",)).as_text()
    assert "cross_entropy_fwd" in gpu and "cross_entropy_bwd" in gpu
    cpu = fn.trace(logits, targets).lower().as_text()
    assert "cross_entropy_fwd" not in cpu and "cross_entropy_bwd" not in cpu
