"""The run's tokenizer: a byte-level BPE trained on the train split, or the user's tokenizer.json.

Whichever it is, it is stored as ``<run_dir>/tokenizer.json`` so that a resumed run and
``meshlm generate`` use exactly the tokenizer the weights were trained with. A trained one is
tied to its corpus by ``tokenizer.corpus.json`` (which train files it learned from): a later run
of the same directory on another corpus is refused rather than silently given a tokenizer that
never saw its text, and rather than retrained under checkpoints whose token ids it would change. Byte-level BPE maps
every byte sequence to tokens and back, so any text (any language, any Unicode, ``\\r\\n``)
survives ``decode(encode(text))`` unchanged, with no unknown token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from meshlm.config import ConfigError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CORPUS_RECORD = "tokenizer.corpus.json"  # which corpus the run's trained tokenizer learned from
EOS = "<|endoftext|>"
# The document separator looked up in a user's tokenizer, in this order (GPT-2, LLaMA-3,
# SentencePiece style, Gemma style).
EOS_CANDIDATES = (EOS, "<|end_of_text|>", "</s>", "<eos>")
# 256 byte symbols plus the separator: the smallest vocabulary a byte-level BPE can have.
MIN_TRAINED_VOCAB = 257


def vocab_size(tokenizer: tokenizers.Tokenizer) -> int:
    """Embedding rows the tokenizer needs: its largest token id + 1 (ids may have gaps)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def eos_id(tokenizer: tokenizers.Tokenizer, source: str) -> int:
    """The id of the end-of-text token that separates documents."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ConfigError(
        f"the tokenizer {source} has none of the end-of-text tokens {list(EOS_CANDIDATES)}; "
        "documents are separated by one, so add it as a special token"
    )


def check_fits(tokenizer: tokenizers.Tokenizer, model_vocab_size: int, source: str) -> None:
    """Every token id must index the model's embedding table."""
    needed = vocab_size(tokenizer)
    if needed > model_vocab_size:
        raise ConfigError(
            f"the tokenizer {source} has a vocabulary of {needed} tokens but the model's "
            f"embedding has model.vocab_size={model_vocab_size} rows; set model.vocab_size to at "
            f"least {needed} or use a smaller tokenizer"
        )


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Read a ``tokenizer.json`` (the HuggingFace tokenizers format)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ConfigError(f"{str(path)!r} is not a valid tokenizer.json: {e}") from e


def load_run_tokenizer(run_dir: str | os.PathLike) -> tokenizers.Tokenizer:
    """The tokenizer a run was trained with (what ``generate`` decodes with)."""
    return load_tokenizer(pathlib.Path(run_dir) / TOKENIZER_FILE)


def write_atomic(path: pathlib.Path, data: str) -> None:
    """Write, then rename into place, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def existing_tokenizer(
    tokenizer_path: str | None, run_dir: pathlib.Path, model_vocab_size: int, copy: bool = True
) -> tokenizers.Tokenizer | None:
    """The user's tokenizer (copied into the run when ``copy``) or the run's saved one, checked
    against the model; None when one has to be trained. Runs before any corpus work so a misfit
    stops first."""
    saved = run_dir / TOKENIZER_FILE
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        source = f"data.tokenizer={tokenizer_path!r}"
    elif saved.is_file():
        tokenizer = load_tokenizer(saved)
        source = f"{str(saved)!r} (saved by an earlier run)"
    else:
        return None
    check_fits(tokenizer, model_vocab_size, source)
    eos_id(tokenizer, source)
    if copy and tokenizer_path is not None:
        text = pathlib.Path(tokenizer_path).expanduser().read_text(encoding="utf-8")
        if not saved.is_file() or saved.read_text(encoding="utf-8") != text:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(saved, text)
        # The user's choice: not tied to a corpus (also how a run keeps its trained tokenizer
        # for a new corpus, with data.tokenizer=<run_dir>/tokenizer.json).
        (run_dir / CORPUS_RECORD).unlink(missing_ok=True)
    return tokenizer


def corpus_record(root: pathlib.Path, files: Iterable[pathlib.Path]) -> dict:
    """What identifies a corpus to its tokenizer: its train files' paths relative to the corpus
    root (not their sizes or times: an edited file needs no new tokenizer)."""
    names = sorted(f.relative_to(root).as_posix() for f in files)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return {"root": str(root), "files": len(names), "digest": digest}


def check_trained_on(run_dir: pathlib.Path, corpus: dict) -> None:
    """``ConfigError`` when the run's saved tokenizer was trained on another corpus than
    ``corpus`` (a ``corpus_record``). A tokenizer without a record (the user's, or saved before
    records) is not checked."""
    path = run_dir / CORPUS_RECORD
    if not path.is_file():
        return
    try:
        trained = json.loads(path.read_text(encoding="utf-8"))
        same = trained["digest"] == corpus["digest"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{str(path)!r} is unreadable ({e}); remove it to reuse "
                          f"{str(run_dir / TOKENIZER_FILE)!r} without the check") from e
    if not same:
        raise ConfigError(
            f"{str(run_dir / TOKENIZER_FILE)!r} was trained on another corpus "
            f"({trained['files']} train files under {trained['root']}; this run's has "
            f"{corpus['files']} under {corpus['root']}) and is not retrained, since the run's "
            "checkpoints depend on its token ids: use a fresh train.run_dir for this corpus, or "
            f"data.tokenizer={run_dir / TOKENIZER_FILE} to keep this tokenizer"
        )


def train_tokenizer(
    texts: Iterable[str], num_texts: int, model_vocab_size: int, run_dir: pathlib.Path,
    corpus: dict,
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE with ``model_vocab_size`` tokens (fewer if the text runs out of
    merges) including ``<|endoftext|>``, and save it as ``<run_dir>/tokenizer.json`` with
    ``corpus`` (its ``corpus_record``) beside it. Texts that are all blank are a ``ConfigError``
    and nothing is saved (a 257-token tokenizer of no text would be reused by later runs)."""
    if model_vocab_size < MIN_TRAINED_VOCAB:
        raise ConfigError(
            f"model.vocab_size={model_vocab_size} is too small for a byte-level BPE, which needs "
            f"at least {MIN_TRAINED_VOCAB} (256 bytes + {EOS})"
        )
    tokenizer = tokenizers.Tokenizer(models.BPE())
    # No prefix space: source code's leading characters are significant and must round-trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=model_vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    blank = True

    def watched(texts: Iterable[str]) -> Iterable[str]:
        nonlocal blank
        for text in texts:
            blank = blank and not text.strip()
            yield text

    tokenizer.train_from_iterator(watched(texts), trainer=trainer, length=num_texts)
    if blank:
        raise ConfigError(
            f"the train split's {num_texts} file(s) under {corpus['root']} hold no text to train "
            "a tokenizer on"
        )
    log.info(
        "trained a byte-level BPE of %d tokens on %d files in %.1fs",
        tokenizer.get_vocab_size(), num_texts, time.perf_counter() - start,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    # The record first: interrupted in between, the next run trains again and replaces it.
    write_atomic(run_dir / CORPUS_RECORD, json.dumps(corpus))
    write_atomic(run_dir / TOKENIZER_FILE, tokenizer.to_str(pretty=True))
    return tokenizer
