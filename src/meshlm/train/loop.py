"""The training loop as hooks: ``train(cfg) -> summary``.

Order matters for bad input: everything that can be checked without compute (the mesh against
the devices present, the batch against the data-parallel size and the processes, the model's
sizes against its shards, the latest checkpoint's integrity and array shapes, the tokenizer
against the model's vocabulary) is checked first, so a wrong setting stops with one message
before anything is compiled and before any checkpoint is written or removed. Then the state is
created (or restored) sharded and the loop runs: one compiled step, then every hook that is due.

Evaluation, metrics and throughput, checkpointing and profiling are hooks with their own
cadence (clu's periodic actions, Levanter's ``add_hook``); time spent in hooks is not counted
as training throughput. SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and
returns; rerunning the same command resumes from it (past any checkpoint that does not restore)
and reproduces the losses of an uninterrupted run. A failed background save stops the run at the
next step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from meshlm.config import Config, ConfigError, save_config
from meshlm.train import checkpoint
from meshlm.train.console import Console
from meshlm.train.metrics import MetricWriter, mfu
from meshlm.train.optimizer import schedule_change_note
from meshlm.train.run_dir import check_writable
from meshlm.train.setup import Run, build
from meshlm.train.signals import stop_on_signals
from meshlm.train.state import TrainState, param_count

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Hook:
    """``fn(step, state, metrics)`` after every ``every``-th step; also after the run's last
    step when ``on_last``, and after the step at which a stop (SIGTERM) arrived when
    ``on_stop``. The time a ``paused`` hook takes is not training time (not in throughput)."""

    fn: Callable[[int, TrainState, dict], None]
    every: int = 1
    on_last: bool = True
    on_stop: bool = False
    paused: bool = True

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        return step % self.every == 0 or (last and self.on_last) or (stopping and self.on_stop)


class Throughput:
    """Tokens/s and MFU over each logging interval, excluding time spent in other hooks; the
    first interval (compilation, warm-up) is left out of the run's mean."""

    def __init__(self, run: Run):
        self.tokens_per_step = run.cfg.data.batch_size * run.cfg.data.seq_len
        self.fpt = run.flops_per_token
        self.devices = list(run.mesh.devices.flat)
        self.timed_tokens, self.timed_seconds, self.first = 0, 0.0, True
        self.start()

    def start(self) -> None:
        self.tick = time.perf_counter()

    def pause(self, seconds: float) -> None:
        self.tick += seconds

    def interval(self, steps: int) -> tuple[float, float | None]:
        now = time.perf_counter()
        seconds, self.tick = now - self.tick, now
        tps = steps * self.tokens_per_step / seconds
        if not self.first:
            self.timed_tokens += steps * self.tokens_per_step
            self.timed_seconds += seconds
        self.first = False
        return tps, mfu(tps, self.fpt, self.devices)

    def mean(self) -> tuple[float | None, float | None]:
        if not self.timed_seconds:
            return None, None
        tps = self.timed_tokens / self.timed_seconds
        return tps, mfu(tps, self.fpt, self.devices)


class Profiler:
    """A ``jax.profiler`` trace of the steps after ``start`` up to ``stop`` (``train.profile_steps``)
    into ``<run_dir>/profile``; call it after every step, ``close()`` at the end."""

    def __init__(self, profile_steps: tuple[int, ...], run_dir: pathlib.Path, step: int):
        self.window = tuple(profile_steps)
        self.path = str(run_dir / "profile")
        self.active = False
        self(step)

    def __call__(self, step: int, state: Any = None, _metrics: Any = None) -> None:
        if not self.window:
            return
        start, stop = self.window
        if not self.active and start <= step < stop:
            jax.profiler.start_trace(self.path)
            self.active = True
        elif self.active and step >= stop:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def check_loop(cfg: Config) -> None:
    """Loop settings; raises ``ConfigError`` naming the fix."""
    t = cfg.train
    for name in ("steps", "log_every", "eval_every", "eval_batches"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.profile_steps and (len(t.profile_steps) != 2
                            or not 0 <= t.profile_steps[0] < t.profile_steps[1]):
        raise ConfigError(
            f"train.profile_steps must be [start, stop] with 0 <= start < stop, got "
            f"{list(t.profile_steps)}"
        )


def train(cfg: Config) -> dict[str, Any]:
    """Train (or resume) the run in ``cfg.train.run_dir`` on every device JAX sees.

    Returns a summary: ``step``, ``train_loss`` (mean of the last logging interval),
    ``val_loss``, ``val_perplexity``, ``tokens_per_s`` (mean over the run's steps after the
    first interval), ``mfu`` (None when the device's peak is unknown), ``params``,
    ``preempted`` (stopped by a signal, after saving), ``signal`` (its name, or None),
    ``checkpoint_step`` and ``run_dir``.
    """
    from meshlm.data import build_data  # tokenizers/grain: only needed once checks have passed

    # ---- checks, no compute
    run_dir = check_writable(cfg.train.run_dir)
    check_loop(cfg)
    run = build(cfg)
    resume_from = None
    if cfg.checkpoint.resume:
        resume_from = checkpoint.check_latest(run_dir, run.abstract_state, cfg)
    elif checkpoint.finished_steps(run_dir):
        raise ConfigError(
            f"checkpoint.resume=false but {str(checkpoint.checkpoint_dir(run_dir))!r} already "
            "holds checkpoints, which a fresh run would overwrite; choose another train.run_dir"
        )
    init_from = cfg.checkpoint.init_from if resume_from is None else None  # resuming wins
    if init_from:
        checkpoint.check_init_from(init_from, run.abstract_state.params)
    data = build_data(cfg, run_dir)  # checks the tokenizer against model.vocab_size first

    # ---- state
    train_iter = data.train_iterator()
    manager = checkpoint.open_manager(run_dir, cfg.checkpoint)
    restored = None if resume_from is None else checkpoint.restore_latest(manager,
                                                                           run.abstract_state)
    if restored is not None:
        restored_step, state, data_state = restored
        train_iter.set_state(data_state)
        log.info("resumed %s from step %d", run_dir, restored_step)
        note = schedule_change_note(resume_from[1], cfg, restored_step)
        if note:
            log.warning(note)
        if restored_step >= cfg.train.steps:
            log.warning("the run is already at step %d of train.steps=%d: nothing to train "
                        "(raise train.steps to continue)", restored_step, cfg.train.steps)
    else:
        state = run.init_state()
        if init_from:  # its parameters, placed with this run's shardings; fresh optimizer
            params = checkpoint.restore_params(init_from,
                                               abstract_params=run.abstract_state.params)[1]
            state = state.replace(params=params)
            log.info("parameters from %s (checkpoint.init_from), step 0", init_from)
    primary = jax.process_index() == 0  # the one process that writes the run's records
    if primary:
        save_config(cfg, run_dir / "config.yaml")
    n_params = param_count(state.params)
    log.info(
        "%s parameters, %d devices (%s), mesh %s, %d tokens per step",
        f"{n_params:,}", run.mesh.size, jax.devices()[0].device_kind,
        {k: v for k, v in run.mesh.shape.items() if v > 1} or "single device",
        cfg.data.batch_size * cfg.data.seq_len,
    )
    val = run.put(data.val_batches(cfg.train.eval_batches))  # placed once, read every evaluation

    # ---- hooks
    steps = cfg.train.steps
    step = int(jax.device_get(state.step))
    # Records an interrupted attempt left past the restored step are replayed: drop them.
    writer = MetricWriter(run_dir, primary=primary,
                          first_step=0 if restored is None else step + 1)
    throughput = Throughput(run)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "params": n_params, "preempted": False,
                               "signal": None, "train_loss": None, "val_loss": None,
                               "val_perplexity": None, "tokens_per_s": None, "mfu": None,
                               "checkpoint_step": step if restored is not None else None}
    console = Console(steps, step, progress_bar=cfg.train.progress_bar, primary=primary)
    pending: list[dict] = []

    def evaluate(at: int, _state=None, _metrics=None) -> None:
        sums = jax.device_get([run.eval_step(state.params, b) for b in val])
        loss = sum(float(m["loss_sum"]) for m in sums) / max(sum(float(m["tokens"])
                                                                 for m in sums), 1.0)
        ev = {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}
        writer.write(at, "val", ev)
        summary.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
        console.eval(at, ev["loss"], ev["perplexity"])

    def log_metrics(at: int, _state, _metrics) -> None:
        got = jax.device_get(pending)
        tps, util = throughput.interval(len(got))
        loss = float(np.mean([m["loss"] for m in got]))
        scalars = {k: float(np.mean([m[k] for m in got])) for k in got[-1] if k != "lr"}
        writer.write(at, "train", {**scalars, "loss": loss, "lr": got[-1]["lr"],
                                   "tokens_per_s": tps, "mfu": util})
        summary["train_loss"] = loss
        console.train(at, loss, float(got[-1]["lr"]), tps, util)
        pending.clear()

    def save(at: int, state_now: TrainState, _metrics=None) -> None:
        checkpoint.save(manager, state_now, train_iter.get_state(), cfg)
        summary["checkpoint_step"] = at

    profiler = Profiler(cfg.train.profile_steps, run_dir, step)
    hooks = [
        Hook(lambda _s, _st, m: (pending.append(m), console.step()), paused=False),
        # A background save that failed (a full disk) stops the run now, not at the next save.
        Hook(lambda *_: checkpoint.raise_if_save_failed(manager), paused=False),
        Hook(log_metrics, every=cfg.train.log_every, on_stop=True, paused=False),
        Hook(evaluate, every=cfg.train.eval_every),
        Hook(save, every=cfg.checkpoint.every, on_stop=True),
        Hook(profiler, on_stop=True),
    ]

    # ---- loop
    # With several processes a local flag would stop them at different steps, one saving (a
    # collective) while another trains; JAX's preemption service picks one step for all.
    distributed = jax.process_count() > 1
    try:
        with stop_on_signals(install=not distributed) as stop:  # SIGTERM, Ctrl-C: save, stop
            if restored is None:  # the baseline that later evaluations are read against
                evaluate(0)
            throughput.start()
            while step < steps and not stop:
                state, metrics = run.train_step(state, run.put(next(train_iter)))
                step += 1
                if distributed and multihost_utils.reached_preemption_sync_point(step):
                    stop.signal = signal.SIGTERM
                last, stopping = step == steps, bool(stop)
                for hook in hooks:
                    if hook.due(step, last, stopping):
                        started = time.perf_counter()
                        hook.fn(step, state, metrics)
                        if hook.paused:
                            throughput.pause(time.perf_counter() - started)
            if stop:
                if summary["checkpoint_step"] != step:  # it arrived before the first step
                    save(step, state)
                summary.update(preempted=True, signal=stop.name)
                console.note(f"{stop.name}: saved a checkpoint at step {step}; rerun to resume")
    finally:
        profiler.close()
        console.close()
        writer.close()
        checkpoint.finish(manager)
    if summary["val_loss"] is None and not summary["preempted"]:  # resumed a finished run
        evaluate(step)
    tps, util = throughput.mean()
    summary.update(step=step, tokens_per_s=tps, mfu=util)
    return summary
