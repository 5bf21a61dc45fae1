"""Context parallelism on 8 fake CPU devices: ring attention (zig-zag for causal) equals unsharded
attention, forward and gradients, with and without packed segments; a GPT trained with the
length axis sharded gives the single-device losses; bad sizes are ConfigErrors before compiling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from meshlm import sharding
from meshlm.config import DEFAULT_RULES, ConfigError, MeshConfig, load_config
from meshlm.layers import ring_attention
from meshlm.train.setup import build
from pallas_kernels.flash_attention import flash_attention

# Few, small programs: XLA's optimisations would cost more compile time than they save.
pytestmark = pytest.mark.usefixtures("fast_compile")
# float32 throughout; only the summation order (blockwise log-sum-exp merging) differs.
ATOL = 2e-5
B, H, HKV, D = 2, 4, 2, 8


def packed_segments(rng, batch, length):
    """Random document boundaries: sorted ids, several documents per row, some crossing shards."""
    cuts = np.sort(rng.integers(1, length, (batch, 3)), axis=1)
    return (np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)


def inputs(seed, segments, L, D=D):
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


DP2_SP4 = MeshConfig(data=2, sequence=4)
FSDP2_SP2_TP2 = MeshConfig(data=1, sequence=2, tensor=2, fsdp=2)


@pytest.mark.parametrize("method, mesh_cfg, length, causal, segments", [
    ("ring", DP2_SP4, 32, True, True),
    ("ring", DP2_SP4, 32, False, False),
    ("ring", DP2_SP4, 20, True, True),  # 20 = 5 x 4, not a multiple of 8: contiguous causal ring
    ("ring", FSDP2_SP2_TP2, 16, True, True),
    ("ulysses", MeshConfig(data=2, sequence=2, expert=2), 16, True, True),
], ids=["sp4-causal-seg", "sp4-full", "sp4-causal-seg-contiguous", "fsdp2-sp2-tp2-causal-seg",
        "ulysses-sp2-causal-seg"])
def test_context_parallel_attention_matches_unsharded(method, mesh_cfg, length, causal, segments,
                                                      implementation="xla", head_dim=D):
    q, k, v, cot, seg = inputs(length + 2 * causal + segments, segments, length, head_dim)
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
                                 method=method, implementation=implementation,
                                 interpret=implementation != "xla")
        step = jax.jit(functools.partial(loss_and_grads, lambda q, k, v, s: ring(q, k, v, s)))
        out, grads = step(qs, ks, vs, cots, segs)
    assert out.sharding.spec[1] == "sequence"  # the output stays sharded by length
    np.testing.assert_allclose(out, want_out, atol=ATOL, rtol=0)
    for name, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"d{name}")


def test_ring_with_a_pallas_kernel_matches_unsharded():
    """The GPU path: each block by the Triton lowering (interpret mode), whose forward returns
    the lse and whose custom VJP takes the lse cotangent, inside the shard_map and lax.cond."""
    test_context_parallel_attention_matches_unsharded(
        "ring", MeshConfig(data=2, sequence=2, expert=2), 16, True, True,
        implementation="triton", head_dim=16)


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


# LLaMA-style (RoPE, GQA), so equal losses also mean every shard rotates by its global positions.
TINY = [
    "model.vocab_size=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
    "model.use_bias=false", "model.d_ff=64", "model.max_seq_len=16", "model.attention=xla",
    "model.dtype=float32", "data.seq_len=16", "data.batch_size=4", "train.steps=20",
    "optimizer.warmup_steps=2", "optimizer.lr=1e-2",
]
STEPS = 3
LOSS_RTOL = 2e-5  # summation order differs between layouts, nothing else


def packed_batches(n):
    """Token rows packed with several documents each: segment ids, and positions restarting at
    every document (as data packing writes them)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, 128, (4, 17), dtype=np.int32)
        seg = packed_segments(rng, 4, 16)
        starts = np.maximum.accumulate(
            np.where(np.diff(seg, prepend=-1, axis=1) != 0, np.arange(16), 0), axis=1)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                    "positions": (np.arange(16) - starts).astype(np.int32),
                    "loss_mask": np.ones((4, 16), np.float32)})
    return out


def train_losses(overrides, devices):
    cfg = load_config(None, TINY + overrides)
    run = build(cfg, devices)
    state, losses = run.init_state(0), []
    for batch in packed_batches(STEPS):
        state, metrics = run.train_step(state, run.put(batch))
        losses.append(float(metrics["loss"]))
    return losses, run.train_step.as_text()


@pytest.fixture(scope="module")
def single_device_losses():
    return train_losses(["mesh.data=1"], jax.devices()[:1])[0]


def test_gpt_with_sequence_sharding_trains_to_single_device_losses(single_device_losses):
    """Data x sequence = 2 x 4 (the ring with tensor and FSDP axes is checked above)."""
    losses, hlo = train_losses(["mesh.data=2", "mesh.sequence=4"], jax.devices())
    assert "collective-permute" in hlo  # the ring ran (nothing else permutes here)
    np.testing.assert_allclose(losses, single_device_losses, rtol=LOSS_RTOL)
    assert losses[-1] < losses[0]


def test_sequence_shards_must_divide_the_length():
    with pytest.raises(ConfigError, match=r"data.seq_len=18 is not divisible by the "
                                          r"sequence-parallel size 4 \(sequence=4\)"):
        build(load_config(None, TINY + ["mesh.data=1", "mesh.sequence=4", "data.seq_len=18",
                                        "model.max_seq_len=18"]), jax.devices()[:4])


@pytest.mark.parametrize("family", ["mamba", "mamba2", "retnet", "t5"])
def test_families_without_context_parallelism_refuse_sequence_sharding(family):
    """Their layers scan (or attend with T5's relative bias) over the whole length: a sharded
    length would be gathered on every device, so it is refused rather than silently unsplit."""
    cfg = load_config(f"configs/{family}_tiny.yaml", ["mesh.data=1", "mesh.sequence=2"])
    with pytest.raises(ConfigError, match=f"model.family={family} has no context parallelism"):
        build(cfg, jax.devices()[:2])


@pytest.mark.parametrize("method, collective", [("ring", "ppermute"), ("ulysses", "all_to_all")])
def test_model_context_parallel_picks_the_method(method, collective):
    """``model.context_parallel`` reaches the layer (traced only: the methods are checked above)."""
    from meshlm.layers.attention import Attention

    mesh = sharding.make_mesh(MeshConfig(data=2, sequence=2, expert=2))
    layer = Attention(num_heads=4, num_kv_heads=2, head_dim=8, implementation="xla",
                      context_parallel=method)
    x, pos = jnp.ones((2, 16, 32)), jnp.broadcast_to(jnp.arange(16), (2, 16))
    with sharding.activate(mesh, DEFAULT_RULES):
        jaxpr = str(jax.make_jaxpr(layer.init)(jax.random.key(0), x, pos))
    assert collective in jaxpr


@pytest.mark.parametrize("overrides, match", [
    (["model.context_parallel=ulysses", "mesh.sequence=4", "mesh.data=2"],
     r"model.context_parallel=ulysses .* model.kv_heads=2 over 1 tensor shards leaves 2"),
    (["model.sliding_window=4", "mesh.sequence=2", "mesh.data=4"],
     r"model.sliding_window=4 has no context parallelism \(mesh.sequence=2\)"),
], ids=["ulysses-heads", "sliding-window"])
def test_context_parallel_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build(load_config(None, TINY + overrides), jax.devices())
