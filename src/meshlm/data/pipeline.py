"""Token streams, packed rows and the grain pipelines that batch them.

Each split is tokenized once into one stream: every document framed as
``<|endoftext|> text <|endoftext|>`` (the first marks a start to generate from, the last teaches
the model to stop), documents back to back. The stream and the document start offsets are cached
as ``.npy`` files in ``<run_dir>/data`` and memory-mapped, so a restart does not tokenize again.

Packing is concatenate-then-split: row ``r`` is the stream's tokens ``[r*L, r*L + L]`` (``L + 1``
tokens, neighbouring rows sharing one), giving inputs ``[:-1]`` and next-token targets ``[1:]``,
so every token of the corpus is a target exactly once and nothing is padded but the stream's
tail. A document cut by a row edge continues in the next row as its own segment. Segment ids
number the documents (pieces) in a row from 1 and positions restart at 0 in each, which is what
keeps attention and positional encodings from crossing a document boundary; the loss mask drops
the one target per boundary that belongs to the next document.

Rows are computed from their index by array arithmetic, so the rows form a random-access grain
``MapDataset``: it is shuffled globally with a fresh permutation per epoch, repeated forever, and
its iterator's whole state is the index of the next batch. (grain's own packers,
``ConcatThenSplitIterDataset`` and ``FirstFitPackIterDataset``, are sequential ``IterDataset``s
that could only shuffle documents before packing and restore by replaying.)

With several processes each reads only its own block of every global batch (``process_rows``):
the same shuffled order as one process, cut into ``process_count`` contiguous blocks, so the
union over processes is the single-process batch and the iterator state (the global step) is the
same on every process. (grain's ``ShardByJaxProcess`` instead gives each process its own part of
the rows to shuffle, which changes the batches with the process count.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence

import grain
import numpy as np
import tokenizers

from meshlm.config import ConfigError
from meshlm.data.batches import DECODER_LM
from meshlm.data.corpus import read_text

log = logging.getLogger(__name__)

BATCH_KEYS = tuple(DECODER_LM)
_CACHE_FORMAT = 1  # bump when the stream layout changes so old caches are not reused
_ENCODE_CHUNK = 64  # files per tokenizer call: parallel inside, bounded memory outside


def _fingerprint(tokenizer_file: pathlib.Path, files: Sequence[pathlib.Path]) -> str:
    """Identifies a token stream: the tokenizer's bytes and each file's path, size and mtime."""
    entries = [[str(f), st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
    blob = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "tokenizer": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest(),
            "files": entries,
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_documents(
    tokenizer: tokenizers.Tokenizer, files: Sequence[pathlib.Path], eos_id: int, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The framed token stream of ``files`` (in order; blank files skipped) and each document's
    start offset in it."""
    pieces: list[np.ndarray] = []
    starts: list[int] = []
    offset = 0
    # Text that happens to spell a special token (a "<|endoftext|>" in a file) is ordinary text:
    # only the framing marks document boundaries.
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        for i in range(0, len(files), _ENCODE_CHUNK):
            texts = [t for t in map(read_text, files[i : i + _ENCODE_CHUNK]) if t.strip()]
            for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
                doc = np.empty(len(encoding.ids) + 2, dtype)
                doc[0] = doc[-1] = eos_id
                doc[1:-1] = encoding.ids
                pieces.append(doc)
                starts.append(offset)
                offset += len(doc)
    finally:
        tokenizer.encode_special_tokens = previous
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return stream, np.asarray(starts, np.int64)


def _save_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def token_stream(
    name: str,
    tokenizer: tokenizers.Tokenizer,
    tokenizer_file: pathlib.Path,
    files: Sequence[pathlib.Path],
    eos_id: int,
    vocab_size: int,
    cache_dir: pathlib.Path,
    encode: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The split's stream and document starts, from the cache when the tokenizer and files are
    unchanged, else tokenized and cached (``encode=False``: a missing cache is an error, for
    processes that only read what process 0 wrote).

    Cache files are named by the fingerprint and each is renamed into place whole, so a file
    that exists is complete and belongs to exactly these inputs, whatever was interrupted.
    """
    key = _fingerprint(tokenizer_file, files)
    tokens_path = cache_dir / f"{name}-{key}.tokens.npy"
    starts_path = cache_dir / f"{name}-{key}.starts.npy"
    if tokens_path.is_file() and starts_path.is_file():
        return np.load(tokens_path, mmap_mode="r"), np.load(starts_path)
    if not encode:
        raise ConfigError(
            f"{str(tokens_path)!r} is missing after process 0 tokenized the {name} split; "
            "train.run_dir must be a directory that every process sees (a shared file system)"
        )
    start = time.perf_counter()
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    tokens, starts = encode_documents(tokenizer, files, eos_id, dtype)
    if len(starts) == 0:
        raise ConfigError(f"the {name} split's {len(files)} file(s) hold no text")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f"{name}-*.npy"):
        stale.unlink()
    _save_npy_atomic(starts_path, starts)
    _save_npy_atomic(tokens_path, tokens)
    log.info(
        "tokenized the %s split: %d documents, %d tokens in %.1fs",
        name, len(starts), len(tokens), time.perf_counter() - start,
    )
    return np.load(tokens_path, mmap_mode="r"), starts


class PackedRows:
    """Random-access rows of a token stream, as batch-dict rows of length ``seq_len``.

    A grain data source (``__len__`` and ``__getitem__``); see the module docstring for the
    layout. Only the last row can have padding (segment id 0).
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, np.int64)
        self.seq_len = seq_len

    def __len__(self) -> int:
        # Row r predicts stream tokens r*L + 1 .. r*L + L; every token after the first is covered.
        return max(1, -(-(len(self.tokens) - 1) // self.seq_len))

    def __repr__(self) -> str:
        return f"PackedRows(tokens={len(self.tokens)}, rows={len(self)}, seq_len={self.seq_len})"

    def empty_row(self) -> dict[str, np.ndarray]:
        """A row that is all padding (fills out a last, short validation batch)."""
        zeros = np.zeros(self.seq_len, np.int32)
        return {
            "inputs": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
            "loss_mask": np.zeros(self.seq_len, np.float32),
        }

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {self!r}")
        L = self.seq_len
        start = index * L
        stop = min(start + L + 1, len(self.tokens))
        # Document starts strictly inside the window split it into pieces 1, 2, ...
        inner = self.doc_starts[
            np.searchsorted(self.doc_starts, start, "right") : np.searchsorted(
                self.doc_starts, stop, "left"
            )
        ]
        piece_starts = np.concatenate([[start], inner])
        offsets = np.arange(start, stop)
        piece = np.searchsorted(inner, offsets, "right")  # 0-based piece of each token
        tokens = np.zeros(L + 1, np.int32)
        segments = np.zeros(L + 1, np.int32)
        positions = np.zeros(L + 1, np.int32)
        n = stop - start
        tokens[:n] = self.tokens[start:stop]
        segments[:n] = piece + 1
        positions[:n] = offsets - piece_starts[piece]
        same_doc = (segments[:-1] == segments[1:]) & (segments[:-1] != 0)
        return {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "segment_ids": segments[:-1],
            "positions": positions[:-1],
            "loss_mask": same_doc.astype(np.float32),
        }


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of every global batch that process ``process_index`` of ``process_count`` reads:
    the ``process_index``-th of ``process_count`` equal contiguous blocks (what
    ``jax.make_array_from_process_local_data`` expects when the batch dimension is split across
    processes in process order)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if batch_size % process_count:
        raise ConfigError(
            f"data.batch_size={batch_size} is not divisible by the {process_count} processes "
            f"(each reads an equal share of every batch); use a multiple of {process_count}"
        )
    n = batch_size // process_count
    return slice(process_index * n, (process_index + 1) * n)


def train_dataset(
    rows: PackedRows, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """Rows shuffled (a different permutation each epoch), repeated forever, batched; element
    ``i`` is this process's ``process_rows`` of global batch ``i``. A batch may straddle two
    epochs; the row order depends only on ``seed``."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"data.seed must be in [0, 2**32), got {seed}")
    process_rows(batch_size, process_index, process_count)  # validates the split
    # Global batch i is blocks i*P .. i*P + P - 1 of the rows batched by B/P; this process's is
    # block i*P + p. drop_remainder: the length is then integer arithmetic; grain's default
    # computes ceil(sys.maxsize / batch_size) in floating point, which overflows for batch 1.
    return (
        grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
        .batch(batch_size // process_count, drop_remainder=True)[process_index::process_count]
    )


def train_iterator(
    rows: PackedRows, batch_size: int, seed: int, worker_count: int,
    process_index: int = 0, process_count: int = 1,
) -> grain.DatasetIterator:
    """An iterator over this process's part of the training batches; ``get_state()`` is
    ``{"next_index": i}`` (the global step, the same on every process), and ``set_state`` on a
    fresh iterator continues with exactly the batches that would follow."""
    read_options = grain.ReadOptions(
        num_threads=worker_count, prefetch_buffer_size=2 * worker_count
    )
    ds = train_dataset(rows, batch_size, seed, process_index, process_count)
    return iter(ds.to_iter_dataset(read_options))


def val_batches(
    rows: PackedRows, batch_size: int, n: int, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """This process's part (``process_rows``) of the first ``n`` batches of validation rows in
    order (fewer when the split is smaller), rows past the split's end filled with empty rows
    so that every batch has the same shape."""
    if n < 1:
        raise ValueError(f"val_batches needs n >= 1, got {n}")
    n = min(n, -(-len(rows) // batch_size))
    part = process_rows(batch_size, process_index, process_count)
    pad = rows.empty_row()
    out = []
    for i in range(n):  # by index: no prefetch threads for a handful of batches
        picked = [rows[j] if j < len(rows) else pad
                  for j in range(i * batch_size + part.start, i * batch_size + part.stop)]
        out.append({k: np.stack([r[k] for r in picked]) for k in pad})
    return out
