"""meshlm.data: the file split, the tokenizer, packing with segment ids and resumable iterators.

Packing is checked against an independent per-token computation (which document each stream
offset belongs to) on random documents, so an off-by-one at a row or document edge fails.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

import jax
import numpy as np
import pytest

from meshlm import distributed, sharding
from meshlm.config import ConfigError, MeshConfig, load_config
from meshlm.data import (
    BATCH_KEYS,
    EOS,
    TOKENIZER_FILE,
    Data,
    PackedRows,
    build_data,
    pipeline,
    process_rows,
)
from meshlm.data.corpus import corpus_split, split_files
from meshlm.data.tokenizer import CORPUS_RECORD, load_run_tokenizer

SEQ_LEN = 32
BATCH = 4
VOCAB = 400


def _cfg(*overrides: str):
    return load_config(None, [
        "data.max_files=8", f"data.seq_len={SEQ_LEN}", f"data.batch_size={BATCH}",
        f"model.vocab_size={VOCAB}", "model.max_seq_len=64", *overrides,
    ])


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, build_data(_cfg(), run_dir)


def _equal_batches(a, b):
    return all(np.array_equal(a[k], b[k]) for k in BATCH_KEYS)


# ------------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_complete():
    cfg = _cfg("data.max_files=40", "data.val_fraction=0.25").data
    first, second = corpus_split(cfg), corpus_split(cfg)
    assert first == second
    train, val = set(first.train), set(first.val)
    assert not train & val
    assert len(train) + len(val) == 40
    assert len(val) == 10
    assert all(f.suffix == ".py" for f in train | val)
    # No test-suite files in the default corpus.
    assert not any({"test", "tests"} & set(f.relative_to(first.root).parts[:-1])
                   for f in train | val)
    # A larger sample keeps the smaller one's files (hash order is a fixed permutation).
    bigger = corpus_split(_cfg("data.max_files=80").data)
    assert train | val <= set(bigger.train) | set(bigger.val)


def test_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
    names = [f"pkg{i % 3}/mod{i}.py" for i in range(12)]
    splits = []
    for where in ("a", "b/deeper"):
        root = tmp_path / where
        files = []
        for name in names:
            f = root / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"x = {name!r}\n")
            files.append(f)
        s = split_files(root, files, 0.25, None)
        splits.append(([f.relative_to(root) for f in s.train],
                       [f.relative_to(root) for f in s.val]))
    assert splits[0] == splits[1]
    assert len(splits[0][1]) == 3


@pytest.mark.parametrize("overrides, match", [
    (["data.val_fraction=0.0"], "val_fraction"),
    (["data.max_files=1"], "max_files"),
    (["data.paths=['x.py']"], "only read with data.source='files'"),
    (["data.source=files"], "needs data.paths"),
    (["data.source=files", "data.paths=['/nonexistent/*.txt']"], "matched no files"),
])
def test_bad_corpus_config_is_a_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        corpus_split(_cfg(*overrides).data)


# ------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_trained_saved_and_reused(stdlib_run):
    run_dir, data = stdlib_run
    saved = run_dir / TOKENIZER_FILE
    assert saved.is_file()
    assert data.vocab_size <= VOCAB
    assert data.tokenizer.token_to_id(EOS) == data.eos_id
    # Byte-level: any text round-trips, including what the BPE never saw.
    text = pathlib.Path(corpus_split(_cfg().data).val[0]).read_text()[:2000]
    text += "\n\tçà 漢字 \r\n🙂 <|endoftext|>"
    ids = data.tokenizer.encode(text).ids
    assert data.tokenizer.decode(ids, skip_special_tokens=False) == text
    # The run's tokenizer is what generate loads.
    reloaded = load_run_tokenizer(run_dir)
    assert reloaded.encode(text).ids == data.tokenizer.encode(text).ids
    # A second build reuses the saved tokenizer and the token cache, and sees the same batches.
    mtime = saved.stat().st_mtime_ns
    again = build_data(_cfg(), run_dir)
    assert saved.stat().st_mtime_ns == mtime
    assert again.tokenizer.to_str() == data.tokenizer.to_str()
    assert _equal_batches(again.val_batches(1)[0], data.val_batches(1)[0])
    # Another corpus in the same run is refused: the tokenizer never saw it, and retraining
    # would change the token ids the run's checkpoints were trained on.
    with pytest.raises(ConfigError, match=r"trained on another corpus \(7 train files under .*"
                                          r"this run's has 4 under .*data.tokenizer="):
        build_data(_cfg("data.max_files=5"), run_dir)
    assert saved.stat().st_mtime_ns == mtime


def test_a_run_keeps_its_tokenizer_for_a_new_corpus_when_told(stdlib_run, tmp_path):
    """``data.tokenizer=<run_dir>/tokenizer.json`` is the explicit way to keep it: the corpus
    record goes, and later runs of that directory reuse the tokenizer on any corpus."""
    run_dir, data = stdlib_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (TOKENIZER_FILE, CORPUS_RECORD):
        shutil.copy(run_dir / name, copy / name)
    kept = build_data(_cfg("data.max_files=5", f"data.tokenizer={copy / TOKENIZER_FILE}"), copy)
    assert kept.tokenizer.to_str() == data.tokenizer.to_str()
    assert not (copy / CORPUS_RECORD).exists()
    again = build_data(_cfg("data.max_files=6"), copy)
    assert again.tokenizer.to_str() == data.tokenizer.to_str()


def test_a_corpus_without_text_leaves_no_tokenizer(stdlib_run, tmp_path):
    """A corpus of blank files stops before a tokenizer of no text is saved (which a later run
    with a real corpus would have reused); the same run directory then trains on real text."""
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(4):
        (blank / f"empty{i}.txt").write_text(" \n" * i)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="hold no text to train a tokenizer on"):
        build_data(_cfg("data.source=files", f"data.paths=['{blank}/*.txt']",
                        "data.max_files=null"), run_dir)
    assert not (run_dir / TOKENIZER_FILE).exists()
    real = build_data(_cfg(), run_dir)
    assert real.tokenizer.to_str() == stdlib_run[1].tokenizer.to_str()


def test_tokenizer_vocab_larger_than_model_is_an_error(stdlib_run, tmp_path):
    run_dir, data = stdlib_run
    small = data.vocab_size - 1
    # The run's saved tokenizer no longer fits a smaller model.
    with pytest.raises(ConfigError, match=f"vocabulary of {data.vocab_size} tokens.*"
                                          f"model.vocab_size={small}"):
        build_data(_cfg(f"model.vocab_size={small}"), run_dir)
    # Nor does a user's tokenizer.json, and the new run directory is left untouched.
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="vocabulary of"):
        build_data(_cfg(f"model.vocab_size={small}",
                        f"data.tokenizer={run_dir / TOKENIZER_FILE}"), fresh)
    assert not fresh.exists()
    # A vocabulary too small for a byte-level BPE is refused before training.
    with pytest.raises(ConfigError, match="too small for a byte-level BPE"):
        build_data(_cfg("model.vocab_size=100"), tmp_path / "tiny")


def test_corrupt_user_tokenizer_is_an_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        build_data(_cfg(f"data.tokenizer={bad}"), tmp_path / "run")
    with pytest.raises(ConfigError, match="does not exist"):
        build_data(_cfg(f"data.tokenizer={tmp_path / 'missing.json'}"), tmp_path / "run")


def test_user_files_and_user_tokenizer(stdlib_run, tmp_path):
    run_dir, data = stdlib_run
    corpus = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "\n"]
    for i in range(10):
        f = corpus / f"sub{i % 2}" / f"doc{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(" ".join(rng.choice(words, size=int(rng.integers(5, 200)))))
    (corpus / "blank.txt").write_text("  \n")  # whitespace only: no document
    # Text that spells the separator is ordinary text, not a document boundary.
    (corpus / "sub0" / "doc0.txt").write_text(f"before {EOS} after\n")
    user_run = tmp_path / "user_run"
    cfg = _cfg("data.source=files", f"data.paths=['{corpus}/**/*.txt']", "data.max_files=null",
               "data.val_fraction=0.2", f"data.tokenizer={run_dir / TOKENIZER_FILE}")
    user = build_data(cfg, user_run)
    # The user's tokenizer is used as is and copied beside the run.
    assert user.tokenizer.to_str() == data.tokenizer.to_str()
    assert (user_run / TOKENIZER_FILE).read_text() == (run_dir / TOKENIZER_FILE).read_text()
    split = corpus_split(cfg.data)
    assert len(split.train) + len(split.val) == 11
    # Every non-blank file is exactly one framed document of one of the two streams.
    n_docs = len(user.train_rows.doc_starts) + len(user.val_rows.doc_starts)
    assert n_docs == 10
    n_eos = sum(int((np.asarray(r.tokens) == user.eos_id).sum())
                for r in (user.train_rows, user.val_rows))
    assert n_eos == 2 * n_docs
    stream = np.asarray(user.train_rows.tokens)
    first = split.train[0]
    if first.read_text().strip():
        ids = user.tokenizer.encode(first.read_text(), add_special_tokens=False).ids
        assert stream[0] == user.eos_id and list(stream[1 : 1 + len(ids)]) == ids
        assert stream[1 + len(ids)] == user.eos_id


# --------------------------------------------------------------------------------- packing


def _random_stream(rng, n_docs, max_len):
    lengths = rng.integers(1, max_len, size=n_docs)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = rng.integers(1, 1000, size=int(lengths.sum())).astype(np.uint16)
    return tokens, starts


@pytest.mark.parametrize("seed, n_docs, max_len, seq_len", [
    (0, 40, 20, 16),   # many short documents per row
    (1, 7, 150, 16),   # documents spanning several rows
    (2, 1, 50, 7),     # a single document, odd row length
    (3, 30, 3, 5),     # documents of one or two tokens
])
def test_packing_invariants(seed, n_docs, max_len, seq_len):
    rng = np.random.default_rng(seed)
    tokens, starts = _random_stream(rng, n_docs, max_len)
    rows = PackedRows(tokens, starts, seq_len)
    T = len(tokens)
    assert len(rows) == max(1, -(-(T - 1) // seq_len))
    # Independent reference: the document of each stream offset, and its start.
    doc = np.searchsorted(starts, np.arange(T), "right") - 1
    batch = {k: np.stack([rows[r][k] for r in range(len(rows))]) for k in BATCH_KEYS}
    for k in BATCH_KEYS:
        assert batch[k].shape == (len(rows), seq_len)
        assert batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    offsets = np.arange(len(rows))[:, None] * seq_len + np.arange(seq_len)[None, :]
    real = offsets < T  # a stream token as input (the very last one has no target)
    has_target = offsets < T - 1
    # Inputs and targets are the stream, shifted by one; every token after the first is a
    # target exactly once.
    np.testing.assert_array_equal(batch["inputs"][real], tokens[offsets[real]])
    np.testing.assert_array_equal(batch["targets"][has_target], tokens[offsets[has_target] + 1])
    assert not batch["targets"][~has_target].any()
    # Only the stream's tail is padding (segment 0, zeros).
    for k in ("inputs", "segment_ids", "positions"):
        assert not batch[k][~real].any()
    assert (batch["segment_ids"][real] > 0).all()
    for r in range(len(rows)):
        o = offsets[r][real[r]]
        seg = batch["segment_ids"][r][real[r]]
        # Segment ids: the documents (pieces) in a row numbered 1, 2, ... in order.
        _, expected = np.unique(doc[o], return_inverse=True)
        np.testing.assert_array_equal(seg, expected + 1)
        # Two tokens of a row share a segment iff they share a document: attention cannot cross.
        np.testing.assert_array_equal(seg[:, None] == seg[None, :],
                                      doc[o][:, None] == doc[o][None, :])
        # Positions restart at each document's first token in the row.
        piece_start = np.maximum(starts[doc[o]], r * seq_len)
        np.testing.assert_array_equal(batch["positions"][r][real[r]], o - piece_start)
    # The loss counts exactly the targets of the input's own document.
    mask = np.zeros(offsets.shape, np.float32)
    mask[has_target] = doc[offsets[has_target]] == doc[offsets[has_target] + 1]
    np.testing.assert_array_equal(batch["loss_mask"], mask)
    assert batch["loss_mask"].sum() == T - len(starts)


def test_row_index_out_of_range():
    rows = PackedRows(np.arange(10, dtype=np.uint16), np.array([0]), 4)
    with pytest.raises(IndexError):
        rows[len(rows)]
    with pytest.raises(ValueError, match="seq_len"):
        PackedRows(np.arange(10), np.array([0]), 0)


def test_real_corpus_rows(stdlib_run):
    _, data = stdlib_run
    eos = data.eos_id
    stream = np.asarray(data.train_rows.tokens)
    starts = data.train_rows.doc_starts
    # Each document is framed by <|endoftext|> on both sides.
    assert (stream[starts] == eos).all()
    assert (stream[np.concatenate([starts[1:], [len(stream)]]) - 1] == eos).all()
    assert stream.max() < data.vocab_size
    batch = data.val_batches(1)[0]
    # A document boundary is never a training target: the mask is zero exactly where the
    # input is the end-of-text closing a document and the target opens the next one.
    boundary = (batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1])
    assert (batch["loss_mask"][:, :-1][boundary] == 0).all()


# -------------------------------------------------------------------------------- iterators


@pytest.mark.parametrize("worker_count", [0, 2])
def test_iterator_state_round_trip(stdlib_run, worker_count):
    _, data = stdlib_run
    data = dataclasses.replace(data, worker_count=worker_count)
    it = data.train_iterator()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = data.train_iterator()
    resumed.set_state(state)
    for want in expected:
        assert _equal_batches(next(resumed), want)
    # A fresh iterator starts from the beginning, deterministically.
    a, b = data.train_iterator(), data.train_iterator()
    assert _equal_batches(next(a), next(b))
    assert not _equal_batches(next(data.train_iterator()), expected[0])


def test_epochs_are_reshuffled_permutations():
    rng = np.random.default_rng(5)
    tokens, starts = _random_stream(rng, 20, 30)
    rows = PackedRows(tokens, starts, 8)
    n = len(rows)
    data = Data(tokenizer=None, eos_id=0, vocab_size=1000, train_rows=rows, val_rows=rows,
                batch_size=1, seed=3, worker_count=0)
    it = data.train_iterator()
    seen = [next(it)["inputs"][0].tobytes() for _ in range(2 * n)]
    every_row = sorted(rows[i]["inputs"].tobytes() for i in range(n))
    assert sorted(seen[:n]) == every_row and sorted(seen[n:]) == every_row
    assert seen[:n] != seen[n:]
    # State across the epoch boundary restores too.
    it = data.train_iterator()
    for _ in range(n - 1):
        next(it)
    state = it.get_state()
    want = [next(it)["inputs"][0].tobytes() for _ in range(3)]
    it = data.train_iterator()
    it.set_state(state)
    assert [next(it)["inputs"][0].tobytes() for _ in range(3)] == want


def test_val_batches_are_fixed_and_padded(stdlib_run):
    _, data = stdlib_run
    n_rows = len(data.val_rows)
    n = -(-n_rows // BATCH)
    first, second = data.val_batches(n + 5), data.val_batches(n + 5)
    assert len(first) == n  # capped by the split's size
    assert all(_equal_batches(a, b) for a, b in zip(first, second))
    assert all(b[k].shape == (BATCH, SEQ_LEN) for b in first for k in BATCH_KEYS)
    rows = np.concatenate([b["inputs"] for b in first])
    np.testing.assert_array_equal(rows[:n_rows], np.stack([data.val_rows[i]["inputs"]
                                                           for i in range(n_rows)]))
    assert not np.concatenate([b["loss_mask"] for b in first])[n_rows:].any()
    with pytest.raises(ValueError, match="n >= 1"):
        data.val_batches(0)


# ---------------------------------------------------------------------------- many processes


@pytest.mark.parametrize("count", [2, 4])
def test_process_split_reassembles_the_global_batch(count):
    """Each simulated process's rows of a step, concatenated in process order, are the one-process
    batch (the local data ``make_array_from_process_local_data`` wants), and every process's
    iterator state is the global step, so a checkpoint resumes any process count."""
    rng = np.random.default_rng(7)
    tokens, starts = _random_stream(rng, 30, 40)
    rows = PackedRows(tokens, starts, 8)
    whole = Data(tokenizer=None, eos_id=0, vocab_size=1000, train_rows=rows, val_rows=rows,
                 batch_size=8, seed=1, worker_count=0)
    parts = [dataclasses.replace(whole, process_index=p, process_count=count)
             for p in range(count)]
    want_it, got_its = whole.train_iterator(), [p.train_iterator() for p in parts]
    for _ in range(len(rows) // 8 + 2):  # past an epoch boundary
        want, got = next(want_it), [next(it) for it in got_its]
        assert all(g["inputs"].shape == (8 // count, 8) for g in got)
        assert _equal_batches({k: np.concatenate([g[k] for g in got]) for k in BATCH_KEYS}, want)
        assert all(it.get_state() == want_it.get_state() for it in got_its)
    n = -(-len(rows) // 8)  # the last batch is padded
    for want, *got in zip(whole.val_batches(n), *[p.val_batches(n) for p in parts], strict=True):
        assert _equal_batches({k: np.concatenate([g[k] for g in got]) for k in BATCH_KEYS}, want)
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the 4 processes"):
        process_rows(6, 0, 4)


@pytest.mark.parametrize("mesh_axes, count, ok", [
    ({"data": 8}, 4, True),
    ({"data": 2, "tensor": 4}, 2, True),
    ({"data": 4, "tensor": 2}, 2, True),
    ({"data": 2, "tensor": 4}, 4, False),  # 4 processes, but the batch is split only 2 ways
])
def test_process_rows_are_what_the_batch_sharding_puts_on_its_devices(mesh_axes, count, ok):
    """With the 8 devices taken as ``count`` processes in device order, process p's devices hold
    exactly its process_rows of the batch (what the loop checks before any compute)."""
    cfg = MeshConfig(**{"data": 1, **mesh_axes})
    batch_sh = sharding.batch_sharding(sharding.make_mesh(cfg), sharding.axis_rules(cfg))
    devices = jax.devices()  # process-major, as jax orders the devices of several processes
    per = len(devices) // count
    for p in range(count):
        held = sharding.rows_held(batch_sh, (16, SEQ_LEN), devices[p * per:(p + 1) * per])
        rows = process_rows(16, p, count)
        assert (held == [(rows.start, rows.stop)]) == ok, (p, held, rows)


def test_other_processes_read_what_process_0_prepared(stdlib_run, tmp_path, monkeypatch):
    """Simulated process 1 of 2: it waits at the barrier, then reads process 0's tokenizer and
    token caches and never tokenizes; where process 0 left nothing it names the shared-directory
    requirement."""
    run_dir, data = stdlib_run
    # As process 0: the caches of this corpus, which a test that built another corpus in the same
    # run directory replaced (a run keeps one cache per split).
    build_data(_cfg(), run_dir)
    barriers = []
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "check_process_0", lambda ok, what: barriers.append(ok))
    monkeypatch.setattr(pipeline, "encode_documents", lambda *a: pytest.fail("tokenized"))
    mtime = (run_dir / TOKENIZER_FILE).stat().st_mtime_ns
    other = build_data(_cfg(), run_dir)
    assert len(barriers) == 1 and (other.process_index, other.process_count) == (1, 2)
    assert (run_dir / TOKENIZER_FILE).stat().st_mtime_ns == mtime
    assert other.tokenizer.to_str() == data.tokenizer.to_str()
    np.testing.assert_array_equal(other.train_rows.tokens, data.train_rows.tokens)
    assert _equal_batches(other.val_batches(1)[0],
                          {k: v[BATCH // 2:] for k, v in data.val_batches(1)[0].items()})
    with pytest.raises(ConfigError, match="every process sees"):
        build_data(_cfg(), tmp_path / "not_shared")
    with pytest.raises(ConfigError, match="every process sees"):
        build_data(_cfg(f"data.tokenizer={run_dir / TOKENIZER_FILE}"), tmp_path / "not_shared")
