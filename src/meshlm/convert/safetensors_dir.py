"""A local HuggingFace checkpoint directory read lazily, and safetensors shards written.

Tensors are read one at a time with ``safetensors.safe_open(framework="numpy")`` (no torch),
which maps the file and copies only the requested tensor; a host never holds more than the
tensor being converted.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from meshlm.convert.mapping import ConversionError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpoint:
    """``config.json`` and the tensors of a HF directory: one ``*.safetensors`` file or several
    listed by ``model.safetensors.index.json``."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = pathlib.Path(directory).expanduser()
        if not self.dir.is_dir():
            raise ConversionError(f"{str(self.dir)!r} is not a directory")
        config = self.dir / CONFIG_FILE
        if not config.is_file():
            raise ConversionError(f"{str(self.dir)!r} has no {CONFIG_FILE}")
        try:
            self.config = json.loads(config.read_text())
        except ValueError as e:
            raise ConversionError(f"{str(config)!r} is not valid JSON ({e})") from e
        self.files = self._tensor_files()

    def _tensor_files(self) -> dict[str, pathlib.Path]:
        """Tensor name -> the file holding it."""
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConversionError(f"{str(index)!r} has no readable weight_map ({e})") from e
            files = {name: self.dir / file for name, file in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise ConversionError(f"{INDEX_FILE} lists {path.name!r}, which is missing "
                                          f"from {str(self.dir)!r}")
            return files
        paths = sorted(self.dir.glob("*.safetensors"))
        if not paths:
            raise ConversionError(
                f"{str(self.dir)!r} has no *.safetensors weights (PyTorch .bin checkpoints are "
                "not read: convert them with transformers' save_pretrained first)")
        files = {}
        for path in paths:
            for name in self._open(path).keys():
                files[name] = path
        return files

    def _open(self, path: pathlib.Path):
        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error for bad files
            raise ConversionError(f"{str(path)!r} is not a readable safetensors file "
                                  f"(truncated or corrupt?): {e}") from e

    def resolve(self, name: str) -> str | None:
        """The stored name of ``name``, also found without its leading component (a base model
        saved without its LM-head wrapper: ``h.0...`` for ``transformer.h.0...``)."""
        if name in self.files:
            return name
        short = name.split(".", 1)[-1]
        return short if short in self.files else None

    def get(self, name: str) -> np.ndarray:
        stored = self.resolve(name)
        if stored is None:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint in "
                                  f"{str(self.dir)!r}")
        try:
            with self._open(self.files[stored]) as f:
                return f.get_tensor(stored)
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"tensor {stored!r} of {str(self.files[stored])!r} cannot be "
                                  f"read (truncated or corrupt file?): {e}") from e


def write_shards(tensors: Iterable[tuple[str, np.ndarray]], out: pathlib.Path,
                 max_shard_bytes: int) -> None:
    """Write ``(name, array)`` pairs as ``model.safetensors``, or as
    ``model-0000k-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each (a tensor
    larger than that gets a file of its own) with ``model.safetensors.index.json``."""
    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal pending, size
        if pending:
            shards.append(sorted(pending))
            save_file(pending, str(out / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            pending, size = {}, 0

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if pending and size + array.nbytes > max_shard_bytes:
            flush()
        pending[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    def publish(k, file):  # safetensors creates its files private (0600); these are shared
        os.chmod(out / f"shard-{k}.tmp", 0o644)
        os.replace(out / f"shard-{k}.tmp", out / file)

    if len(shards) == 1:
        publish(1, SINGLE_FILE)
        return
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        publish(k, file)
        weight_map.update({name: file for name in names})
    (out / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
