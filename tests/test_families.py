"""The recurrent families (Mamba-1, Mamba-2, RetNet) as whole models: decoding with O(1) state
reproduces the full forward, packed documents equal separate runs, and data/FSDP/tensor
parallelism on 8 fake CPU devices train to the single-device losses. Their mixers are checked
against step-by-step references in test_mamba_layers.py and test_retention.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import compile_train_step, packed_batches
from meshlm import sharding
from meshlm.config import ConfigError, load_config, model_config
from meshlm.train.setup import build

COMMON = dict(vocab_size=64, d_model=32, n_layers=2, max_seq_len=32, dtype="float32")
FAMILIES = {
    "mamba": dict(d_state=4),
    "mamba2": dict(d_state=8, head_dim=16, chunk_size=8),
    "retnet": dict(n_heads=4, d_ff=64, chunk_size=8),
}
family = pytest.mark.parametrize("name", list(FAMILIES))
pytestmark = pytest.mark.usefixtures("fast_compile")
ATOL = 1e-5  # float32, same math in another order (chunked vs stepped)


@functools.cache
def model_and_params(name: str, scan: bool = True):
    cfg = model_config(name, **COMMON, **FAMILIES[name], scan_layers=scan)
    model = cfg.build()
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    # Perturb every parameter so no norm scale or bias is at its trivial initial value.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in
                             zip(leaves, keys)])
    return cfg, model, params


def tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, COMMON["vocab_size"], shape),
                       jnp.int32)


@family
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_decoding_reproduces_the_full_forward(name, scan):
    cfg, model, params = model_and_params(name, scan)
    seq = tokens(3, (2, 13))
    full = jax.jit(model.apply)({"params": params}, seq)
    cache = cfg.init_cache(model, 2, 13)
    # Jitted: eager scans dispatch op by op; one compile per chunk length (5, 3, 1).
    step = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
    got = []
    for start, stop in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 13)]:
        logits, mutated = step({"params": params, "cache": cache}, seq[:, start:stop])
        cache = mutated["cache"]
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), full, atol=ATOL, rtol=1e-4)


@family
def test_packed_documents_equal_separate_runs(name):
    cfg, model, params = model_and_params(name)
    lengths = (5, 7, 4)
    docs = [tokens(10 + i, (1, n)) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(docs, axis=1)
    seg = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32) for i, n in enumerate(lengths)], 1)
    pos = jnp.concatenate([jnp.arange(n, dtype=jnp.int32)[None] for n in lengths], axis=1)
    got = model.apply({"params": params}, packed, positions=pos, segment_ids=seg)
    want = jnp.concatenate([model.apply({"params": params}, d) for d in docs], axis=1)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


def train_losses(name, mesh_overrides, devices, steps=3):
    overrides = [f"model.family={name}"] + [f"model.{k}={v}" for k, v in
                                            {**COMMON, **FAMILIES[name]}.items()]
    cfg = load_config(None, overrides + mesh_overrides + [
        "data.seq_len=16", "data.batch_size=8", "optimizer.warmup_steps=1", "optimizer.lr=1e-2",
        "train.steps=10"])
    mesh, rules, state, step = compile_train_step(cfg, devices)
    losses = []
    for batch in packed_batches(cfg, 1) * steps:  # one batch again: the loss must fall
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh, rules)))
        losses.append(float(metrics["loss"]))
    return state, losses


@family
def test_dp_fsdp_tp_match_a_single_device(name):
    _, single = train_losses(name, ["mesh.data=1"], jax.devices()[:1])
    state, sharded = train_losses(name, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                                  jax.devices())
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    assert sharded[-1] < sharded[0]
    # The mixer's inner dimension / heads really are split over `tensor`.
    specs = {jax.tree_util.keystr(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert any("tensor" in str(s) for k, s in specs.items() if "mixer" in k or "retention" in k)


@pytest.mark.parametrize("name, fields, mesh, match", [
    ("gpt", {"d_state": 16}, [], r"unknown key 'model.d_state'; valid keys for model.family 'gpt'"),
    ("mamba2", {"head_dim": 24}, [], r"model.head_dim=24 must divide d_inner"),
    ("mamba2", {"d_model": 32, "head_dim": 16, "n_groups": 3}, [], r"model.n_groups=3 must divide the 4 heads"),
    ("mamba2", {"chunk_size": 48}, [], r"model.chunk_size must be a power of two, got 48"),
    ("retnet", {"d_model": 32, "n_heads": 3}, [], r"model.n_heads=3 must divide model.d_model=32"),
    ("mamba2", {"d_model": 32, "head_dim": 16}, ["mesh.data=1", "mesh.tensor=8"],
     r"model.n_heads=4 does not divide over the 8 shards of logical axis 'heads'"),
    ("mamba", {"d_model": 36, "expand": 1}, ["mesh.data=1", "mesh.tensor=8"],
     r"model.d_inner=36 does not divide over the 8 shards of logical axis 'inner'"),
    ("gpt", {"vocab_size": 61}, ["mesh.data=2", "mesh.tensor=4"],
     r"model.vocab_size=61 does not divide over the 4 shards of logical axis 'vocab'"),
    ("gpt", {"n_heads": 2}, ["mesh.data=2", "mesh.tensor=4"],
     r"model.n_heads=2 does not divide over the 4 shards of logical axis 'heads'"),
])
def test_bad_family_config_is_one_clear_error(name, fields, mesh, match):
    overrides = [f"model.family={name}"] + [f"model.{k}={v}" for k, v in fields.items()]
    with pytest.raises(ConfigError, match=match):
        build(load_config(None, overrides + mesh + ["data.batch_size=8", "data.seq_len=16"]))
