"""Kernels inside a sharded model run per shard (``layers/per_shard.py``): on a data x tensor
mesh of fake CPU devices each layer's Pallas kernel (interpret mode) sits inside a
``shard_map`` and the layer's output and every gradient equal the unsharded plain-JAX layer's;
under the pipeline's stage vmap the stage axis is manual too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kernel_checks import verified_triton_modules
from meshlm import sharding
from meshlm.config import DEFAULT_RULES, MeshConfig
from meshlm.layers.attention import Attention
from meshlm.layers.mamba import Mamba2Mixer, MambaMixer
from meshlm.layers.norms import Norm
from meshlm.layers.per_shard import per_shard
from meshlm.layers.retention import MultiScaleRetention
from pallas_kernels import lowering_for

LAYERS = {
    "attention": lambda impl, **kw: Attention(num_heads=4, num_kv_heads=2, head_dim=16,
                                              rope=True, implementation=impl, **kw),
    "mamba": lambda impl, **kw: MambaMixer(d_state=4, implementation=impl, **kw),
    "mamba2": lambda impl, **kw: Mamba2Mixer(d_state=16, head_dim=16, n_groups=2, chunk_size=16,
                                             implementation=impl, **kw),
    "retnet": lambda impl, **kw: MultiScaleRetention(num_heads=4, chunk_size=16,
                                                     implementation=impl, **kw),
    "layernorm": lambda impl, **kw: Norm(subtract_mean=True, use_bias=True, epsilon=1e-5,
                                         implementation=impl, **kw),
}
KERNEL = dict.fromkeys(LAYERS, "triton")


def _call(module, params, x, seg):
    if isinstance(module, (Attention, MultiScaleRetention)):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        return module.apply({"params": params}, x, pos, seg)
    if isinstance(module, Norm):
        return module.apply({"params": params}, x)
    return module.apply({"params": params}, x, seg)


@pytest.mark.parametrize("name", list(LAYERS))
def test_kernel_layers_run_per_shard_and_match(name, fast_compile):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 64)), jnp.float32)
    seg = jnp.asarray(np.repeat([[1] * 9 + [2] * 7], 4, axis=0), jnp.int32)  # packed documents
    reference = LAYERS[name]("xla")
    params = reference.init(jax.random.key(1), x, *(
        (jnp.broadcast_to(jnp.arange(16), (4, 16)), seg) if name in ("attention", "retnet")
        else () if name == "layernorm" else (seg,)))["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                          params)

    def loss(module):
        return lambda params, x: jnp.sum(jnp.sin(_call(module, params, x, seg)))

    want = jax.value_and_grad(loss(reference), argnums=(0, 1))(params, x)
    kernel = LAYERS[name](KERNEL[name], interpret=True)
    mesh = sharding.make_mesh(MeshConfig(data=2, tensor=2), jax.devices()[:4])
    with sharding.activate(mesh, DEFAULT_RULES):
        fn = jax.jit(jax.value_and_grad(loss(kernel), argnums=(0, 1)))
        assert "shard_map" in str(jax.make_jaxpr(fn)(params, x))
        got = fn(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-4)


def test_the_stage_axis_is_manual_under_the_pipeline_vmap():
    """Inside ``vmap(spmd_axis_name=<stage axes>)`` the stage axes join the manual axes (else the
    shard_map's local shapes disagree with its specs), and values and gradients are exact."""
    mesh = sharding.make_mesh(MeshConfig(data=2, pipeline=4), jax.devices())
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, 3)), jnp.float32)
    w = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)

    def stage(x, w):
        return per_shard(lambda x, w: jnp.sin(x * w), [(x, ("activation_batch", None)),
                                                      (w, (None,))], ("activation_batch", None))

    with sharding.activate(mesh, DEFAULT_RULES):
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("pipeline", "data")))
        f = jax.vmap(stage, in_axes=(0, None), spmd_axis_name="pipeline")
        got = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)))(x, w)
    want = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(x * w)), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_query_and_kv_heads_split_differently_is_an_error():
    from meshlm.layers.attention import attend

    rules = tuple((n, None if n == "activation_kv_heads" else a) for n, a in DEFAULT_RULES)
    mesh = sharding.make_mesh(MeshConfig(data=1, tensor=2), jax.devices()[:2])
    q = jnp.ones((2, 8, 4, 16), jnp.float32)
    k = jnp.ones((2, 8, 2, 16), jnp.float32)
    with sharding.activate(mesh, rules), pytest.raises(ValueError, match="same mesh axes"):
        attend(q, k, k, implementation="triton", interpret=True)


@pytest.mark.parametrize("family, fields", [
    ("gpt", dict(n_heads=4, d_ff=256)),
    ("gpt", dict(n_heads=4, d_ff=256, fuse_qkv=True)),
    ("mamba", dict(d_state=16)),
    ("mamba2", dict(d_state=16, head_dim=32, chunk_size=64, n_groups=2)),
    ("retnet", dict(n_heads=4, d_ff=256, chunk_size=64)),
])
def test_models_lowered_for_a_gpu_run_their_kernels_per_shard(family, fields):
    """Each family's train-step gradient lowered for an H200 on a data x tensor mesh (no GPU
    needed): its Triton kernels ("auto" on that target) sit inside shard_map, forward and
    backward."""
    import flax.linen as nn

    from meshlm.config import model_config

    cfg = model_config(family, vocab_size=256, d_model=128, n_layers=2, max_seq_len=128,
                       dtype="bfloat16", **fields)
    model = cfg.build()
    tokens = jnp.zeros((4, 128), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    mesh_cfg = MeshConfig(data=2, tensor=2)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4])
    seg = jnp.ones((4, 128), jnp.int32)

    def loss(p, t):
        return jnp.sum(model.apply({"params": p}, t, segment_ids=seg).astype(jnp.float32))

    with verified_triton_modules(), lowering_for("NVIDIA H200", mesh=mesh), \
            nn.logical_axis_rules(sharding.axis_rules(mesh_cfg)):
        text = jax.jit(jax.grad(loss)).trace(params, tokens).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 2  # forward and backward kernels
    assert text.count("sdy.manual_computation") >= 2  # the scanned layer's forward and backward


def test_norm_kernels_run_in_the_model_per_shard():
    """GPT-2's LayerNorms ("auto") lowered for an H200 on a data x tensor mesh run the
    layer_norm kernels inside shard_map, forward and backward (the scanned block's two norms and
    the final norm: six more kernels than with ``model.norm_implementation=xla``)."""
    import flax.linen as nn

    from meshlm.config import model_config

    mesh_cfg = MeshConfig(data=2, tensor=2)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4])
    tokens = jnp.zeros((4, 64), jnp.int32)

    def lowered(impl):
        model = model_config("gpt", vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                             d_ff=256, max_seq_len=64, dtype="bfloat16", norm="layernorm",
                             norm_implementation=impl).build()
        loss = lambda p, t: jnp.sum(model.apply({"params": p}, t).astype(jnp.float32))
        with verified_triton_modules(), lowering_for("NVIDIA H200", mesh=mesh), \
                nn.logical_axis_rules(sharding.axis_rules(mesh_cfg)):
            params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
            grad = jax.jit(jax.grad(loss))
            return (str(jax.make_jaxpr(grad)(params, tokens)),
                    grad.trace(params, tokens).lower(lowering_platforms=("cuda",)).as_text())

    (xla_jaxpr, xla), (auto_jaxpr, auto) = lowered("xla"), lowered("auto")
    assert "layer_norm_fwd" not in xla
    assert auto.count("__gpu$xla.gpu.triton") - xla.count("__gpu$xla.gpu.triton") == 6
    # XLA's form runs without a shard_map around it
    assert auto_jaxpr.count("shard_map") > xla_jaxpr.count("shard_map")


def test_rules_splitting_query_and_kv_heads_differently_are_a_config_error():
    import dataclasses

    from meshlm.config import ConfigError, load_config
    from meshlm.train.setup import build

    cfg = load_config(None, ["mesh.data=4", "mesh.tensor=2"])
    rules = tuple((n, None if n == "activation_kv_heads" else a) for n, a in cfg.mesh.rules)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=rules))
    with pytest.raises(ConfigError, match=r"split activation_heads \(tensor=2\) and "
                                          r"activation_kv_heads \(none\) differently"):
        build(cfg)
