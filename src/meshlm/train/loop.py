"""The training loop: ``train(cfg) -> summary``.

Order matters for bad input: everything that can be checked without compute (the mesh against
the devices present, the batch against the data-parallel size and the processes, the latest
checkpoint's integrity and model, the tokenizer against the model's vocabulary) is checked first,
so a wrong setting stops with one message before anything is compiled and before any checkpoint is
written or removed. Then the state is created (or restored) sharded, the steps are compiled once,
and the loop feeds batches, logs, evaluates and checkpoints. SIGTERM (a preemption) finishes the
current step, saves a checkpoint and returns; rerunning the same command resumes from it and
reproduces the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from meshlm import sharding
from meshlm.config import Config, ConfigError, save_config
from meshlm.models import build_model, flops_per_token
from meshlm.train import checkpoint
from meshlm.train.metrics import MetricWriter, format_mfu, mfu
from meshlm.train.optimizer import make_optimizer
from meshlm.train.state import create_train_state, param_count, state_shardings
from meshlm.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


def check_run(cfg: Config, mesh, rules) -> None:
    """Loop and batch settings that need the mesh; raises ``ConfigError`` naming the fix."""
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
    dp = sharding.data_parallel_size(mesh, rules)
    micro = cfg.data.batch_size // t.grad_accum
    if micro % dp:
        per = "" if t.grad_accum == 1 else (
            f" (micro-batches of {micro} rows with train.grad_accum={t.grad_accum})")
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size}{per} is not divisible by the data-parallel "
            f"size {dp} (the mesh axes the 'activation_batch' rule maps to: "
            f"{_axes_of(mesh, rules, 'activation_batch')}); use a batch size that is a multiple of "
            f"{dp * t.grad_accum}"
        )
    check_process_rows(cfg, mesh, rules)
    seq = sharding.named_sharding(mesh, rules, "activation_length").spec[0]
    seq_shards = math.prod(mesh.shape[n] for n in _names(seq))
    if cfg.data.seq_len % seq_shards:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by the sequence-parallel size "
            f"{seq_shards} ({_axes_of(mesh, rules, 'activation_length')})"
        )


def check_process_rows(cfg: Config, mesh, rules) -> None:
    """Each process reads its ``process_rows`` block of every global batch; under the batch
    sharding its devices must hold exactly that block (``make_array_from_process_local_data``
    places the block on them)."""
    from meshlm.data.pipeline import process_rows

    b, index, count = cfg.data.batch_size, jax.process_index(), jax.process_count()
    rows = process_rows(b, index, count)
    held = sharding.rows_held(sharding.batch_sharding(mesh, rules), (b, cfg.data.seq_len))
    if held != [(rows.start, rows.stop)]:
        raise ConfigError(
            f"under the batch sharding ({_axes_of(mesh, rules, 'activation_batch')}) the devices "
            f"of process "
            f"{index} hold rows {', '.join(f'[{a}, {z})' for a, z in held)} of each "
            f"{b}-row batch, but with {count} processes it reads rows [{rows.start}, "
            f"{rows.stop}); map the 'activation_batch' rule to mesh axes that split the devices of "
            "different processes, in process order"
        )


def _names(spec) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec or ())


def _axes_of(mesh, rules, logical: str) -> str:
    names = _names(sharding.named_sharding(mesh, rules, logical).spec[0])
    return " x ".join(f"{n}={mesh.shape[n]}" for n in names) or "none"


@contextlib.contextmanager
def _sigterm_flag(install: bool = True) -> Iterator[dict]:
    """``{"signal": None}`` that becomes the signal number when SIGTERM arrives; the previous
    handler is restored on exit. Outside the main thread (where Python cannot install handlers)
    or with ``install=False`` (several processes: JAX's preemption service owns SIGTERM) the
    flag never flips by itself."""
    flag: dict[str, Any] = {"signal": None}
    if not install or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signal"] = signum

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: Config) -> dict[str, Any]:
    """Train (or resume) the run in ``cfg.train.run_dir`` on every device JAX sees.

    Returns a summary: ``step``, ``train_loss`` (mean of the last logging interval),
    ``val_loss``, ``val_perplexity``, ``tokens_per_s`` (mean over the run's steps after the
    first interval), ``mfu`` (None when the device's peak is unknown), ``params``,
    ``preempted`` (stopped by SIGTERM) and ``run_dir``.
    """
    from meshlm.data import build_data  # tokenizers/grain: only needed once checks have passed

    run_dir = pathlib.Path(cfg.train.run_dir).expanduser()
    # ---- checks, no compute
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.axis_rules(cfg.mesh)
    check_run(cfg, mesh, rules)
    tx, schedule = make_optimizer(cfg)
    resume_from = None
    if cfg.checkpoint.resume:
        resume_from = checkpoint.check_latest(run_dir, cfg)
    elif checkpoint.finished_steps(run_dir):
        raise ConfigError(
            f"checkpoint.resume=false but {str(checkpoint.checkpoint_dir(run_dir))!r} already "
            "holds checkpoints, which a fresh run would overwrite; choose another train.run_dir"
        )
    data = build_data(cfg, run_dir)  # checks the tokenizer against model.vocab_size first

    # ---- build and compile
    model = build_model(cfg.model)
    seq_len = cfg.data.seq_len
    abstract, state_sh = state_shardings(model, tx, mesh, rules, seq_len)
    train_step = make_train_step(cfg, model, tx, schedule, mesh, rules, abstract)
    eval_step = make_eval_step(cfg, model, mesh, rules, abstract)
    batch_sh = sharding.batch_sharding(mesh, rules)
    global_shape = (cfg.data.batch_size, seq_len)
    train_iter = data.train_iterator()
    manager = checkpoint.open_manager(run_dir, cfg.checkpoint)
    if resume_from is not None:
        state, data_state = checkpoint.restore(manager, resume_from[0], abstract)
        train_iter.set_state(data_state)
        log.info("resumed %s from step %d", run_dir, resume_from[0])
    else:
        state, _ = create_train_state(model, tx, mesh, rules, seq_len,
                                      jax.random.key(cfg.train.seed), state_sh)
    primary = jax.process_index() == 0  # the one process that writes the run's records
    if primary:
        save_config(cfg, run_dir / "config.yaml")
    n_params = param_count(state.params)
    log.info(
        "%s parameters, %d devices (%s), mesh %s, %d tokens per step",
        f"{n_params:,}", mesh.size, jax.devices()[0].device_kind,
        {k: v for k, v in mesh.shape.items() if v > 1} or "single device",
        cfg.data.batch_size * seq_len,
    )

    def put(batch):
        # Each process holds only its rows (check_process_rows); together they are one array.
        return jax.make_array_from_process_local_data(batch_sh, batch, global_shape)

    val = put(data.val_batches(cfg.train.eval_batches))  # placed once, read every evaluation

    def evaluate(params) -> dict[str, float]:
        sums = jax.device_get([eval_step(params, b) for b in val])
        total = sum(float(m["loss_sum"]) for m in sums)
        tokens = sum(float(m["tokens"]) for m in sums)
        loss = total / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}

    # ---- loop
    steps, log_every = cfg.train.steps, cfg.train.log_every
    fpt = flops_per_token(cfg.model, seq_len)
    tokens_per_step = cfg.data.batch_size * seq_len
    writer = MetricWriter(run_dir, primary=primary)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "params": n_params, "preempted": False,
                               "train_loss": None, "val_loss": None, "val_perplexity": None,
                               "tokens_per_s": None, "mfu": None}
    step = int(jax.device_get(state.step))
    last_saved = step if resume_from is not None else None
    pending: list[dict] = []
    timed_tokens, timed_seconds, first_interval = 0, 0.0, True
    profiling = False
    bar = tqdm(total=steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (cfg.train.progress_bar and primary))
    try:
        # With several processes a local flag would stop them at different steps, one saving
        # (a collective) while another trains; JAX's preemption service picks one step for all.
        distributed = jax.process_count() > 1
        with _sigterm_flag(install=not distributed) as stop:  # a SIGTERM is a save from here on
            if resume_from is None:  # the baseline that later evaluations are read against
                ev = evaluate(state.params)
                writer.write(0, "val", ev)
                bar.write(f"step 0: val loss {ev['loss']:.4f}, "
                          f"perplexity {ev['perplexity']:.2f}")
            tick = time.perf_counter()
            while step < steps and stop["signal"] is None:
                if cfg.train.profile_steps and step == cfg.train.profile_steps[0]:
                    jax.profiler.start_trace(str(run_dir / "profile"))
                    profiling = True
                state, metrics = train_step(state, put(next(train_iter)))
                step += 1
                if distributed and multihost_utils.reached_preemption_sync_point(step):
                    stop["signal"] = signal.SIGTERM
                pending.append(metrics)
                bar.update(1)
                if profiling and step == cfg.train.profile_steps[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                if step % log_every == 0 or step == steps or stop["signal"] is not None:
                    got = jax.device_get(pending)
                    seconds = time.perf_counter() - tick
                    tick = time.perf_counter()
                    tps = len(got) * tokens_per_step / seconds
                    if not first_interval:  # the first interval holds the warm-up
                        timed_tokens += len(got) * tokens_per_step
                        timed_seconds += seconds
                    first_interval = False
                    util = mfu(tps, fpt, list(mesh.devices.flat))
                    loss = float(np.mean([m["loss"] for m in got]))
                    writer.write(step, "train", {
                        "loss": loss, "lr": got[-1]["lr"],
                        "grad_norm": float(np.mean([m["grad_norm"] for m in got])),
                        "tokens_per_s": tps, "mfu": util,
                    })
                    summary["train_loss"] = loss
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}",
                                    mfu=format_mfu(util), refresh=False)
                    pending = []
                paused = time.perf_counter()  # eval and checkpoint time is not throughput
                if step % cfg.train.eval_every == 0 or step == steps:
                    ev = evaluate(state.params)
                    writer.write(step, "val", ev)
                    summary.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
                    bar.write(f"step {step}: val loss {ev['loss']:.4f}, "
                              f"perplexity {ev['perplexity']:.2f}")
                if (step % cfg.checkpoint.every == 0 or step == steps
                        or stop["signal"] is not None):
                    checkpoint.save(manager, state, train_iter.get_state(), cfg)
                    last_saved = step
                tick += time.perf_counter() - paused
            if stop["signal"] is not None:
                if last_saved != step:  # it arrived before the first step
                    checkpoint.save(manager, state, train_iter.get_state(), cfg)
                    last_saved = step
                summary["preempted"] = True
                bar.write(f"SIGTERM: saved a checkpoint at step {step}; rerun to resume")
    finally:
        if profiling:
            jax.profiler.stop_trace()
        bar.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    if summary["val_loss"] is None and not summary["preempted"]:  # resumed a finished run
        ev = evaluate(state.params)
        summary.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
    if timed_seconds:
        tps = timed_tokens / timed_seconds
        summary.update(tokens_per_s=tps, mfu=mfu(tps, fpt, list(mesh.devices.flat)))
    summary.update(step=step, checkpoint_step=last_saved)
    return summary
