"""Training data: corpus files -> tokenizer -> packed token rows -> grain batches.

    data = build_data(cfg, run_dir)
    it = data.train_iterator()        # next(it) -> batch dict; it.get_state() / it.set_state(s)
    data.val_batches(n)               # the same n batches on every call

A batch is a dict of numpy arrays of shape (data.batch_size, data.seq_len): ``inputs``,
``targets`` (next tokens), ``segment_ids`` (documents in a row numbered from 1, 0 = padding),
``positions`` (restarting at 0 in each document) int32, and ``loss_mask`` float32 (0 on padding
and on the target that belongs to the next document). With several processes each process gets
only its ``process_rows`` of every batch.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import grain
import jax
import numpy as np
import tokenizers

from meshlm import distributed
from meshlm.config import Config, ConfigError
from meshlm.data.batches import SEQ2SEQ
from meshlm.data.corpus import corpus_split, read_text, split_files, user_files
from meshlm.data.pipeline import (
    BATCH_KEYS,
    PackedRows,
    process_rows,
    token_stream,
    train_iterator,
    val_batches,
)
from meshlm.data.tokenizer import (
    EOS,
    TOKENIZER_FILE,
    check_trained_on,
    corpus_record,
    eos_id,
    existing_tokenizer,
    load_run_tokenizer,
    train_tokenizer,
    vocab_size,
)

__all__ = [
    "BATCH_KEYS", "EOS", "TOKENIZER_FILE", "Data", "PackedRows", "build_data", "load_run_tokenizer",
    "process_rows",
]


@dataclasses.dataclass(frozen=True)
class Data:
    """A run's tokenizer and its train and validation rows."""

    tokenizer: tokenizers.Tokenizer
    eos_id: int  # <|endoftext|>: frames every document; start an unconditional sample with it
    vocab_size: int  # embedding rows the tokenizer needs (<= model.vocab_size)
    train_rows: PackedRows
    val_rows: PackedRows
    batch_size: int
    seed: int
    worker_count: int
    process_index: int = 0  # this process reads its process_rows share of every batch
    process_count: int = 1

    @property
    def seq_len(self) -> int:
        return self.train_rows.seq_len

    @property
    def num_train_tokens(self) -> int:
        """Tokens in one epoch of the train split (framing tokens included)."""
        return len(self.train_rows.tokens)

    @property
    def num_val_tokens(self) -> int:
        return len(self.val_rows.tokens)

    def train_iterator(self) -> grain.DatasetIterator:
        """Endless shuffled training batches (this process's rows of each); resumable exactly
        through get_state/set_state."""
        return train_iterator(self.train_rows, self.batch_size, self.seed, self.worker_count,
                              self.process_index, self.process_count)

    def val_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first ``n`` validation batches (fewer if the split is smaller; this process's
        rows of each), the same every call."""
        return val_batches(self.val_rows, self.batch_size, n, self.process_index,
                           self.process_count)


def build_data(cfg: Config, run_dir: str | os.PathLike) -> Data:
    """Load or train the tokenizer (kept as ``<run_dir>/tokenizer.json``), tokenize each split
    once (cached under ``<run_dir>/data``) and pack it into rows of ``data.seq_len`` tokens.

    Every config error (no matching files, a tokenizer larger than the model's vocabulary, a
    corpus too small to split) is raised as a ``ConfigError`` before any tokenizing, on every
    process. With several processes only process 0 trains the tokenizer and tokenizes; the others
    wait for it and read its files, so ``run_dir`` must be on a file system they all see.
    """
    d = cfg.data
    for name in ("seq_len", "batch_size"):
        if getattr(d, name) < 1:
            raise ConfigError(f"data.{name} must be positive, got {getattr(d, name)}")
    if d.worker_count < 0:
        raise ConfigError(f"data.worker_count must be >= 0, got {d.worker_count}")
    run_dir = pathlib.Path(run_dir)
    index, count = jax.process_index(), jax.process_count()
    process_rows(d.batch_size, index, count)  # the per-process split is possible
    if d.source == "pairs":
        return build_pair_data(cfg, run_dir)
    primary = index == 0
    tokenizer = existing_tokenizer(d.tokenizer, run_dir, cfg.model.vocab_size, copy=primary)
    split = corpus_split(d)
    corpus = corpus_record(split.root, split.train)
    if d.tokenizer is None and tokenizer is not None:  # the run's own: trained on this corpus?
        check_trained_on(run_dir, corpus)  # on every process, before process 0 may block them
    tokenizer_file = run_dir / TOKENIZER_FILE

    def token_streams(tokenizer: tokenizers.Tokenizer):
        eos = eos_id(tokenizer, repr(str(tokenizer_file)))
        vocab = vocab_size(tokenizer)
        rows = {
            name: task_rows(cfg, tokenizer, eos, *token_stream(
                name, tokenizer, tokenizer_file, files, eos, vocab, run_dir / "data",
                encode=primary), seed=d.seed + (name == "val"))
            for name, files in (("train", split.train), ("val", split.val))
        }
        return eos, vocab, rows

    failed = None
    if primary:
        try:
            if tokenizer is None:
                tokenizer = train_tokenizer(
                    (read_text(f) for f in split.train), len(split.train),
                    cfg.model.vocab_size - cfg.model.reserved_ids, run_dir, corpus,
                )
            eos, vocab, rows = token_streams(tokenizer)
        except Exception as e:  # noqa: BLE001 - re-raised after the others learn of it
            failed = e
    if count > 1:  # the barrier: the others read process 0's files after it
        distributed.check_process_0(failed is None, "preparing the tokenizer and token cache")
    if failed is not None:
        raise failed
    if not primary:
        if not tokenizer_file.is_file():
            raise ConfigError(
                f"{str(tokenizer_file)!r} is missing after process 0 saved the tokenizer; "
                "train.run_dir must be a directory that every process sees (a shared file system)"
            )
        if tokenizer is None:
            tokenizer = load_run_tokenizer(run_dir)
        eos, vocab, rows = token_streams(tokenizer)
    return Data(
        tokenizer=tokenizer,
        eos_id=eos,
        vocab_size=vocab,
        train_rows=rows["train"],
        val_rows=rows["val"],
        batch_size=d.batch_size,
        seed=d.seed,
        worker_count=d.worker_count,
        process_index=index,
        process_count=count,
    )


def task_rows(cfg: Config, tokenizer: tokenizers.Tokenizer, eos: int, tokens: np.ndarray,
              starts: np.ndarray, seed: int):
    """A split's token stream as rows of the model's batch type: packed next-token rows, or
    span-corrupted rows for a sequence-to-sequence family."""
    if cfg.model.batch_fields == SEQ2SEQ:
        from meshlm.data.seq2seq import span_corruption_rows

        return span_corruption_rows(cfg, tokenizer, eos, tokens, seed)
    return PackedRows(tokens, starts, cfg.data.seq_len)


def build_pair_data(cfg: Config, run_dir: pathlib.Path) -> Data:
    """``data.source: pairs``: JSONL (input, target) pairs, split by file as the text sources
    are, packed into ``SEQ2SEQ`` rows; the tokenizer is the user's (``data.tokenizer``), the
    run's, or one trained on the train pairs' text. Every process reads the (small) files."""
    from meshlm.data import seq2seq

    d = cfg.data
    if cfg.model.batch_fields != SEQ2SEQ:
        raise ConfigError(f"data.source='pairs' feeds a sequence-to-sequence family; "
                          f"model.family={cfg.model.family!r} reads a token stream (use "
                          "data.source 'stdlib' or 'files')")
    root, files = user_files(d.paths)
    split = split_files(root, files, d.val_fraction, d.max_files)
    texts = {name: [(f"{f}:{i + 1}", pair) for f in fs
                    for i, pair in enumerate(seq2seq.read_pairs(f, d.pair_fields))]
             for name, fs in (("train", split.train), ("val", split.val))}
    tokenizer = existing_tokenizer(d.tokenizer, run_dir, cfg.model.vocab_size,
                                   copy=jax.process_index() == 0)
    if tokenizer is None:
        if jax.process_count() > 1:
            raise ConfigError("data.source='pairs' with several processes needs "
                              "data.tokenizer (or a tokenizer saved in train.run_dir)")
        tokenizer = train_tokenizer(
            (t for _, pair in texts["train"] for t in pair), 2 * len(texts["train"]),
            cfg.model.vocab_size - cfg.model.reserved_ids, run_dir,
            corpus_record(root, split.train))
    eos = eos_id(tokenizer, repr(str(run_dir / TOKENIZER_FILE)))
    start = seq2seq.decoder_start_id(tokenizer, cfg.model.decoder_start_token)
    target_len = seq2seq.target_length(cfg)
    rows = {name: seq2seq.TextPairRows(
        seq2seq.encode_pairs(tokenizer, [p for _, p in items], eos, d.seq_len,
                             [w for w, _ in items], target_len), d.seq_len, start, target_len)
            for name, items in texts.items()}
    return Data(tokenizer=tokenizer, eos_id=eos, vocab_size=vocab_size(tokenizer),
                train_rows=rows["train"], val_rows=rows["val"], batch_size=d.batch_size,
                seed=d.seed, worker_count=d.worker_count, process_index=jax.process_index(),
                process_count=jax.process_count())
