"""flash_attention under jax transformations, its dispatch, and its argument validation.

The Triton kernels run in interpret mode on CPU and are compared with the float32 reference
(``implementation="xla"``) at a relative tolerance of 1e-5 on float32 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import lowering_for
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.flash_attention import api as fa_api
from pallas_kernels.flash_attention import triton as fa_triton
from pallas_kernels.flash_attention.common import AttentionSpec

pytestmark = pytest.mark.usefixtures("fast_compile")

TOL = 1e-5
TRITON = dict(implementation="triton", interpret=True, block_sizes=BlockSizes(16, 16, 16, 16))


def _qkv(seed, batch, length, heads, kv_heads, head_dim=64, lead=()):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (*lead, batch, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (*lead, batch, length, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (*lead, batch, length, kv_heads, head_dim), jnp.float32)
    return q, k, v


def _close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=TOL, atol=TOL * scale)


def _loss(q, k, v, **kwargs):
    """Uses both outputs so the lse cotangent path of the custom VJP is exercised too."""
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, **kwargs)
    return jnp.sum(out * jnp.sin(out)) + 0.1 * jnp.sum(lse)


def test_vmap_of_value_and_grad():
    q, k, v = _qkv(1, batch=1, length=19, heads=2, kv_heads=1, lead=(2,))
    grad = lambda **kw: jax.jit(  # noqa: E731
        jax.vmap(jax.value_and_grad(functools.partial(_loss, **kw), argnums=(0, 1, 2)))
    )
    _close(grad(**TRITON)(q, k, v), grad(implementation="xla")(q, k, v))


def test_grad_of_lse_alone():
    # With only lse used, the output cotangent reaches the custom VJP as a symbolic zero.
    q, k, v = _qkv(2, batch=1, length=21, heads=2, kv_heads=2)

    def lse_loss(q, k, v, **kw):
        _, lse = flash_attention(q, k, v, return_lse=True, **kw)
        return jnp.sum(jnp.cos(lse))

    grad = lambda **kw: jax.jit(jax.grad(functools.partial(lse_loss, **kw), argnums=(0, 1, 2)))  # noqa: E731
    _close(grad(**TRITON)(q, k, v), grad(implementation="xla")(q, k, v))


def test_shard_map_heads_over_mesh_axis():
    # 8 fake CPU devices: batch over "data" (2), query and kv heads over "heads" (4), GQA 2:1.
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "heads"))
    q, k, v = _qkv(3, batch=2, length=18, heads=8, kv_heads=4)
    spec = P("data", None, "heads", None)

    def sharded(**kw):
        @jax.jit
        @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3)
        def step(q, k, v):
            # Every term of the loss is local to a shard, so the local gradient is the global one.
            return jax.grad(functools.partial(_loss, **kw), argnums=(0, 1, 2))(q, k, v)

        return step

    _close(sharded(**TRITON)(q, k, v), sharded(implementation="xla")(q, k, v))
    out = jax.jit(
        jax.shard_map(
            functools.partial(flash_attention, causal=True, **TRITON),
            mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
        )
    )(q, k, v)
    _close(out, flash_attention(q, k, v, causal=True, implementation="xla"))


def test_jit_with_static_options():
    q, k, v = _qkv(4, batch=1, length=17, heads=2, kv_heads=2)
    attend = jax.jit(
        flash_attention,
        static_argnames=("causal", "sliding_window", "implementation", "interpret", "block_sizes"),
    )
    got = attend(q, k, v, causal=True, sliding_window=5, **TRITON)
    _close(got, flash_attention(q, k, v, causal=True, sliding_window=5, implementation="xla"))


def test_auto_on_cpu_is_the_reference_and_never_raises():
    q, k, v = _qkv(5, batch=1, length=9, heads=2, kv_heads=1, head_dim=48)  # no kernel takes 48
    for kwargs in (dict(), dict(interpret=True), dict(causal=True, logits_soft_cap=3.0)):
        jaxpr = str(jax.make_jaxpr(functools.partial(flash_attention, **kwargs))(q, k, v))
        assert "pallas_call" not in jaxpr
        got = flash_attention(q, k, v, **kwargs)
        want = flash_attention(q, k, v, implementation="xla", **kwargs)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


_Q = jnp.zeros((1, 8, 4, 64))
_K = jnp.zeros((1, 8, 2, 64))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((_Q[0], _K, _K), {}, "q must have rank 4"),
        ((_Q, _K.astype(jnp.bfloat16), _K), {}, "share one dtype"),
        ((_Q.astype(jnp.int32),) * 3, {}, "share one dtype"),
        ((_Q, _K, _K[:, :4]), {}, "k and v must have the same shape"),
        ((_Q, jnp.zeros((1, 8, 3, 64)), jnp.zeros((1, 8, 3, 64))), {}, r"multiple of kv_heads"),
        ((_Q, _K[..., :32], _K[..., :32]), {}, "same head_dim"),
        ((_Q, _K, _K), dict(sliding_window=4), "sliding_window requires causal=True"),
        ((_Q, _K, _K), dict(causal=True, sliding_window=0), "sliding_window must be a positive"),
        ((_Q, _K, _K), dict(scale=-1.0), "scale must be finite and > 0"),
        ((_Q, _K, _K), dict(logits_soft_cap=0.0), "logits_soft_cap must be finite and > 0"),
        ((_Q, _K, _K), dict(q_offset=-1), "q_offset must be an int >= 0"),
        ((_Q, _K, _K), dict(alibi_slopes=jnp.ones(2)), r"alibi_slopes must be .* \(4,\)"),
        ((_Q, _K[:, :4], _K[:, :4]), dict(segment_ids=jnp.zeros((1, 8), jnp.int32)),
         "segment_ids needs q_len == kv_len"),
        ((_Q, _K, _K), dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), "given together"),
        ((_Q, _K, _K), dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), r"\(batch, q_len\)"),
        ((_Q, _K, _K), dict(implementation="cuda"), "implementation must be one of"),
        ((_Q, _K, _K), dict(block_sizes=(64, 64)), "block_sizes must be a BlockSizes"),
        ((_Q, _K, _K), dict(block_sizes=BlockSizes(block_q=0)), "block_q must be a positive int"),
        ((_Q, _K, _K), dict(implementation="triton"), "needs a GPU backend"),
        ((_Q, _K, _K), dict(implementation="mosaic_gpu"), "mosaic_gpu"),
        ((_Q, _K, _K), dict(implementation="triton", interpret=True,
                            block_sizes=BlockSizes(block_k=24)), "power of 2"),
        ((_Q[..., :48], _K[..., :48], _K[..., :48]), dict(implementation="triton", interpret=True),
         "head_dim must be one of"),
    ],
)
def test_invalid_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # non-causal with padded keys: the plainest loop bounds
        dict(causal=True, sliding_window=129, logits_soft_cap=30.0, alibi_slopes=jnp.ones(8),
             segment_ids=jnp.zeros((2, 1000), jnp.int32)),
    ],
    ids=["plain", "all_features"],
)
def test_kernels_lower_to_triton_for_cuda(kwargs):
    # Interpret mode never runs the Triton lowering rules; lowering for an abstract H100 from this
    # CPU host (as jax.export would) catches kernel code that only interprets, and shows that
    # "auto" and the tile table follow the target, not the host.
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
    attend = functools.partial(flash_attention, implementation="triton", **kwargs)

    def fwd_bwd(q, k, v):
        return jax.vjp(attend, q, k, v)[1](jnp.ones(q.shape, q.dtype))

    with lowering_for("NVIDIA H100"):
        assert fa_api._choose("auto", q.shape, kv.shape, q.dtype, AttentionSpec(),
                              BlockSizes(), False) == "mosaic_gpu"
        assert fa_triton._tuned(128) == fa_triton._TUNED["9.0"][128]
        text = jax.jit(fwd_bwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
    assert fa_triton._tuned(128) == fa_triton._FALLBACK[128]  # back on the CPU host
