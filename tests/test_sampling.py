"""Sampling filters: greedy, temperature, top-k, top-p on random logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm.generate import SamplingParams, filter_logits, sample


def _logits(seed=0, shape=(4, 50)):
    return jax.random.normal(jax.random.key(seed), shape) * 3.0


def test_greedy_is_argmax():
    logits = _logits(1)
    got = sample(logits, jax.random.key(0), SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(got, jnp.argmax(logits, -1))


def test_top_k_keeps_exactly_the_k_largest():
    logits = _logits(2)
    out = filter_logits(logits, SamplingParams(top_k=5))
    kept = np.isfinite(np.asarray(out))
    assert (kept.sum(-1) == 5).all()
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    for row, idx in zip(kept, top5):
        assert row[idx].all()


def test_top_p_keeps_smallest_nucleus():
    logits = _logits(3)
    p = 0.7
    out = np.asarray(filter_logits(logits, SamplingParams(top_p=p)))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for lrow, prow in zip(out, probs):
        order = np.argsort(-prow)
        need = int(np.searchsorted(np.cumsum(prow[order]), p) + 1)  # tokens to reach mass p
        kept = np.isfinite(lrow)
        assert kept.sum() == need
        assert kept[order[:need]].all()


def test_temperature_sampling_matches_softmax_frequencies():
    logits = jnp.array([2.0, 1.0, 0.0, -1.0])
    t = 0.7
    keys = jax.random.split(jax.random.key(4), 20000)
    draws = jax.vmap(lambda k: sample(logits, k, SamplingParams(temperature=t)))(keys)
    freq = np.bincount(np.asarray(draws), minlength=4) / draws.shape[0]
    np.testing.assert_allclose(freq, jax.nn.softmax(logits / t), atol=0.015)


def test_samples_only_from_filtered_support():
    logits = _logits(5, (2, 30))
    params = SamplingParams(temperature=1.3, top_k=4, top_p=0.9)
    allowed = np.isfinite(np.asarray(filter_logits(logits, params)))
    keys = jax.random.split(jax.random.key(6), 500)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, params))(keys))
    for row in range(2):
        assert allowed[row, draws[:, row]].all()


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_top_k_beyond_the_vocabulary_is_refused():
    logits = _logits(7, (2, 30))
    assert np.isfinite(np.asarray(filter_logits(logits, SamplingParams(top_k=30)))).all()
    with pytest.raises(ValueError, match="top_k=31 exceeds the vocabulary of 30 tokens"):
        filter_logits(logits, SamplingParams(top_k=31))
