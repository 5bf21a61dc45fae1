"""Context parallelism on 8 fake CPU devices: ring attention (zig-zag for causal) equals unsharded
attention, forward and gradients, with and without packed segments; a GPT trained with the
length axis sharded gives the single-device losses; bad sizes are ConfigErrors before compiling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshlm import sharding
from meshlm.config import DEFAULT_RULES, ConfigError, MeshConfig
from meshlm.layers import ring_attention
from pallas_kernels.flash_attention import flash_attention

# float32 throughout; only the summation order (blockwise log-sum-exp merging) differs.
ATOL = 2e-5
B, L, H, HKV, D = 2, 32, 4, 2, 8


def packed_segments(rng, batch, length):
    """Random document boundaries: sorted ids, several documents per row, some crossing shards."""
    cuts = np.sort(rng.integers(1, length, (batch, 3)), axis=1)
    return (np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)


def inputs(seed, segments):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, L, H, D)).astype(np.float32)
    k = rng.normal(size=(B, L, HKV, D)).astype(np.float32)
    v = rng.normal(size=(B, L, HKV, D)).astype(np.float32)
    cot = rng.normal(size=(B, L, H, D)).astype(np.float32)
    seg = packed_segments(rng, B, L) if segments else None
    return q, k, v, cot, seg


def loss_and_grads(attend, q, k, v, cot, seg):
    def loss(q, k, v):
        out = attend(q, k, v, seg)
        return jnp.sum(out * cot), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("mesh_cfg", [
    MeshConfig(data=2, sequence=4),
    MeshConfig(data=1, sequence=2, tensor=2, fsdp=2),
], ids=["dp2_sp4", "fsdp2_sp2_tp2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("segments", [True, False], ids=["segments", "nosegments"])
def test_ring_attention_matches_unsharded(mesh_cfg, causal, segments):
    q, k, v, cot, seg = inputs(hash((causal, segments)) % 1000, segments)
    want_out, want_grads = jax.jit(functools.partial(
        loss_and_grads, lambda q, k, v, s: flash_attention(
            q, k, v, causal=causal, segment_ids=s, implementation="xla")))(q, k, v, cot, seg)

    mesh = sharding.make_mesh(mesh_cfg)
    with sharding.activate(mesh, DEFAULT_RULES):
        def put(x, *axes):
            return None if x is None else jax.device_put(
                x, sharding.named_sharding(mesh, DEFAULT_RULES, *axes))
        qs, cots = (put(x, *ring_attention.Q_AXES) for x in (q, cot))
        ks, vs = (put(x, *ring_attention.KV_AXES) for x in (k, v))
        segs = put(seg, "activation_batch", "activation_length")
        ring = functools.partial(ring_attention.context_parallel_attention, causal=causal,
                                 implementation="xla")
        step = jax.jit(functools.partial(loss_and_grads, lambda q, k, v, s: ring(q, k, v, s)))
        out, grads = step(qs, ks, vs, cots, segs)
    assert out.sharding.spec[1] == "sequence"  # the output stays sharded by length
    np.testing.assert_allclose(out, want_out, atol=ATOL, rtol=0)
    for name, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_zigzag_round_trip(shards):
    """Device i gets chunks i and 2S-1-i, and from_zigzag restores the contiguous layout."""
    mesh = jax.make_mesh((shards,), ("sequence",), devices=jax.devices()[:shards],
                         axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.arange(2 * shards * 3, dtype=jnp.float32)[None, :].repeat(2, 0)

    def local(x):
        z = ring_attention.to_zigzag(x, "sequence", shards)
        return z, ring_attention.from_zigzag(z, "sequence", shards)

    z, back = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(None, "sequence"),
                                    out_specs=P(None, "sequence")))(x)
    chunks = np.asarray(x[0]).reshape(2 * shards, 3)
    order = [c for d in range(shards) for c in (d, 2 * shards - 1 - d)]
    np.testing.assert_array_equal(np.asarray(z[0]).reshape(2 * shards, 3), chunks[order])
    np.testing.assert_array_equal(back, x)
