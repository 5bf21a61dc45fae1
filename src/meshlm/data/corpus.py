"""Which text files make up the corpus, and how they are split into train and validation.

The default corpus is the Python standard library's own ``.py`` sources: every Python install has
them, so a first run needs no download. Its test suites (``test/``, ``tests/``, ``idle_test/``)
are left out: they are half of the library by size and mostly generated cases and data, and
leaving them out keeps the default tokenizer training and tokenizing to a few seconds. The user's
own corpus is a list of globs (``data.source=files``, ``data.paths=[...]``).

Splitting is by file, never inside one, so no validation text was seen in training. Files are
ordered by a hash of their path relative to the corpus root: the order is a fixed pseudo-random
permutation that does not depend on the seed, the machine or where the corpus lives, so the same
files land in validation on every run. ``max_files`` keeps a prefix of that order, a sample spread
over the whole corpus rather than its alphabetically first package.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pathlib
import sysconfig

from meshlm.config import ConfigError, DataConfig

# Directory names under the stdlib root whose files are not part of the default corpus.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


@dataclasses.dataclass(frozen=True)
class Split:
    """The corpus files of each split, each in path order (a stable order to tokenize in)."""

    root: pathlib.Path  # the files' common directory (names in messages are relative to it)
    train: tuple[pathlib.Path, ...]
    val: tuple[pathlib.Path, ...]


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The standard library root and its ``.py`` files outside test suites and site-packages."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [
        f
        for f in root.rglob("*.py")
        if f.is_file() and not STDLIB_EXCLUDED_DIRS.intersection(f.relative_to(root).parts[:-1])
    ]
    if not files:
        raise ConfigError(f"found no .py files under the Python standard library at {root}")
    return root, sorted(files)


def user_files(patterns: tuple[str, ...]) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """Expand the globs (``**`` recursive, ``~`` allowed); each must match at least one file."""
    if not patterns:
        raise ConfigError("data.source='files' needs data.paths: a list of globs of text files")
    found: set[pathlib.Path] = set()
    unmatched = []
    for pattern in patterns:
        matches = [
            pathlib.Path(p).resolve()
            for p in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(p)
        ]
        if not matches:
            unmatched.append(pattern)
        found.update(matches)
    if unmatched:
        raise ConfigError(
            f"data.paths: these globs matched no files: {unmatched} "
            f"(relative globs are taken from the working directory {os.getcwd()})"
        )
    files = sorted(found)
    root = pathlib.Path(os.path.commonpath(files))
    if len(files) == 1:
        root = root.parent
    return root, files


def _order_key(root: pathlib.Path, path: pathlib.Path) -> bytes:
    return hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()


def split_files(
    root: pathlib.Path, files: list[pathlib.Path], val_fraction: float, max_files: int | None
) -> Split:
    """Keep ``max_files`` of the files in hash order; the first ``round(val_fraction * n)`` (at
    least one, at most ``n - 1``) are the validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if max_files is not None and max_files < 2:
        raise ConfigError(f"data.max_files must be at least 2 (one per split), got {max_files}")
    ordered = sorted(files, key=lambda f: _order_key(root, f))[:max_files]
    if len(ordered) < 2:
        raise ConfigError(
            f"the corpus under {root} has {len(ordered)} file(s); splitting by file into train and "
            "validation needs at least 2 (split a single large file into several)"
        )
    n_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
    return Split(
        root=root, train=tuple(sorted(ordered[n_val:])), val=tuple(sorted(ordered[:n_val]))
    )


def corpus_split(cfg: DataConfig) -> Split:
    """The train/validation files the config names (``source`` ``stdlib`` or ``files``)."""
    if cfg.source == "stdlib":
        if cfg.paths:
            raise ConfigError(
                f"data.paths={list(cfg.paths)} is only read with data.source='files' "
                "(data.source is 'stdlib')"
            )
        root, files = stdlib_files()
    else:
        root, files = user_files(cfg.paths)
    return split_files(root, files, cfg.val_fraction, cfg.max_files)


def read_text(path: pathlib.Path) -> str:
    """A file's text as UTF-8; undecodable bytes become U+FFFD rather than failing the run."""
    return path.read_text(encoding="utf-8", errors="replace")
