"""Parallelism is configuration: on 8 fake CPU devices, data parallel, FSDP, tensor parallel and
their combinations train to the single-device losses, and parameters and Adam's moments are
really sharded as the rule table says (specs and the shapes of the per-device shards)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from _helpers import compile_train_step, packed_batches
from meshlm import sharding
from meshlm.config import load_config

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = [
    "model.vocab_size=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.d_ff=64", "model.max_seq_len=16", "model.attention=xla", "model.dtype=float32",
    "data.seq_len=16", "data.batch_size=8", "train.steps=20", "optimizer.warmup_steps=2",
    "optimizer.lr=1e-2",
]
STEPS = 3
# Summation order differs between layouts (sharded matmuls and all-reduces), nothing else.
LOSS_RTOL = 2e-5

STRATEGIES = {
    "dp": ["mesh.data=8"],
    "fsdp": ["mesh.data=1", "mesh.fsdp=8"],
    "dp2_tp4": ["mesh.data=2", "mesh.tensor=4"],
    "dp2_fsdp2_tp2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    # One fused q/k/v product (heads-major columns) instead of three: same losses.
    "dp2_fsdp2_tp2_fuse_qkv": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                               "model.fuse_qkv=true"],
}

# What the default rule table must give each parameter (scan adds the leading "layers" axis,
# which is never sharded): vocab and heads/mlp on tensor, embed on fsdp.
EXPECTED = {
    "['embed']['embedding']": P("tensor", "fsdp"),
    "['position_embed']['embedding']": P(None, "fsdp"),
    "['layers']['attention']['query']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attention']['key']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attention']['query']['bias']": P(None, "tensor", None),
    "['layers']['attention']['out']['kernel']": P(None, "tensor", None, "fsdp"),
    "['layers']['attention']['out']['bias']": P(None, "fsdp"),
    "['layers']['mlp']['wi']['kernel']": P(None, "fsdp", "tensor"),
    "['layers']['mlp']['wo']['kernel']": P(None, "tensor", "fsdp"),
    "['layers']['mlp_norm']['scale']": P(None, "fsdp"),
    "['final_norm']['scale']": P("fsdp"),
}


def run(overrides, devices):
    cfg = load_config(None, TINY + overrides)
    mesh, rules, state, step = compile_train_step(cfg, devices)
    losses = []
    batch_sh = sharding.batch_sharding(mesh, rules)
    for batch in packed_batches(cfg, STEPS):
        state, metrics = step(state, jax.device_put(batch, batch_sh))
        losses.append(float(metrics["loss"]))
    return mesh, state, losses


@pytest.fixture(scope="module")
def single_device_losses():
    return run(["mesh.data=1"], jax.devices()[:1])[2]


def mesh_axis_sizes(spec, mesh):
    return [int(np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())]))
            for s in spec]


def check_sharded_as_rules_say(mesh, state):
    params = dict(
        (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state.params))
    for name, spec in EXPECTED.items():
        x = params[name]
        got = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        want = tuple(spec) + (None,) * (x.ndim - len(spec))
        assert got == want, (name, got, want)
        # Really split: every device holds exactly its slice, not a replica.
        parts = mesh_axis_sizes(want, mesh)
        shard = x.addressable_shards[0].data.shape
        assert shard == tuple(d // k for d, k in zip(x.shape, parts)), (name, shard, x.shape)
    # Adam's first and second moments are sharded exactly like their parameters.
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        for tag in ("mu", "nu"):
            if tag in keys:
                param_path = jax.tree_util.keystr(path[keys.index(tag) + 1:])
                assert leaf.sharding.is_equivalent_to(params[param_path].sharding, leaf.ndim), (
                    tag, param_path, leaf.sharding, params[param_path].sharding)
                moments += 1
    assert moments == 2 * len(params)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_matches_single_device(name, single_device_losses):
    assert len(jax.devices()) == 8
    mesh, state, losses = run(STRATEGIES[name], jax.devices())
    np.testing.assert_allclose(losses, single_device_losses, rtol=LOSS_RTOL)
    assert losses[-1] < losses[0]  # it trained, not just evaluated
    check_sharded_as_rules_say(mesh, state)


def test_fused_qkv_product_is_split_over_heads():
    """``model.fuse_qkv``'s one 2-D q/k/v product under tensor parallelism: each device computes
    its heads' columns (3 * 32 / 2 = 48 per shard); no device computes all 96."""
    cfg = load_config(None, TINY + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                    "model.fuse_qkv=true"])
    text = compile_train_step(cfg, jax.devices())[3].as_text()
    dots = set(re.findall(r"= \w+\[([\d,]*)\][^\n]* dot\(", text))
    assert "32,48" in dots and not any(d.endswith(",96") for d in dots), dots
