"""Bad input stops ``train`` with one ConfigError before any compute (nothing is tokenized or
compiled) and leaves an existing checkpoint byte-for-byte as it was. 8 fake CPU devices."""

from __future__ import annotations

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from meshlm.config import ConfigError, load_config
from meshlm.train import checkpoint, loop, setup

BASE = [
    "model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "model.d_ff=64", "model.max_seq_len=32", "model.attention=xla", "data.seq_len=32",
    "data.batch_size=8", "data.max_files=10", "train.steps=4", "optimizer.warmup_steps=1",
    "train.progress_bar=false",
]


def snapshot(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def with_checkpoint(run_dir: pathlib.Path, *overrides: str) -> pathlib.Path:
    """``run_dir`` holding one real (small) checkpoint saved with BASE + ``overrides``."""
    cfg = load_config(None, BASE + [f"train.run_dir={run_dir}", *overrides])
    abstract = setup.build(cfg).abstract_state  # the run's real shapes; values are not read
    state = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract).replace(
        step=jnp.asarray(2, jnp.int32))
    with checkpoint.open_manager(run_dir, cfg.checkpoint) as manager:
        checkpoint.save(manager, state, {"next_index": 2}, cfg)
        manager.wait_until_finished()
    assert checkpoint.finished_steps(run_dir) == [2]
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    return with_checkpoint(tmp_path)


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the loop gets as far as tokenizing or compiling."""

    monkeypatch.setattr(setup, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setattr(setup, "create_train_state", lambda *a, **k: pytest.fail("initialised"))
    monkeypatch.setattr("meshlm.data.build_data", lambda *a, **k: pytest.fail("tokenized"))


def expect_refusal(run_dir, overrides, match):
    before = snapshot(run_dir / "checkpoints")
    with pytest.raises(ConfigError, match=match) as info:
        loop.train(load_config(None, BASE + [f"train.run_dir={run_dir}", *overrides]))
    assert "\n" not in str(info.value)  # one message
    assert snapshot(run_dir / "checkpoints") == before
    return str(info.value)


@pytest.mark.parametrize("overrides, match", [
    (["mesh.data=16"], r"asks for 16 devices but 8 exist"),
    (["mesh.data=2", "mesh.tensor=2"], r"asks for 4 devices but 8 exist"),
    (["mesh.tensor=3"], r"need a multiple of 3 devices but 8 exist"),
])
def test_more_devices_than_exist(run_dir, no_compute, overrides, match):
    assert len(jax.devices()) == 8
    expect_refusal(run_dir, overrides, match)


@pytest.mark.parametrize("overrides, match", [
    (["data.batch_size=12"], r"data.batch_size=12 is not divisible by the data-parallel size 8"),
    (["data.batch_size=16", "train.grad_accum=4"],
     r"micro-batches of 4 rows .* data-parallel size 8 .*multiple of 32"),
    (["mesh.data=2", "mesh.fsdp=4", "data.batch_size=4"],
     r"data-parallel size 8 \(.*data=2 x fsdp=4\)"),
])
def test_batch_not_divisible_by_data_parallel_size(run_dir, no_compute, overrides, match):
    expect_refusal(run_dir, overrides, match)


def test_tokenizer_larger_than_model_vocab(tmp_path, monkeypatch):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    needed = max(tok.get_vocab().values()) + 1
    assert needed > 257
    # The tokenizer check runs in build_data (before any corpus work); only compile is forbidden.
    monkeypatch.setattr(setup, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setattr(setup, "create_train_state", lambda *a, **k: pytest.fail("initialised"))
    run_dir = with_checkpoint(tmp_path / "run", "model.vocab_size=257")
    expect_refusal(run_dir, ["model.vocab_size=257", f"data.tokenizer={path}"],
                   rf"vocabulary of {needed} tokens .*model.vocab_size=257")


def test_resume_false_refuses_to_overwrite_checkpoints(run_dir, no_compute):
    expect_refusal(run_dir, ["checkpoint.resume=false"], r"already holds checkpoints")


@pytest.mark.parametrize("count, match", [
    (3, r"data.batch_size=8 is not divisible by the 3 processes"),
    # One real process holds every row of the batch; as process 0 of 2 it would read half.
    (2, r"devices of process 0 hold rows \[0, 8\) of each 8-row batch, but with 2 processes it "
        r"reads rows \[0, 4\)"),
])
def test_batch_does_not_split_across_processes(run_dir, no_compute, monkeypatch, count, match):
    monkeypatch.setattr(jax, "process_count", lambda: count)
    expect_refusal(run_dir, [], match)
