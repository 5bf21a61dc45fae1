"""The run directory: checked before anything is computed.

A run writes its config, tokenizer, token cache, metrics and checkpoints there. A directory it
cannot write would otherwise fail only after the data is prepared and the step compiled (or, for
checkpoints, at the first save), so the check writes and removes a probe file first.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

from meshlm.config import ConfigError

# Subdirectories a resumed run writes into (each checked when it exists).
WRITTEN_SUBDIRS = ("checkpoints", "data", "tensorboard")


def check_writable(run_dir: str | os.PathLike) -> pathlib.Path:
    """``run_dir`` as a path, after checking that this process can write there: in the
    directory and its ``WRITTEN_SUBDIRS`` when they exist, else in its nearest existing parent
    (where it will be created). Nothing is created. ``ConfigError`` naming the directory and the
    system's reason otherwise, or when ``run_dir`` is empty (which would write into the current
    directory)."""
    if not os.fspath(run_dir).strip():
        raise ConfigError(
            "train.run_dir is empty; name the directory the run writes its checkpoints, metrics "
            "and tokenizer to, e.g. train.run_dir=runs/default"
        )
    path = pathlib.Path(run_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probed = [existing] + [path / d for d in WRITTEN_SUBDIRS if (path / d).is_dir()]
    for directory in probed:
        try:
            with tempfile.TemporaryFile(dir=directory, prefix=".meshlm-write-check-"):
                pass
        except OSError as e:
            where = "" if directory == path else f" (in {str(directory)!r})"
            raise ConfigError(
                f"train.run_dir={str(path)!r} is not writable{where}: {e.strerror or e}; choose "
                "a directory this user can write to"
            ) from e
    return path
