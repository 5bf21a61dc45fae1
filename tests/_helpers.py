"""Helpers that several test modules import (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import jax

from meshlm import sharding
from meshlm.models import build_model
from meshlm.train.optimizer import make_optimizer
from meshlm.train.state import create_train_state, state_shardings
from meshlm.train.step import make_train_step


def compile_train_step(cfg, devices):
    """``(mesh, rules, initial state, jitted train step)`` for ``cfg`` on ``devices``."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.axis_rules(cfg.mesh)
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg)
    abstract, shardings = state_shardings(model, tx, mesh, rules, cfg.data.seq_len)
    state, _ = create_train_state(model, tx, mesh, rules, cfg.data.seq_len, jax.random.key(0),
                                  shardings)
    step = make_train_step(cfg, model, tx, schedule, mesh, rules, abstract)
    return mesh, rules, state, step
