"""Helpers that several test modules import (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import pathlib

import numpy as np
from safetensors.numpy import load_file

from meshlm.train.setup import build


def compile_train_step(cfg, devices):
    """``(mesh, rules, initial state, compiled train step)`` for ``cfg`` on ``devices``."""
    run = build(cfg, devices)
    return run.mesh, run.rules, run.init_state(0), run.train_step


def llama3_frequencies(freqs, factor, low, high, old_len):
    """Llama 3.1's RoPE frequency scaling as Meta's published ``apply_scaling`` writes it, one
    frequency at a time: short wavelengths kept, long ones divided by ``factor``, a smooth blend
    between (the numpy reference of ``RopeScaling("llama3", ...)``)."""
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def packed_batches(cfg, n):
    """Random rows of three documents each (segment ids, restarting positions)."""
    rng = np.random.default_rng(0)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    out = []
    for _ in range(n):
        toks = rng.integers(0, cfg.model.vocab_size, (b, length + 1), dtype=np.int32)
        cuts = np.stack([np.sort(rng.choice(np.arange(1, length), 2, replace=False))
                         for _ in range(b)])
        idx = np.arange(length)[None]
        seg = 1 + (idx >= cuts[:, :1]).astype(np.int32) + (idx >= cuts[:, 1:]).astype(np.int32)
        starts = np.where(seg == 1, 0, np.where(seg == 2, cuts[:, :1], cuts[:, 1:]))
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
                    "positions": (idx - starts).astype(np.int32),
                    "loss_mask": np.ones((b, length), np.float32)})
    return out


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the ``*.safetensors`` files in ``path``, by name."""
    return {k: v for f in sorted(pathlib.Path(path).glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same names, and for each the same dtype and bits (a round trip is exact)."""
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
