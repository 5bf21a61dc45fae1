"""Helpers that several test modules import (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

from meshlm.train.setup import build


def compile_train_step(cfg, devices):
    """``(mesh, rules, initial state, compiled train step)`` for ``cfg`` on ``devices``."""
    run = build(cfg, devices)
    return run.mesh, run.rules, run.init_state(0), run.train_step
