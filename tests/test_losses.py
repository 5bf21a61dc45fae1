"""token_cross_entropy against optax's autodiffed cross-entropy: values and gradients; the
compute-dtype logits option against float32 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meshlm.config import model_config
from meshlm.train.losses import token_cross_entropy

pytestmark = pytest.mark.usefixtures("fast_compile")


def _optax_ce(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_matches_optax_value_and_gradient(dtype, atol):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 7, 50)) * 3, dtype)
    targets = jnp.asarray(rng.integers(0, 50, size=(3, 7)), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(3, 7)), jnp.float32)

    def weighted(fn):
        return lambda x: jnp.sum(fn(x, targets) * weights)

    np.testing.assert_allclose(token_cross_entropy(logits, targets), _optax_ce(logits, targets),
                               atol=1e-5, rtol=1e-6)
    grad = jax.jit(jax.grad(weighted(token_cross_entropy)))(logits)
    expected = jax.grad(weighted(_optax_ce))(logits)
    assert grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected, np.float32),
                               atol=atol)
    assert float(jnp.max(jnp.abs(grad.astype(jnp.float32)))) > 0.01


def test_composes_with_vmap():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(4, 5)), jnp.int32)
    per_row = jax.vmap(jax.grad(lambda x, t: jnp.sum(token_cross_entropy(x, t))))(logits, targets)
    full = jax.grad(lambda x: jnp.sum(_optax_ce(x, targets)))(logits)
    np.testing.assert_allclose(per_row, full, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "head"])
def test_compute_dtype_logits_train_like_float32_ones(tie):
    """``model.float32_logits: false``: the LM head writes bfloat16 logits (float32 accumulated)
    and the loss and every gradient stay those of float32 logits up to that one rounding."""
    rng = np.random.default_rng(2)
    toks = jnp.asarray(rng.integers(0, 96, (2, 17)), jnp.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.ones((2, 16), jnp.int32), "loss_mask": jnp.ones((2, 16))}
    runs = {}
    for f32 in (True, False):
        cfg = model_config("gpt", vocab_size=96, d_model=32, n_layers=1, max_seq_len=16,
                           n_heads=2, tie_embeddings=tie, float32_logits=f32)
        model = cfg.build()
        params = model.init(jax.random.key(0), batch["inputs"])["params"]
        logits = model.apply({"params": params}, batch["inputs"])
        loss = lambda p: cfg.loss(model, p, batch)[0]
        runs[f32] = (logits, *jax.jit(jax.value_and_grad(loss))(params))
    (logits32, loss32, grads32), (logits16, loss16, grads16) = runs[True], runs[False]
    assert logits32.dtype == jnp.float32 and logits16.dtype == jnp.bfloat16
    np.testing.assert_allclose(logits16.astype(jnp.float32), logits32, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-4)
    # Per leaf, relative to at least 1% of the whole gradient: the attention key bias's exact
    # gradient is zero (softmax ignores a per-query constant), so both are rounding noise there.
    floor = 0.01 * float(optax.global_norm(grads32))
    named = jax.tree_util.tree_leaves_with_path(grads32)
    for (path, g32), g16 in zip(named, jax.tree.leaves(grads16), strict=True):
        err = float(jnp.linalg.norm(g16 - g32)) / max(float(jnp.linalg.norm(g32)), floor)
        assert err < 2e-2, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("mesh_shape, kernel", [(dict(data=2, fsdp=2), True),
                                                (dict(data=2, sequence=2), True),
                                                (dict(data=2, tensor=2), False)],
                         ids=["rows-split", "length-split", "vocab-split"])
def test_kernel_runs_per_device_unless_the_vocabulary_is_split(mesh_shape, kernel):
    """On a data x fsdp (or sequence) mesh the Triton kernels (interpret mode) run inside
    shard_map on each device's rows, values and gradients those of optax; when the rules split
    the vocabulary (tensor) the loss keeps XLA's partitioned reductions (no kernel in the
    program)."""
    from meshlm import sharding
    from meshlm.config import MeshConfig

    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    logits = jnp.asarray(rng.normal(size=(4, 6, 64)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 64, size=(4, 6)), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(4, 6)), jnp.float32)
    mesh_cfg = MeshConfig(**mesh_shape)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4])
    logits_sh = sharding.named_sharding(mesh, sharding.axis_rules(mesh_cfg), "activation_batch",
                                        "activation_length", "activation_vocab")
    loss = lambda x: jnp.sum(token_cross_entropy(x, targets, implementation="triton",
                                                 interpret=True) * weights)
    with sharding.activate(mesh, sharding.axis_rules(mesh_cfg)):
        x = jax.device_put(logits, logits_sh)
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x))
        value, grad = jax.jit(jax.value_and_grad(loss))(x)
    assert ("pallas_call" in jaxpr) == kernel and ("shard_map" in jaxpr) == kernel
    want, want_grad = jax.value_and_grad(lambda x: jnp.sum(_optax_ce(x, targets) * weights))(
        logits)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
