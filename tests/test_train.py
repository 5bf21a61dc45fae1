"""Optimizer and train step: schedule values, the weight-decay mask, gradient accumulation, and a
loss that falls. One device (the sharded cases are in test_parallel.py)."""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from _helpers import compile_train_step
from meshlm.config import ConfigError, load_config
from meshlm.models import build_model
from meshlm.train.metrics import MetricWriter, format_mfu, mfu, peak_flops, read_jsonl
from meshlm.train.optimizer import (
    decay_mask,
    make_optimizer,
    make_schedule,
    schedule_change_note,
)
from meshlm.train.state import state_shardings

TINY = [
    "model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
    "model.d_ff=64", "model.max_seq_len=16", "model.attention=xla", "model.dtype=float32", "data.seq_len=16",
    "data.batch_size=8", "train.steps=40", "optimizer.warmup_steps=4", "optimizer.lr=1e-2",
]


def tiny(*overrides: str):
    return load_config(None, TINY + list(overrides))


def random_batch(cfg, seed: int) -> dict[str, np.ndarray]:
    """Two packed documents per row, so segment ids and the loss mask matter."""
    rng = np.random.default_rng(seed)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, (b, length + 1), dtype=np.int32)
    cut = length // 3
    segments = np.where(np.arange(length) < cut, 1, 2).astype(np.int32)
    positions = np.where(np.arange(length) < cut, np.arange(length), np.arange(length) - cut)
    mask = np.ones((b, length), np.float32)
    mask[:, cut - 1] = 0.0  # the target there belongs to the next document
    mask[0, -3:] = 0.0  # some padding: token counts differ between micro-batches
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.broadcast_to(segments, (b, length)).copy(),
        "positions": np.broadcast_to(positions, (b, length)).astype(np.int32).copy(),
        "loss_mask": mask,
    }


@functools.cache
def build(cfg):
    """``(initial state, compiled step)``; cached so tests sharing a config compile once (the
    step donates its input state, so callers start from a copy)."""
    _, _, state, step = compile_train_step(cfg, jax.devices()[:1])
    return jax.device_get(state), step


def test_schedule_warmup_then_cosine():
    cfg = tiny("optimizer.lr=1.0", "optimizer.warmup_steps=4", "optimizer.min_lr_ratio=0.1",
               "train.steps=14")
    lr = make_schedule(cfg)
    # Update k (0-based) uses (k+1)/warmup during warmup, then the half cosine over 10 updates.
    for k, want in [(0, 0.25), (1, 0.5), (3, 1.0)]:
        assert float(lr(k)) == pytest.approx(want, abs=1e-6)
    for k in (4, 8, 13):
        frac = (k + 1 - 4) / 10
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(lr(k)) == pytest.approx(want, abs=1e-6)
    assert float(lr(13)) == pytest.approx(0.1, abs=1e-6)
    assert float(lr(1000)) == pytest.approx(0.1, abs=1e-6)  # stays at the floor


def test_schedule_clamps_a_warmup_longer_than_training(caplog):
    """The default config's warmup is longer than a short trial run: the warmup is cut to one
    update short of the run, with one line saying so, instead of refusing the run."""
    with caplog.at_level("WARNING", logger="meshlm.train.optimizer"):
        lr = make_schedule(tiny("optimizer.lr=1.0", "optimizer.min_lr_ratio=0.1",
                                "optimizer.warmup_steps=30", "train.steps=10"))
    assert len(caplog.records) == 1
    assert "optimizer.warmup_steps=30" in caplog.text and "over 9 steps" in caplog.text
    for k in range(9):  # warms up over 9 updates, the 10th is the floor
        assert float(lr(k)) == pytest.approx((k + 1) / 9, abs=1e-6)
    assert float(lr(9)) == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ConfigError, match="warmup_steps=-1 must be >= 0"):
        make_schedule(tiny("optimizer.warmup_steps=-1"))


def test_schedule_change_on_resume_is_noted():
    """Extending train.steps of a resumed run with decay_steps unset stretches the cosine: one
    line names the jump and the override that pins the old schedule."""
    saved = tiny("optimizer.lr=1.0", "optimizer.warmup_steps=2", "train.steps=10")
    longer = tiny("optimizer.lr=1.0", "optimizer.warmup_steps=2", "train.steps=20")
    note = schedule_change_note(saved, longer, 10)
    old, new = float(make_schedule(saved)(10)), float(make_schedule(longer)(10))
    assert new > 2 * old
    assert note.count("\n") == 0 and f"from {old:.3g} to {new:.3g}" in note
    assert "optimizer.decay_steps=10" in note
    assert schedule_change_note(saved, saved, 10) is None
    assert schedule_change_note(saved, tiny("optimizer.lr=1.0", "optimizer.warmup_steps=2",
                                            "train.steps=20", "optimizer.decay_steps=10"),
                                10) is None


def test_no_weight_decay_on_norms_and_biases():
    cfg = tiny("optimizer.weight_decay=0.5", "optimizer.grad_clip=0")
    init = jax.jit(build_model(cfg.model).init)
    params = meta.unbox(init(jax.random.key(0), jnp.zeros((1, cfg.data.seq_len), jnp.int32)))
    params = params["params"]
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, m in flat.items() if m}
    assert any("embedding" in k for k in decayed)
    assert any("'kernel'" in k for k in decayed)
    for k, m in flat.items():
        if "norm" in k or k.endswith("['bias']") or k.endswith("['scale']"):
            assert not m, k
        else:
            assert m, k
    # The real optimizer with zero gradients: only decayed leaves move (by -lr * wd * p).
    params = jax.tree.map(lambda p: p + 1.0, params)  # biases init at 0; make every leaf nonzero
    tx, schedule = make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    lr0 = float(schedule(0))
    for (path, u), p, m in zip(jax.tree_util.tree_leaves_with_path(updates),
                               jax.tree.leaves(params), jax.tree.leaves(mask)):
        want = -lr0 * 0.5 * p if m else jnp.zeros_like(p)
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-8,
                                   err_msg=jax.tree_util.keystr(path))


def test_grad_accumulation_equals_full_batch():
    """Three updates with the batch split into 4 micro-batches (whose token counts differ) match
    three full-batch updates: losses, gradient norms and parameters."""
    batch = random_batch(tiny(), 0)
    results = {}
    for accum in (1, 4):
        state, step = build(tiny(f"train.grad_accum={accum}"))
        metrics = []
        for _ in range(3):
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
        results[accum] = (jax.device_get(state.params), metrics)
    (p1, m1), (p4, m4) = results[1], results[4]
    for a, b in zip(m1, m4):
        assert float(a["tokens"]) == float(b["tokens"]) == batch["loss_mask"].sum()
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-5)
    # Parameters moved ~1.5e-2 in three updates; 5e-5 also covers the key bias, whose gradient is
    # exactly zero in exact arithmetic (softmax ignores a shift shared by all keys), so Adam
    # normalises float32 rounding noise there.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_loss_falls_on_a_fixed_batch():
    cfg = tiny()
    state, step = build(cfg)
    batch = random_batch(cfg, 1)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(cfg.model.vocab_size), rel=0.05)  # uniform start
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 30


class FakeDevice:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


def test_mfu_uses_the_peak_table():
    h100 = FakeDevice("gpu", "NVIDIA H100 80GB HBM3")
    assert peak_flops(h100) == 989.4e12
    assert peak_flops(FakeDevice("gpu", "NVIDIA H100 PCIe")) == 756.5e12
    assert peak_flops(FakeDevice("gpu", "NVIDIA A100-SXM4-80GB")) == 312e12
    assert peak_flops(FakeDevice("tpu", "TPU v5 lite")) == 197e12
    assert peak_flops(FakeDevice("gpu", "Some Future GPU")) is None
    assert peak_flops(jax.devices()[0]) is None  # CPU
    # 8 H100s at 1e5 tokens/s of a 1e9-FLOP/token model: 1e14 / 7.915e15.
    assert mfu(1e5, 1e9, [h100] * 8) == pytest.approx(1e14 / (8 * 989.4e12))
    assert mfu(1e5, 1e9, jax.devices()) is None
    assert format_mfu(None) == "n/a" and format_mfu(0.4567) == "45.7%"


@pytest.mark.parametrize("flag", [True, False])
def test_cli_distributed_initializes_jax_before_training(monkeypatch, flag):
    from meshlm import cli
    from meshlm.train import loop

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append("initialize"))
    monkeypatch.setattr(loop, "train", lambda cfg: calls.append("train") or {"signal": None})
    config = pathlib.Path(__file__).parents[1] / "configs" / "default.yaml"
    cluster = ["--distributed", "--coordinator-address", "127.0.0.1:1234", "--num-processes", "1",
               "--process-id", "0"]
    assert cli.main(["train", "--config", str(config)] + cluster * flag) == 0
    assert calls == ["initialize", "train"] if flag else ["train"]


def test_setup_derives_the_state_shardings_once(monkeypatch):
    """``build`` traces the init abstractly once; ``init_state`` creates the state with exactly
    those shardings (no second abstract trace)."""
    from meshlm.train import setup

    derived, created = [], []

    def counted(*args):
        derived.append(state_shardings(*args))
        return derived[-1]

    monkeypatch.setattr(setup, "state_shardings", counted)
    monkeypatch.setattr(setup, "create_train_state", lambda *a: created.append(a[-1]))
    run = setup.build(tiny(), jax.devices()[:1])
    run.init_state()
    assert len(derived) == 1 and len(created) == 1
    assert jax.tree.leaves(created[0]) == jax.tree.leaves(derived[0][1])


def test_only_the_primary_process_writes_metrics(tmp_path):
    """Every process of a multi-process run shares the run directory; one record, not N."""
    for primary in (True, False, False):
        writer = MetricWriter(tmp_path, primary=primary)
        writer.write(1, "train", {"loss": 2.5, "mfu": None})
        writer.close()
    assert read_jsonl(tmp_path) == [{"step": 1, "split": "train", "loss": 2.5, "mfu": None}]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
