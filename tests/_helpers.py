"""Helpers that several test modules import (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import numpy as np

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
