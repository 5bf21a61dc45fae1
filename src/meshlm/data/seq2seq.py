"""Sequence-to-sequence rows (the ``SEQ2SEQ`` batch type): T5 span corruption over the token
stream, and (input, target) text pairs from JSONL files for fine-tuning.

Span corruption (Raffel et al. 2020, section 3.1.4; the algorithm of T5's
``random_spans_noise_mask``): a chunk of ``n`` stream tokens is split into alternating non-noise
and noise spans (``round(n * noise_density)`` noise tokens in ``round(noise / mean_span)`` spans,
span lengths a uniformly random composition, the chunk starting with non-noise). The encoder
reads the chunk with each noise span replaced by one sentinel; the decoder predicts each sentinel
followed by the span it replaced; both end in the end-of-text token. Sentinel ``i`` is id
``vocab_size - 1 - i`` (T5's ``<extra_id_i>``), ids a trained tokenizer leaves free. ``n`` is the
longest chunk whose corrupted input fills at most ``seq_len`` and whose targets fit the decoder's
``target_len`` (T5's ``random_spans_helper``; its targets length is the default ``target_len``:
512 -> 114 at density 0.15, mean span 3), so packing is concatenate-then-split over the stream,
as T5 pre-trains on C4: a row is one example, and no example is ever truncated.

Text pairs are packed first-fit in file order: a row takes whole examples while both its encoder
and its decoder side have room, each example one segment (the same id on both sides).

Rows are random access (grain ``MapDataset`` sources, as ``pipeline.PackedRows``): a row's noise
is drawn from ``(seed, row)``, so resuming gives exactly the same batches.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers

from meshlm.config import Config, ConfigError
from meshlm.data.batches import DECODER_SIDE, SEQ2SEQ
from meshlm.data.tokenizer import vocab_size as tokenizer_vocab_size


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """``(noise tokens, noise spans)`` of a chunk of ``length >= 2`` tokens: at least one of
    each, at least one non-noise token, never more spans than either kind of token."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span_length)), 1)
    return noise, min(spans, noise, length - noise)


def noise_mask(length: int, noise_density: float, mean_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(length,)``: True on noise tokens, alternating spans starting with non-noise."""
    noise, spans = span_counts(length, noise_density, mean_span_length)

    def composition(total: int) -> np.ndarray:  # ``spans`` positive parts summing to ``total``
        cuts = np.sort(rng.choice(np.arange(1, total), spans - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    lengths = np.stack([composition(length - noise), composition(noise)], axis=1).reshape(-1)
    return np.repeat(np.arange(lengths.size) % 2 == 1, lengths)


def corrupt(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` without end-of-text: noise spans -> sentinels in the inputs; each
    sentinel followed by its span in the targets."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    sentinel = vocab_size - np.cumsum(starts)  # the i-th span (from 0): vocab_size - 1 - i
    inputs = np.where(starts, sentinel, tokens)[~mask | starts]
    targets = np.concatenate([[s, *tokens[a:b]] for s, a, b in zip(
        sentinel[starts], np.flatnonzero(starts), _span_ends(mask))]) if starts.any() else []
    return inputs.astype(np.int32), np.asarray(targets, np.int32)


def _span_ends(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]])) + 1


def corrupted_lengths(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """``(inputs, targets)`` lengths, end-of-text included, of a corrupted chunk of ``n``."""
    noise, spans = span_counts(n, noise_density, mean_span_length)
    return n - noise + spans + 1, noise + spans + 1


def chunk_length(seq_len: int, noise_density: float, mean_span_length: float,
                 target_len: int | None = None) -> int:
    """The longest stream chunk (grown from 2 until the next length does not fit, as T5's
    ``random_spans_helper``) whose corrupted inputs fit ``seq_len`` tokens and targets
    ``target_len`` (None: no bound on the targets)."""
    def fits(n):
        inputs, targets = corrupted_lengths(n, noise_density, mean_span_length)
        return inputs <= seq_len and (target_len is None or targets <= target_len)

    if not fits(2):
        raise ConfigError(f"data.seq_len={seq_len} / data.target_len={target_len} is too short "
                          "for span corruption (>= 3 each)")
    n = 2
    while fits(n + 1):
        n += 1
    return n


def span_target_length(seq_len: int, noise_density: float, mean_span_length: float) -> int:
    """The decoder length span corruption needs at encoder length ``seq_len``: the targets of
    the longest chunk whose inputs fit (T5's ``random_spans_helper``; 512 -> 114 at 0.15, 3)."""
    n = chunk_length(seq_len, noise_density, mean_span_length)
    return corrupted_lengths(n, noise_density, mean_span_length)[1]


def target_length(cfg: Config) -> int:
    """The run's decoder length: ``data.target_len``, or for None the span-corruption targets
    length (``span_target_length``) on text and ``data.seq_len`` on JSONL pairs."""
    d = cfg.data
    if d.target_len is not None:
        length = d.target_len
    elif d.source == "pairs":
        length = d.seq_len
    else:
        length = span_target_length(d.seq_len, d.noise_density, d.mean_noise_span_length)
    if not 1 <= length <= cfg.model.max_seq_len:
        derived = "" if d.target_len is not None else " (derived from data.seq_len)"
        raise ConfigError(f"the decoder length data.target_len={length}{derived} must be in "
                          f"[1, model.max_seq_len={cfg.model.max_seq_len}]")
    return length


def pack(pairs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, target_len: int,
         start_id: int) -> dict[str, np.ndarray]:
    """One ``SEQ2SEQ`` row (encoder side ``seq_len``, decoder side ``target_len``) from
    ``(input, target)`` token pairs (end-of-text included) that fit: pair ``k`` is segment
    ``k + 1`` on both sides; the decoder reads its target shifted right behind ``start_id``."""
    row = {k: np.zeros(target_len if k in DECODER_SIDE else seq_len, np.dtype(d))
           for k, d in SEQ2SEQ.items()}
    enc = dec = 0
    for segment, (inp, tgt) in enumerate(pairs, start=1):
        if enc + len(inp) > seq_len or dec + len(tgt) > target_len:
            raise ValueError(f"pairs of {enc + len(inp)} / {dec + len(tgt)} tokens do not fit a "
                             f"row of {seq_len} / {target_len}")
        side = slice(enc, enc + len(inp))
        row["encoder_tokens"][side] = inp
        row["encoder_positions"][side] = np.arange(len(inp))
        row["encoder_segment_ids"][side] = segment
        side = slice(dec, dec + len(tgt))
        row["targets"][side] = tgt
        row["decoder_tokens"][side] = np.concatenate([[start_id], tgt[:-1]])
        row["decoder_positions"][side] = np.arange(len(tgt))
        row["decoder_segment_ids"][side] = segment
        row["loss_mask"][side] = 1.0
        enc, dec = enc + len(inp), dec + len(tgt)
    return row


class SpanCorruptionRows:
    """Random-access span-corrupted rows of a token stream: row ``r`` is chunk ``r`` of
    ``chunk_length`` tokens (the stream's remainder past the last whole chunk is left out unless
    the stream is shorter than one chunk), corrupted with noise drawn from ``(seed, r)``. The
    decoder side has ``target_len`` positions (None: ``span_target_length``)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, vocab_size: int, eos_id: int,
                 start_id: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 seed: int = 0, target_len: int | None = None):
        if not 0 < noise_density < 1 or mean_span_length < 1:
            raise ConfigError(f"span corruption needs 0 < data.noise_density < 1 and "
                              f"data.mean_noise_span_length >= 1, got {noise_density} and "
                              f"{mean_span_length}")
        self.tokens, self.seq_len = tokens, seq_len
        self.vocab_size, self.eos_id, self.start_id = vocab_size, eos_id, start_id
        self.noise_density, self.mean_span_length, self.seed = (noise_density, mean_span_length,
                                                                seed)
        self.target_len = (span_target_length(seq_len, noise_density, mean_span_length)
                           if target_len is None else target_len)
        self.chunk = chunk_length(seq_len, noise_density, mean_span_length, self.target_len)

    @property
    def sentinels_needed(self) -> int:
        """Noise spans (sentinels) of a full chunk."""
        return span_counts(self.chunk, self.noise_density, self.mean_span_length)[1]

    def __len__(self) -> int:
        return max(1, len(self.tokens) // self.chunk)

    def __repr__(self) -> str:
        return (f"SpanCorruptionRows(tokens={len(self.tokens)}, rows={len(self)}, "
                f"seq_len={self.seq_len}, target_len={self.target_len}, chunk={self.chunk})")

    def empty_row(self) -> dict[str, np.ndarray]:
        return pack([], self.seq_len, self.target_len, self.start_id)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {self!r}")
        chunk = np.asarray(self.tokens[index * self.chunk:(index + 1) * self.chunk], np.int32)
        if len(chunk) < 2:
            return self.empty_row()
        rng = np.random.default_rng((self.seed, index))
        mask = noise_mask(len(chunk), self.noise_density, self.mean_span_length, rng)
        inputs, targets = corrupt(chunk, mask, self.vocab_size)
        eos = [self.eos_id]
        return pack([(np.concatenate([inputs, eos]), np.concatenate([targets, eos]))],
                    self.seq_len, self.target_len, self.start_id)


class TextPairRows:
    """Random-access rows of ``(input, target)`` token pairs packed first-fit in order: encoder
    side ``seq_len``, decoder side ``target_len`` (None: ``seq_len``)."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
                 start_id: int, target_len: int | None = None):
        self.pairs, self.seq_len, self.start_id = list(pairs), seq_len, start_id
        self.target_len = seq_len if target_len is None else target_len
        self.rows: list[tuple[int, int]] = []
        begin, enc, dec = 0, 0, 0
        for i, (inp, tgt) in enumerate(self.pairs):
            if enc + len(inp) > seq_len or dec + len(tgt) > self.target_len:
                self.rows.append((begin, i))
                begin, enc, dec = i, 0, 0
            enc, dec = enc + len(inp), dec + len(tgt)
        if begin < len(self.pairs):
            self.rows.append((begin, len(self.pairs)))
        self.tokens = (np.concatenate([np.concatenate(p) for p in self.pairs]) if self.pairs
                       else np.zeros(0, np.int32))

    def __len__(self) -> int:
        return max(1, len(self.rows))

    def __repr__(self) -> str:
        return (f"TextPairRows(pairs={len(self.pairs)}, rows={len(self)}, "
                f"seq_len={self.seq_len}, target_len={self.target_len})")

    def empty_row(self) -> dict[str, np.ndarray]:
        return pack([], self.seq_len, self.target_len, self.start_id)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {self!r}")
        if not self.rows:
            return self.empty_row()
        begin, end = self.rows[index]
        return pack(self.pairs[begin:end], self.seq_len, self.target_len, self.start_id)


# ----------------------------------------------------------------------------------------------
# Checks and sources that build_data uses for a SEQ2SEQ family.


def decoder_start_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
    """The id of the model's ``decoder_start_token``; a ``ConfigError`` if the tokenizer lacks
    it."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        raise ConfigError(
            f"model.decoder_start_token={token!r} is not a token of the tokenizer; set it to one "
            f"of its special tokens {specials}")
    return token_id


def check_sentinels(tokenizer: tokenizers.Tokenizer, model_vocab: int, extra_ids: int,
                    needed: int) -> None:
    """The sentinels ``vocab_size - 1 - i`` for ``i < needed`` must be free ids of the model's
    vocabulary, beyond every token of the tokenizer."""
    have = tokenizer_vocab_size(tokenizer)
    if have + extra_ids > model_vocab:
        raise ConfigError(
            f"the tokenizer's {have} tokens and model.extra_ids={extra_ids} sentinels need "
            f"model.vocab_size >= {have + extra_ids}, got {model_vocab}; raise model.vocab_size "
            "or use a smaller tokenizer")
    if needed > extra_ids:
        raise ConfigError(
            f"span corruption of a data.seq_len row has {needed} noise spans but only "
            f"model.extra_ids={extra_ids} sentinel ids; raise model.extra_ids (and "
            "model.vocab_size) or lower data.seq_len")


def span_corruption_rows(cfg: Config, tokenizer: tokenizers.Tokenizer, eos_id: int,
                         tokens: np.ndarray, seed: int) -> SpanCorruptionRows:
    """A split's stream as span-corrupted rows, after the vocabulary and start-token checks."""
    m, d = cfg.model, cfg.data
    rows = SpanCorruptionRows(
        tokens, d.seq_len, vocab_size=m.vocab_size, eos_id=eos_id,
        start_id=decoder_start_id(tokenizer, m.decoder_start_token),
        noise_density=d.noise_density, mean_span_length=d.mean_noise_span_length, seed=seed,
        target_len=target_length(cfg))
    check_sentinels(tokenizer, m.vocab_size, m.extra_ids, rows.sentinels_needed)
    return rows


def read_pairs(path: pathlib.Path, fields: tuple[str, str]) -> list[tuple[str, str]]:
    """The ``(input, target)`` strings of a JSONL file: one object per non-blank line."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{path}:{number}: not a JSON object ({e})") from e
        values = [record.get(f) if isinstance(record, dict) else None for f in fields]
        bad = [f for f, v in zip(fields, values) if not isinstance(v, str)]
        if bad:
            raise ConfigError(f"{path}:{number}: needs string fields {list(fields)} "
                              f"(data.pair_fields); missing or not a string: {bad}")
        out.append((values[0], values[1]))
    return out


def encode_pairs(tokenizer: tokenizers.Tokenizer, texts: Sequence[tuple[str, str]], eos_id: int,
                 seq_len: int, where: Sequence[str], target_len: int | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token pairs, end-of-text appended to each side; an input longer than ``seq_len`` (the
    encoder length) or a target longer than ``target_len`` (the decoder length; None:
    ``seq_len``) is a ``ConfigError`` naming the example."""
    flat = [t for pair in texts for t in pair]
    encoded = tokenizer.encode_batch_fast(flat, add_special_tokens=False) if flat else []
    limits = (("input", "data.seq_len", seq_len, "en"),
              ("target", "data.target_len", seq_len if target_len is None else target_len, "de"))
    pairs = []
    for i, name in enumerate(where):
        sides = [np.asarray(encoded[2 * i + j].ids + [eos_id], np.int32) for j in (0, 1)]
        for (side, key, limit, coder), tokens in zip(limits, sides):
            if len(tokens) > limit:
                raise ConfigError(
                    f"{name}: the {side} has {len(tokens)} tokens (with end-of-text), more than "
                    f"{key}={limit} (the {coder}coder length); shorten it or raise {key}")
        pairs.append((sides[0], sides[1]))
    return pairs
