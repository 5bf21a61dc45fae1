"""The mixture-of-experts layer and family: the dropless grouped-matmul layer against a dense
reference that runs every expert on every token, the router losses against their formulas, the
family's decoding, loss and FLOPs, and expert/data/tensor parallelism on 8 fake CPU devices against
one device."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import compile_train_step, packed_batches
from flax.core import meta

from meshlm import sharding
from meshlm.config import ConfigError, load_config, model_config
from meshlm.layers.moe import MoeMlp
from meshlm.train.setup import build

pytestmark = pytest.mark.usefixtures("fast_compile")

D_MODEL, D_FF, N_EXPERTS = 16, 24, 8
TOL = dict(atol=1e-5, rtol=1e-5)  # float32: the same products summed in another order


def random_params(shapes, seed):
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([0.3 * jax.random.normal(k, s.shape) for s, k in zip(leaves, keys)])


def layer_and_params(top_k, router, renormalize):
    layer = MoeMlp(n_experts=N_EXPERTS, top_k=top_k, d_ff=D_FF, router=router,
                   renormalize=renormalize)
    x = jax.random.normal(jax.random.key(0), (3, 7, D_MODEL))
    shapes = jax.eval_shape(layer.init, jax.random.key(1), x)["params"]
    return layer, random_params(meta.unbox(shapes), 2), x


def dense_reference(params, x, top_k, router, renormalize):
    """Every expert on every token, combined with the top-k weights (zero elsewhere)."""
    t = x.reshape(-1, x.shape[-1])
    logits = t @ params["router"]
    scores = jax.nn.softmax(logits) if router == "softmax" else jax.nn.sigmoid(logits)
    kth = jnp.sort(scores, axis=-1)[:, -top_k][:, None]
    weights = jnp.where(scores >= kth, scores, 0.0)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    h = (jax.nn.silu(jnp.einsum("td,edf->tef", t, params["wi_gate"]))
         * jnp.einsum("td,edf->tef", t, params["wi_up"]))
    out = jnp.einsum("tef,efd->ted", h, params["wo"])
    return jnp.einsum("ted,te->td", out, weights).reshape(x.shape)


@pytest.mark.parametrize("top_k, router, renormalize", [
    (2, "softmax", True), (1, "softmax", False), (3, "sigmoid", True), (2, "sigmoid", False)])
def test_dropless_layer_matches_the_dense_reference(top_k, router, renormalize):
    layer, params, x = layer_and_params(top_k, router, renormalize)

    cotangent = jax.random.normal(jax.random.key(3), x.shape)

    @functools.partial(jax.jit, static_argnums=2)
    def grads_and_output(p, x, dense):
        def f(p, x):
            y = (dense_reference(p, x, top_k, router, renormalize) if dense
                 else layer.apply({"params": p}, x))
            return jnp.sum(y * cotangent), y
        return jax.grad(f, argnums=(0, 1), has_aux=True)(p, x)

    (got, y_got), (want, y_want) = (grads_and_output(params, x, dense) for dense in (False, True))
    np.testing.assert_allclose(y_got, y_want, **TOL)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_router_losses_follow_their_formulas(router):
    top_k = 2
    layer, params, x = layer_and_params(top_k, router, True)
    mask = np.random.default_rng(0).random(x.shape[:2]) < 0.7  # padding left out
    _, state = layer.apply({"params": params}, x, jnp.asarray(mask), mutable=["intermediates"])
    got = {k: float(v[0]) for k, v in state["intermediates"].items()}

    t = np.asarray(x, np.float64).reshape(-1, D_MODEL)[mask.reshape(-1)]
    logits = t @ np.asarray(params["router"], np.float64)
    if router == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        probs = scores
    else:
        scores = 1 / (1 + np.exp(-logits))
        probs = scores / scores.sum(-1, keepdims=True)
    chosen = np.argsort(-scores, axis=-1)[:, :top_k]
    counts = np.bincount(chosen.reshape(-1), minlength=N_EXPERTS)
    fraction = counts / (len(t) * top_k)
    balance = N_EXPERTS * np.sum(fraction * probs.mean(0))
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(got["load_balance"], balance, rtol=1e-5)
    np.testing.assert_allclose(got["router_z"], np.mean(lse ** 2), rtol=1e-5)
    np.testing.assert_allclose(got["expert_load_max"], fraction.max() * N_EXPERTS, rtol=1e-6)


def test_layer_refuses_top_k_beyond_the_experts_and_unknown_routers():
    layer = MoeMlp(n_experts=4, top_k=5, d_ff=8)
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and n_experts=4"):
        layer.init(jax.random.key(0), jnp.ones((1, 2, 8)))
    with pytest.raises(ValueError, match="unknown router 'relu'; choose one of softmax, sigmoid"):
        MoeMlp(n_experts=4, top_k=2, d_ff=8, router="relu").init(
            jax.random.key(0), jnp.ones((1, 2, 8)))


def capacity_reference(params, x, top_k, capacity_factor):
    """``dense_reference`` with each expert keeping only its first ``ceil(capacity_factor *
    tokens * k / experts)`` assignments in (token, k) order; -> (output, kept (tokens, k))."""
    t = np.asarray(x, np.float64).reshape(-1, D_MODEL)
    logits = t @ np.asarray(params["router"], np.float64)
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    chosen = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, chosen, -1)
    weights /= weights.sum(-1, keepdims=True)
    capacity = int(np.ceil(capacity_factor * chosen.size / N_EXPERTS))
    seen, kept = np.zeros(N_EXPERTS, int), np.zeros(chosen.shape, bool)
    for i, e in enumerate(chosen.reshape(-1)):
        kept.reshape(-1)[i] = seen[e] < capacity
        seen[e] += 1
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    out = np.zeros_like(t)
    for i in range(len(t)):
        for j in np.flatnonzero(kept[i]):
            e = chosen[i, j]
            gate = t[i] @ p["wi_gate"][e]
            h = gate / (1 + np.exp(-gate)) * (t[i] @ p["wi_up"][e])
            out[i] += weights[i, j] * (h @ p["wo"][e])
    return out.reshape(x.shape), kept


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])
def test_capacity_factor_drops_the_overflow_and_reports_it(capacity_factor):
    layer, params, x = layer_and_params(2, "softmax", True)
    layer = layer.clone(capacity_factor=capacity_factor)
    got, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    want, kept = capacity_reference(params, x, 2, capacity_factor)
    np.testing.assert_allclose(got, want, **TOL)
    dropped = float(state["intermediates"]["dropped_fraction"][0])
    np.testing.assert_allclose(dropped, 1 - kept.mean(), atol=1e-7)
    assert (dropped > 0.2) if capacity_factor == 0.5 else (dropped == 0 or capacity_factor < 4)
    grad = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))


# Not an override: the rule table with activation_batch over the expert axis too (MaxText's
# layout, configs/moe_mixtral_1b.yaml), so the tokens reach the MoE layer already split.
BATCH_OVER_EXPERT = "batch-over-expert"
MESHES = {"ep8": ["mesh.data=1", "mesh.expert=8"], "dp2-ep4": ["mesh.data=2", "mesh.expert=4"],
          "dp2-ep2-tp2": ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2"],
          "dp2-ep4-batch": ["mesh.data=2", "mesh.expert=4", BATCH_OVER_EXPERT]}


def mesh_config(overrides):
    cfg = load_config(None, [o for o in overrides if o != BATCH_OVER_EXPERT])
    if BATCH_OVER_EXPERT not in overrides:
        return cfg
    rules = tuple((k, ("data", "fsdp", "expert")) if k == "activation_batch" else (k, v)
                  for k, v in cfg.mesh.rules)
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=rules))


@pytest.mark.parametrize("mesh", list(MESHES.values()), ids=list(MESHES))
def test_expert_parallel_layer_exchanges_tokens_by_all_to_all(mesh):
    """Each expert device takes its share of a data shard's tokens and sends each row to the
    device of its expert by all-to-all; with too few tokens to split
    (decoding one token) every device runs its experts on all of them and the outputs are
    summed. Output and gradients equal the dense reference either way."""
    cfg = mesh_config(mesh)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.axis_rules(cfg.mesh)
    layer, params, _ = layer_and_params(2, "softmax", True)
    x = jax.random.normal(jax.random.key(5), (8, 4, D_MODEL))
    cotangent = jax.random.normal(jax.random.key(6), x.shape)

    def loss(p, x, dense):
        y = dense_reference(p, x, 2, "softmax", True) if dense else layer.apply({"params": p}, x)
        return jnp.sum(y * cotangent[:x.shape[0], :x.shape[1]]), y

    grads = jax.grad(loss, argnums=(0, 1), has_aux=True)
    for tokens in (x, x[:2, :1]):
        want, y_want = grads(params, tokens, True)
        with sharding.activate(mesh, rules):
            compiled = jax.jit(grads, static_argnums=2).lower(params, tokens, False).compile()
            got, y = compiled(params, tokens)
        np.testing.assert_allclose(y, y_want, **TOL)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
        assert ("all-to-all" in compiled.as_text()) == (tokens.shape[1] > 1)
    # Capacity mode exchanges buffers of at most k * capacity rows per expert device: with room
    # for every assignment nothing drops; with less, the dropped share is reported.
    for factor in (8.0, 0.5):
        with sharding.activate(mesh, rules):
            y, state = jax.jit(functools.partial(
                layer.clone(capacity_factor=factor).apply, mutable=["intermediates"]))(
                    {"params": params}, x)
        dropped = float(state["intermediates"]["dropped_fraction"][0])
        if factor > 1:
            np.testing.assert_allclose(y, dense_reference(params, x, 2, "softmax", True), **TOL)
        assert (dropped == 0) == (factor > 1) and np.isfinite(np.asarray(y)).all()


# ---------------------------------------------------------------- the family
FIELDS = dict(vocab_size=64, d_model=32, n_layers=2, max_seq_len=32, n_heads=4, n_kv_heads=2,
              d_ff=32, n_experts=N_EXPERTS, top_k=2, dtype="float32")


@functools.cache
def model_and_params(scan: bool = True, moe_every: int = 1):
    cfg = model_config("moe", **FIELDS, scan_layers=scan, moe_every=moe_every)
    model = cfg.build()
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    return cfg, model, random_params(meta.unbox(shapes["params"]), 4)


def tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, FIELDS["vocab_size"], shape),
                       jnp.int32)


def test_decoding_routes_as_the_full_forward():
    """Prefill then one token at a time through a dense block and an MoE block (moe_every=2):
    every decoded token routes (and so computes) as in the full forward."""
    cfg, model, params = model_and_params(moe_every=2)
    seq = tokens(3, (2, 11))
    full = jax.jit(model.apply)({"params": params}, seq)
    cache = cfg.init_cache(model, 2, 11)
    step = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
    got = []
    for start, stop in [(0, 6)] + [(t, t + 1) for t in range(6, 11)]:
        logits, mutated = step({"params": params, "cache": cache}, seq[:, start:stop])
        cache = mutated["cache"]
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), full, atol=1e-5, rtol=1e-4)


def lm_batch(seed, b=2, length=12):
    toks = np.asarray(tokens(seed, (b, length + 1)))
    seg = np.ones((b, length), np.int32)
    seg[0, -3:] = 0  # padding: out of the loss and the router statistics
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)),
            "loss_mask": (seg > 0).astype(np.float32)}


def test_loss_adds_the_weighted_router_losses_of_every_layer():
    cfg, model, params = model_and_params()
    batch = lm_batch(5)
    total, count, aux = cfg.loss(model, params, batch)
    _, state = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], mutable=["intermediates"])
    per_layer = state["intermediates"]["layers"]["moe"]
    balance = np.asarray(per_layer["load_balance"][0])
    z = np.asarray(per_layer["router_z"][0])
    assert balance.shape == z.shape == (FIELDS["n_layers"],)
    np.testing.assert_allclose(aux["load_balance"], balance.mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["router_z"], z.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        aux["aux_loss"], cfg.load_balance_coef * balance.mean() + cfg.router_z_coef * z.mean(),
        rtol=1e-6)
    assert float(count) == batch["loss_mask"].sum()
    load = [float(aux[f"expert_load_max/layer_{i}"]) for i in range(FIELDS["n_layers"])]
    np.testing.assert_allclose(load, per_layer["expert_load_max"][0], rtol=1e-6)
    assert float(aux["expert_load_max"]) == max(load) >= 1.0
    # The unrolled stack reports the same numbers.
    cfg_u, model_u, _ = model_and_params(scan=False)
    unrolled = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"])
                for i in range(FIELDS["n_layers"])}
    params_u = {**{k: v for k, v in params.items() if k != "layers"}, **unrolled}
    total_u, _, aux_u = cfg_u.loss(model_u, params_u, batch)
    np.testing.assert_allclose(total_u, total, rtol=1e-5)
    for k in aux:
        np.testing.assert_allclose(aux_u[k], aux[k], rtol=1e-5)


def test_moe_every_interleaves_dense_layers_in_scanned_groups():
    """moe_every=2: groups of a dense SwiGLU block then an MoE block, scanned; the logits equal
    the blocks applied one by one, and the router statistics come from the MoE layers only."""
    from meshlm.models.gpt import Block

    cfg = model_config("moe", **{**FIELDS, "n_layers": 4}, moe_every=2, dense_d_ff=40)
    model = cfg.build()
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    params = random_params(meta.unbox(shapes["params"]), 8)
    layers = params["layers"]
    assert layers["dense_0"]["mlp"]["wi_gate"]["kernel"].shape == (2, FIELDS["d_model"], 40)
    assert layers["moe_layer"]["moe"]["wo"].shape == (2, N_EXPERTS, FIELDS["d_ff"],
                                                      FIELDS["d_model"])
    seq = tokens(9, (2, 10))
    pos = jnp.broadcast_to(jnp.arange(10), seq.shape)
    x = params["embed"]["embedding"][seq]
    for g in range(2):
        for sub, block_cfg in (("dense_0", cfg.dense_config()), ("moe_layer", cfg)):
            p = jax.tree.map(lambda a, g=g: a[g], layers[sub])
            x = Block(block_cfg).apply({"params": p}, x, pos, None)[0]
    x = cfg.make_norm("final_norm").apply({"params": params["final_norm"]}, x)
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, seq),
                               x @ params["lm_head"], atol=1e-5, rtol=1e-5)
    _, _, aux = cfg.loss(model, params, lm_batch(5))
    assert "expert_load_max/layer_1" in aux and "expert_load_max/layer_2" not in aux
    d, f = FIELDS["d_model"], FIELDS["d_ff"]
    assert (cfg.flops_per_token(16) - model_config("moe", **{**FIELDS, "n_layers": 4})
            .flops_per_token(16)) == 6 * 2 * (3 * d * 40 - (2 * 3 * d * f + d * N_EXPERTS))


def test_flops_count_only_the_active_experts():
    cfg = model_config("moe", **FIELDS)
    dense = model_config("gpt", **{k: v for k, v in FIELDS.items()
                                   if k not in ("n_experts", "top_k")},
                         mlp="swiglu", position="rope", norm="rmsnorm", use_bias=False)
    d, f, layers = FIELDS["d_model"], FIELDS["d_ff"], FIELDS["n_layers"]
    extra = 6 * layers * ((FIELDS["top_k"] - 1) * 3 * d * f + d * N_EXPERTS)
    assert cfg.flops_per_token(16) == dense.flops_per_token(16) + extra


def test_shared_experts_add_a_dense_swiglu_for_every_token():
    cfg = model_config("moe", **FIELDS, n_shared_experts=2)
    model = cfg.build()
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    params = random_params(meta.unbox(shapes["params"]), 6)
    shared = params["layers"]["shared_experts"]
    assert shared["wi_gate"]["kernel"].shape[-1] == 2 * FIELDS["d_ff"]
    seq = tokens(7, (2, 9))
    apply = jax.jit(lambda p: model.apply({"params": p}, seq))
    # Without their output projection the shared experts add nothing: the routed-only model.
    silent = {**params, "layers": {**params["layers"], "shared_experts": {
        **shared, "wo": jax.tree.map(jnp.zeros_like, shared["wo"])}}}
    routed_only = {**params, "layers": {k: v for k, v in params["layers"].items()
                                        if k != "shared_experts"}}
    np.testing.assert_allclose(apply(silent), jax.jit(
        lambda p: model_and_params()[1].apply({"params": p}, seq))(routed_only), **TOL)
    assert np.abs(np.asarray(apply(params) - apply(silent))).max() > 1e-3
    d, f = FIELDS["d_model"], FIELDS["d_ff"]
    assert (cfg.flops_per_token(16) - model_config("moe", **FIELDS).flops_per_token(16)
            == 6 * FIELDS["n_layers"] * 2 * 3 * d * f)


def train_losses(mesh_overrides, devices, steps=3):
    overrides = ["model.family=moe"] + [f"model.{k}={v}" for k, v in FIELDS.items()]
    cfg = mesh_config(overrides + mesh_overrides + [
        "data.seq_len=16", "data.batch_size=8", "optimizer.warmup_steps=1", "optimizer.lr=1e-2",
        "train.steps=10", "model.load_balance_coef=0.1", "model.router_z_coef=0.01"])
    mesh, rules, state, step = compile_train_step(cfg, devices)
    losses, metrics = [], {}
    for batch in packed_batches(cfg, 1) * steps:  # one batch again: the loss must fall
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh, rules)))
        losses.append(float(metrics["loss"]))
    return state, losses, metrics


@functools.cache
def single_device_losses():
    _, losses, metrics = train_losses(["mesh.data=1"], jax.devices()[:1])
    return losses, metrics


@pytest.mark.parametrize("mesh", list(MESHES.values()), ids=list(MESHES))
def test_parallel_training_matches_a_single_device(mesh):
    single, single_metrics = single_device_losses()
    state, losses, metrics = train_losses(mesh, jax.devices())
    np.testing.assert_allclose(losses, single, rtol=2e-5)
    for k in ("load_balance", "router_z", "expert_load_max", "dropped_fraction"):
        np.testing.assert_allclose(metrics[k], single_metrics[k], rtol=2e-5)
    assert losses[-1] < losses[0]
    # Each device holds only its experts (and, with tensor parallelism, its part of d_ff).
    sizes = dict(m.removeprefix("mesh.").split("=") for m in mesh if m != BATCH_OVER_EXPERT)
    ep, tp = int(sizes.get("expert", 1)), int(sizes.get("tensor", 1))
    w = state.params["layers"]["moe"]["wi_gate"]  # (layers, experts, embed, d_ff)
    shard = w.addressable_shards[0].data.shape
    assert shard == (w.shape[0], w.shape[1] // ep, w.shape[2], w.shape[3] // tp)


@pytest.mark.parametrize("fields, mesh, match", [
    ({"top_k": 9}, [], r"model.top_k=9 must be at most model.n_experts=8"),
    ({"router": "relu"}, [], r"model.router"),
    ({"mlp": "gelu"}, [], r"model.mlp='gelu': MoE experts are SwiGLU"),
    ({"load_balance_coef": -1}, [], r"model.load_balance_coef must be >= 0"),
    ({"n_shared_experts": -1}, [], r"model.n_shared_experts must be >= 0, got -1"),
    ({"moe_every": 3}, [], r"model.n_layers=4 must be a multiple of model.moe_every=3"),
    ({"capacity_factor": 0}, [], r"model.capacity_factor=0.0 must be > 0 \(null: dropless\)"),
    ({"capacity_factor": -1.5}, [], r"model.capacity_factor=-1.5 must be > 0"),
    ({"n_experts": 6}, ["mesh.data=2", "mesh.expert=4"],
     r"model.n_experts=6 does not divide over the 4 shards of logical axis 'expert'"),
])
def test_bad_moe_config_is_one_clear_error(fields, mesh, match):
    overrides = ["model.family=moe"] + [f"model.{k}={v}" for k, v in fields.items()]
    with pytest.raises(ConfigError, match=match):
        build(load_config(None, overrides + mesh + ["data.batch_size=8", "data.seq_len=16"]))


@pytest.mark.parametrize("path, mesh", [
    ("configs/moe_tiny.yaml", ["mesh.data=2", "mesh.expert=4"]),
    ("configs/moe_mixtral_1b.yaml", ["mesh.data=1", "mesh.expert=8", "model.attention=xla"]),
])
def test_shipped_configs_build_with_experts_spread(path, mesh):
    run = build(load_config(pathlib.Path(__file__).parents[1] / path, mesh))
    spec = run.abstract_state.params["layers"]["moe"]["wo"].sharding.spec
    assert spec[1] == "expert"  # (layers, experts, d_ff, embed)
    assert run.cfg.model.n_experts == 8 and run.cfg.model.top_k == 2
