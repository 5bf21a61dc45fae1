"""token_cross_entropy against optax's autodiffed cross-entropy: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meshlm.train.losses import token_cross_entropy


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
