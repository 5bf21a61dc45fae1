"""The run's tokenizer: a byte-level BPE trained on the train split, or the user's tokenizer.json.

Whichever it is, it is stored as ``<run_dir>/tokenizer.json`` so that a resumed run and
``meshlm generate`` use exactly the tokenizer the weights were trained with. Byte-level BPE maps
every byte sequence to tokens and back, so any text (any language, any Unicode, ``\\r\\n``)
survives ``decode(encode(text))`` unchanged, with no unknown token.
"""

from __future__ import annotations

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
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], num_texts: int, model_vocab_size: int, run_dir: pathlib.Path
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE with ``model_vocab_size`` tokens (fewer if the text runs out of
    merges) including ``<|endoftext|>``, and save it as ``<run_dir>/tokenizer.json``."""
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
    tokenizer.train_from_iterator(texts, trainer=trainer, length=num_texts)
    log.info(
        "trained a byte-level BPE of %d tokens on %d files in %.1fs",
        tokenizer.get_vocab_size(), num_texts, time.perf_counter() - start,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / TOKENIZER_FILE, tokenizer.to_str(pretty=True))
    return tokenizer
