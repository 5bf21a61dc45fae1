"""Pipeline parallelism on 8 fake CPU devices: the pipelined loss and gradients equal the
unpipelined ones (GPipe and the circular schedule with 2 repeats; 2, 4, 8 stages; 1, P, 2P
microbatches; composed with FSDP, TP, remat and gradient accumulation; RetNet and MoE), each device
holds only its stage's layers, and bad settings are ConfigErrors before anything compiles."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm import sharding
from meshlm.config import ConfigError, load_config
from meshlm.layers.pipeline import per_stage_policy, stage_params, unstage_params
from meshlm.layers.stack import REMAT_POLICIES
from meshlm.train.setup import build
from meshlm.train.state import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPT = ("model.family=gpt", "model.vocab_size=64", "model.d_model=32", "model.n_layers=8",
       "model.n_heads=4", "model.d_ff=64", "model.max_seq_len=8", "model.attention=xla")
FAMILIES = {
    "gpt": GPT,
    "retnet": ("model.family=retnet", "model.vocab_size=64", "model.d_model=32",
               "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.chunk_size=8",
               "model.max_seq_len=8"),
    "moe": ("model.family=moe", "model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
            "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=16", "model.n_experts=4",
            "model.top_k=2", "model.max_seq_len=8", "model.attention=xla"),
}
COMMON = ("model.dtype=float32", "data.seq_len=8", "data.batch_size=16", "optimizer.lr=1e-2",
          "optimizer.warmup_steps=1")
# float32; the pipelined and plain stacks run the same layers in the same order on the same rows,
# so only the summation order of the sharded reductions differs (observed <= 1e-7).
LOSS_RTOL, GRAD_ATOL = 1e-5, 1e-6
pytestmark = pytest.mark.usefixtures("fast_compile")  # XLA's optimisations only cost time here


def config(family, *overrides):
    return load_config(None, [*FAMILIES[family], *COMMON, *overrides])


def batch(cfg):
    """Random tokens, two packed documents per row (positions restart, segment ids 1 and 2)."""
    rng = np.random.default_rng(0)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, (b, length + 1), dtype=np.int32)
    half = length // 2
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.repeat(np.int32([1, 2]), [half, length - half])[None].repeat(b, 0),
        "positions": np.concatenate([np.arange(half), np.arange(length - half)]).astype(
            np.int32)[None].repeat(b, 0),
        "loss_mask": (rng.random((b, length)) < 0.9).astype(np.float32),
    }


def loss_and_grads_fn(run):
    """Jitted ``params, batch -> (mean loss, aux), grads`` under the run's mesh and rules."""
    def loss(params, b):
        total, count, aux = run.cfg.model.loss(run.model, params, b)
        return total / count, aux

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def call(params, b):
        with sharding.activate(run.mesh, run.rules):
            return fn(jax.device_put(params, run.shardings.params), run.put(b))
    return call


@functools.cache
def reference(family):
    """Unpipelined (data parallel) params, perturbed off their trivial initial values, with the
    loss, aux and gradients they give."""
    run = build(config(family))
    params = run.init_state(0).params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in
                             zip(leaves, keys)])
    (loss, aux), grads = loss_and_grads_fn(run)(params, batch(run.cfg))
    return run.cfg, jax.device_get(params), float(loss), jax.device_get(aux), jax.device_get(grads)


def staged(params, schedule):
    return {**params, "layers": stage_params(params["layers"], schedule)}


def check_pipelined(family, *overrides):
    """The pipelined run's loss, aux and gradients against ``reference(family)``; returns the
    run, its loss function and the staged params."""
    cfg, params, loss, aux, grads = reference(family)
    run = build(config(family, *overrides))
    assert run.model.pipeline is not None
    fn = loss_and_grads_fn(run)
    pipelined = staged(params, run.model.pipeline)
    (p_loss, p_aux), p_grads = fn(pipelined, batch(cfg))
    np.testing.assert_allclose(float(p_loss), loss, rtol=LOSS_RTOL)
    for name in aux:
        np.testing.assert_allclose(p_aux[name], aux[name], rtol=LOSS_RTOL, atol=1e-7)
    p_grads = {**p_grads, "layers": unstage_params(p_grads["layers"])}
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree.leaves(p_grads)):
        np.testing.assert_allclose(got, want, atol=GRAD_ATOL, err_msg=jax.tree_util.keystr(path))
    return run, fn, pipelined


@pytest.mark.parametrize("overrides", [
    ("mesh.pipeline=2", "train.microbatches=1"),
    ("mesh.pipeline=8", "train.microbatches=16"),
    ("mesh.pipeline=4", "train.microbatches=8", "train.pipeline_repeats=2"),
    ("mesh.pipeline=2", "train.microbatches=4", "model.fuse_qkv=true"),
], ids=["gpipe_p2_m1", "gpipe_p8_m16", "circular_p4_r2_m8", "gpipe_p2_m4_fuse_qkv"])
def test_pipelined_gpt_equals_unpipelined(overrides):
    check_pipelined("gpt", *overrides)


def test_circular_schedule_runs_each_layer_group_in_order():
    """P=2, 2 repeats: stage s holds layer groups s and s+2. The same compiled step with the
    groups on the wrong (repeat, stage) slots gives another loss, so the check above can fail."""
    run, fn, pipelined = check_pipelined(
        "gpt", "mesh.pipeline=2", "train.microbatches=2", "train.pipeline_repeats=2")
    swapped = {**pipelined, "layers": jax.tree.map(lambda a: a.swapaxes(0, 1),
                                                   pipelined["layers"])}
    (wrong, _), _ = fn(swapped, batch(run.cfg))
    assert abs(float(wrong) - reference("gpt")[2]) > 1e-3


@pytest.mark.parametrize("family,overrides", [
    ("retnet", ("mesh.pipeline=2", "train.microbatches=2")),
    # one microbatch: the router statistics (averaged over microbatches) equal the full batch's
    ("moe", ("mesh.pipeline=2", "train.microbatches=1")),
])
def test_other_families_pipelined(family, overrides):
    check_pipelined(family, *overrides)


def test_composed_train_steps_and_stage_placement():
    """pipeline=2 x fsdp=2 x tensor=2 with remat and 2 accumulation steps trains to the
    single-device losses; every device holds only its stage's layers (and their Adam moments),
    and the stages exchange activations by collective-permute."""
    extra = ("train.grad_accum=2", "model.remat=dots_no_batch")
    plain = build(config("gpt", *extra))
    run = build(config("gpt", "mesh.pipeline=2", "mesh.fsdp=2", "mesh.tensor=2",
                       "train.microbatches=2", *extra))
    params = reference("gpt")[1]
    states = [
        jax.device_put(TrainState(jnp.zeros((), jnp.int32), p, r.tx.init(p)), r.shardings)
        for r, p in ((plain, params), (run, staged(params, run.model.pipeline)))]
    rng = np.random.default_rng(1)
    for _ in range(2):
        b = {**batch(plain.cfg), "inputs": rng.integers(0, 64, (16, 8), dtype=np.int32)}
        (states[0], want), (states[1], got) = [r.train_step(s, r.put(b)) for r, s in
                                               ((plain, states[0]), (run, states[1]))]
        np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=LOSS_RTOL)
        np.testing.assert_allclose(float(got["grad_norm"]), float(want["grad_norm"]), rtol=1e-4)

    pipe = run.mesh.axis_names.index("pipeline")
    stage_of = {d: int(np.argwhere(run.mesh.devices == d)[0][pipe]) for d in run.mesh.devices.flat}
    mu = states[1].opt_state[1][0].mu["layers"]  # adamw: (clip, (scale_by_adam, ...))
    for leaf in jax.tree.leaves(states[1].params["layers"]) + jax.tree.leaves(mu):
        assert leaf.sharding.spec[1] == "pipeline"
        for shard in leaf.addressable_shards:
            assert shard.data.shape[1] == 1
            assert shard.index[1] == slice(stage_of[shard.device], stage_of[shard.device] + 1)
    assert "collective-permute" in run.train_step.as_text()


def test_layers_around_the_stack_split_the_batch_over_the_stages():
    """Embedding, head and loss are not staged: their rows are split over the pipeline axis too,
    so no stage computes them for the whole batch."""
    run = build(config("gpt", "mesh.pipeline=2", "train.microbatches=2"))
    params = staged(reference("gpt")[1], run.model.pipeline)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (16, 8)), jnp.int32)
    with sharding.activate(run.mesh, run.rules):
        logits = jax.jit(lambda p, t: run.model.apply({"params": p}, t))(params, tokens)
    assert "pipeline" in str(logits.sharding.spec[0])
    unpipelined = build(config("gpt"))
    want = unpipelined.model.apply({"params": reference("gpt")[1]}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_remat_policy_sees_through_the_stage_vmap(capsys):
    """Under the stage vmap every weight matmul has a batch dimension; "dots_no_batch" must still
    save the layer's matmul outputs (and only those), as it does without the vmap."""
    def layer(w, x):
        return jnp.tanh(jnp.tanh(x @ w) @ w)

    w, x = jnp.ones((2, 4, 4)), jnp.ones((2, 3, 4))
    for policy, saved in ((REMAT_POLICIES["dots_no_batch"], 0),
                          (per_stage_policy(REMAT_POLICIES["dots_no_batch"]), 2)):
        staged_layer = jax.vmap(jax.checkpoint(layer, policy=policy))
        jax.ad_checkpoint.print_saved_residuals(lambda w, x: jnp.sum(staged_layer(w, x)), w, x)
        assert capsys.readouterr().out.count("output of dot_general") == saved


@pytest.mark.parametrize("overrides,match", [
    (("mesh.pipeline=2", "train.pipeline_repeats=3"),
     r"model.n_layers=8 is not divisible by mesh.pipeline=2 x train.pipeline_repeats=3"),
    (("mesh.pipeline=2", "train.microbatches=3"),
     r"train.microbatches=3 does not divide the per-data-shard batch.*16 rows over data-parallel "
     r"size 4"),
    (("mesh.pipeline=4", "train.microbatches=2", "train.pipeline_repeats=2"),
     r"needs train.microbatches >= mesh.pipeline, got 2 < 4"),
    (("train.microbatches=2",), r"train.microbatches=2 .* mesh.pipeline=1"),
    (("mesh.pipeline=2", "model.scan_layers=false"), r"mesh.pipeline=2 needs model.scan_layers"),
    (("mesh.pipeline=2", "model.attention=cudnn"), r"cannot run model.attention='cudnn'"),
    (("mesh.pipeline=3", "mesh.data=1"), r"asks for 3 devices but 8 exist"),
    (("train.microbatches=0",), r"train.microbatches=0 .* must be >= 1"),
])
def test_bad_pipeline_settings_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build(config("gpt", *overrides))


def test_encoder_decoder_is_not_pipelined():
    """T5's two stacks are not pipelined (yet): a ConfigError naming the family."""
    with pytest.raises(ConfigError, match=r"mesh.pipeline=2: model.family='t5' \(T5\) has no "
                                          r"pipelined layer stack"):
        build(load_config(ROOT / "configs" / "t5_tiny.yaml", ["mesh.pipeline=2"]))
