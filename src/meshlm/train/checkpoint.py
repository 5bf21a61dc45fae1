"""Orbax checkpoints under ``<run_dir>/checkpoints``: train state, data position and config.

Each step is one directory ``checkpoints/<step>/`` with three items: ``state`` (step, parameters
and optimizer state, written asynchronously from device memory), ``data`` (the grain iterator's
``get_state()``, so a resumed run reads exactly the batches that would have come next) and
``config`` (the run's config as JSON, so ``restore_params`` rebuilds the model without any other
file). Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it into place once
every item is complete, so an interrupted or failed save leaves only a temporary directory that
is never listed as a checkpoint, and the previous step stays the latest good one.

A background save that fails (a full disk) is reported by ``raise_if_save_failed`` at the next
step, not at the next save; a checkpoint whose arrays do not restore (a damaged data file) is set
aside as ``<step>.unreadable`` by ``restore_latest``, which resumes from the newest one that
restores. Either says the root cause in one line: Orbax's own error records (a traceback from
each of its threads, TensorStore's spec dumps) and asyncio's reports of its other failed writes
are dropped by ``drop_orbax_errors``.

Nothing here deletes a finished checkpoint except Orbax's keep-the-last-K rule after a new save
succeeded; readers open the directory read-only.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.core import meta
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from meshlm.config import CheckpointConfig, Config, ConfigError, from_dict, to_dict
from meshlm.train.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "data", "config")
SET_ASIDE_SUFFIX = ".unreadable"  # "<step>.unreadable": not a step name, kept for inspection


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the run; names the path."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (a full disk, a lost mount): the run cannot go on."""


def checkpoint_dir(run_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(run_dir).expanduser().absolute() / CHECKPOINT_DIR


def finished_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps with a finalized checkpoint (in-progress or interrupted saves excluded), ascending.
    Orbax's own step listing: nothing created or removed."""
    root = checkpoint_dir(run_dir)
    return sorted(ocp.step.checkpoint_steps(root)) if root.is_dir() else []


def _read_config(step_dir: pathlib.Path) -> Config:
    path = step_dir / "config" / "metadata"
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(step_dir)!r} is corrupt or incomplete: cannot read its config "
            f"{str(path)!r} ({e}); remove that step directory to resume from an earlier one"
        ) from e
    try:
        return from_dict(tree)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(step_dir)!r} holds an invalid config: {e}") from e


def check_latest(run_dir: str | os.PathLike, abstract_state: TrainState | None = None,
                 cfg: Config | None = None) -> tuple[int, Config] | None:
    """Cheap checks of the checkpoints before anything is compiled; nothing is written.

    Returns ``(step, saved config)`` of the newest checkpoint whose items, metadata and config
    can be read (``restore_latest`` sets newer, damaged ones aside and says why), or None when
    the run has no checkpoint. Raises ``CheckpointError`` when none can be read, or (given
    ``abstract_state``) when the shapes or dtypes of its arrays (Orbax's metadata) differ from
    the state this run would train: a changed setting that leaves every shape alone (attention
    implementation, remat, activation dtype) resumes. The message names the differing arrays
    and (given ``cfg``) the model settings that changed. Damaged array data is found by
    ``restore``.
    """
    steps = finished_steps(run_dir)
    if not steps:
        return None
    damaged = []
    for step in reversed(steps):
        step_dir = checkpoint_dir(run_dir) / str(step)
        try:
            saved_arrays, saved = _read_step(step_dir)
            break
        except CheckpointError as e:
            damaged.append(e)
    else:
        raise damaged[0]
    if abstract_state is not None:
        diff = _shape_diff(saved_arrays, _as_tree(abstract_state))
        if diff:
            if cfg is not None:
                old, new = to_dict(saved.model), to_dict(cfg.model)
                diff = [f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                        for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
                        ] + diff
            raise CheckpointError(
                f"the checkpoint {str(step_dir)!r} was trained with a different model "
                f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); use another "
                "train.run_dir or set checkpoint.resume=false with a fresh run_dir"
            )
    return step, saved


def _read_step(step_dir: pathlib.Path) -> tuple[Any, Config]:
    """``(Orbax's metadata tree of the state, saved config)``; ``CheckpointError`` naming what
    is missing or unreadable."""
    missing = [name for name in ITEMS if not (step_dir / name).is_dir()]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(step_dir)!r} is corrupt or incomplete: missing {', '.join(missing)}; "
            "remove that step directory to resume from an earlier one"
        )
    try:
        json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(step_dir)!r} is corrupt or incomplete: _CHECKPOINT_METADATA is "
            f"unreadable ({e}); remove that step directory to resume from an earlier one"
        ) from e
    try:
        saved_arrays = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir / "state")).tree
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for an unreadable file
        raise CheckpointError(
            f"checkpoint {str(step_dir)!r} is corrupt or incomplete: its state/_METADATA is "
            f"unreadable ({failure_reason(e)}); remove that step directory to resume from an "
            "earlier one"
        ) from e
    return saved_arrays, _read_config(step_dir)


def _shape_diff(saved: Any, expected: Any) -> list[str]:
    """``"path: saved (shape, dtype) -> expected"`` for every array that differs or exists on
    only one side."""
    def flat(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path, simple=True, separator="/"): (tuple(x.shape),
                                                                          str(x.dtype))
                for path, x in leaves}

    old, new = flat(saved), flat(expected)
    if any(old.get(k) != v for k, v in new.items() if k.startswith("params/")):
        # the optimizer state repeats every parameter's difference
        old = {k: v for k, v in old.items() if k.startswith("params/")}
        new = {k: v for k, v in new.items() if k.startswith("params/")}
    show = lambda v: "absent" if v is None else f"{v[1]}{list(v[0])}"  # noqa: E731
    return [f"{k}: {show(old.get(k))} -> {show(new.get(k))}"
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def open_manager(run_dir: str | os.PathLike, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """A manager that saves (asynchronously if ``cfg.async_save``) and keeps the last
    ``cfg.keep`` steps. Leftover temporary directories of interrupted saves are removed."""
    if cfg.every < 1 or cfg.keep < 1:
        raise ConfigError(
            f"checkpoint.every and checkpoint.keep must be >= 1, got {cfg.every}, {cfg.keep}"
        )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=cfg.async_save,
    )
    return ocp.CheckpointManager(checkpoint_dir(run_dir), item_names=ITEMS, options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, data_state: dict, cfg: Config) -> None:
    """Start saving ``state`` at its step; returns once device arrays are copied to host memory,
    the write finishes in the background (``manager.wait_until_finished()`` to join it)."""
    step = int(jax.device_get(state.step))
    try:  # a synchronous save, or the previous background one, can fail here
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(_as_tree(state)),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(to_dict(cfg)),
        ), force=True)
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise _save_failed(manager, e) from e


def raise_if_save_failed(manager: ocp.CheckpointManager) -> None:
    """Raise ``CheckpointSaveError`` if the last background save failed; returns at once while
    it is still writing. Cheap: call it after every step, so a full disk stops the run at the
    step it happened, not at the next save. The failed step stays a temporary directory (never
    listed as a checkpoint) and the earlier checkpoints are kept."""
    if manager.is_saving_in_progress():
        return
    try:
        manager.wait_until_finished()  # the finished save thread's exception, raised once
    except Exception as e:  # noqa: BLE001
        raise _save_failed(manager, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the last background save and close ``manager``; a failed save raises
    ``CheckpointSaveError`` (one line) rather than Orbax's own error."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise _save_failed(manager, e) from e
    finally:
        manager.close()  # its own wait does not raise the same failure twice


def _save_failed(manager: ocp.CheckpointManager, error: Exception) -> CheckpointSaveError:
    manager.reload()  # forget the step that failed
    latest = manager.latest_step()
    kept = "no checkpoint" if latest is None else f"the last complete checkpoint is step {latest}"
    return CheckpointSaveError(f"saving a checkpoint failed: {failure_reason(error)}; {kept}")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState
            ) -> tuple[TrainState, dict]:
    """``(state, data_state)`` of ``step``, each array placed with its ``abstract_state``
    sharding (so an FSDP run restores shards directly, never a full copy per device)."""
    target = _as_tree(abstract_state)
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
            data=ocp.args.JsonRestore(),
        ))
    except Exception as e:  # Orbax raises many types (ValueError, FileNotFoundError, tensorstore)
        raise CheckpointError(
            f"checkpoint {str(manager.directory / str(step))!r} is corrupt or does not match the "
            f"train state: {failure_reason(e)}"
        ) from e
    tree = out["state"]
    state = TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
    return state, out["data"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState
                   ) -> tuple[int, TrainState, dict] | None:
    """``(step, state, data_state)`` of the newest checkpoint that restores, or None when there
    is none. Each newer one that does not restore is renamed ``<step>.unreadable`` (so the run
    can save that step again) with one logged line naming the root cause; if none restores,
    ``CheckpointError`` and nothing is renamed."""
    failed: list[tuple[int, CheckpointError]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data_state = restore(manager, step, abstract_state)
            error = None
        except CheckpointError as e:
            error = e
        if not _everywhere(error is None):  # every process resumes from the same step
            failed.append((step, error or CheckpointError("it does not restore on another "
                                                          "process")))
            continue
        for bad, why in failed:
            aside = _set_aside(manager, bad)
            log.warning("checkpoint step %d does not restore (%s); set aside as %s, resuming "
                        "from step %d", bad, _reason_of(why), aside.name, step)
        return step, state, data_state
    if failed:
        step, why = failed[0]
        raise CheckpointError(
            f"no checkpoint in {str(manager.directory)!r} restores; the newest, step {step}: "
            f"{_reason_of(why)}"
        )
    return None


def _reason_of(error: CheckpointError) -> str:
    return failure_reason(error.__cause__) if error.__cause__ is not None else str(error)


def _everywhere(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _set_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    root = pathlib.Path(str(manager.directory))
    aside = root / f"{step}{SET_ASIDE_SUFFIX}"
    n = 1
    while aside.exists():  # an earlier run set this step aside too
        n += 1
        aside = root / f"{step}{SET_ASIDE_SUFFIX}-{n}"
    if jax.process_index() == 0:
        os.replace(root / str(step), aside)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"meshlm checkpoint: set aside step {step}")
    manager.reload()
    return aside


# TensorStore appends bracketed annotations (its spec as JSON, the OS error code, source
# locations) and nests context as "while X: while Y: cause"; the cause follows the last path.
_ANNOTATIONS = re.compile(r"\s*\[[a-z_ ]+(\[\d+\])?=.*$", re.S)
_QUOTED_PATH = re.compile(r'"(/[^"]*)"(: )?')


def failure_reason(error: BaseException) -> str:
    """The root cause of a checkpoint failure in one line: the innermost exception, without
    TensorStore's annotations, as ``<file>: <what failed>`` when it names a file."""
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    text = _ANNOTATIONS.sub("", str(error)).strip()
    text = text.splitlines()[0] if text else ""
    paths = list(_QUOTED_PATH.finditer(text))
    if paths and text[paths[-1].end():]:
        return f"{paths[-1].group(1)}: {text[paths[-1].end():]}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"


def _raised_in_orbax(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, passed through
    Orbax's code."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(_ORBAX_SOURCE in f.filename for f in traceback.extract_tb(exc.__traceback__)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def drop_orbax_errors(record: logging.LogRecord) -> bool:
    """A filter for the ``absl`` and ``asyncio`` loggers: False for an ERROR record that Orbax
    logged, or whose exception passed through Orbax. Orbax logs each failed save or restore with
    a traceback from each thread it passed through, and when several writes of one save fail,
    asyncio reports the ones nobody awaited ("Future exception was never retrieved") after the
    first ended the save. meshlm raises one ``CheckpointError`` with the root cause
    (``failure_reason``) instead."""
    if record.levelno < logging.ERROR:
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (_ORBAX_SOURCE in record.pathname or _raised_in_orbax(exc))


def check_init_from(run_dir: str | os.PathLike, abstract_params: Any) -> int:
    """Before compute: the newest checkpoint of ``run_dir`` (``checkpoint.init_from``) holds
    parameters of exactly ``abstract_params``' shapes (dtypes may differ: restoring casts).
    Returns its step; ``CheckpointError`` names what differs."""
    steps = finished_steps(run_dir)
    if not steps:
        raise CheckpointError(
            f"checkpoint.init_from={str(run_dir)!r} holds no checkpoint (train a run there, or "
            "make one with `meshlm convert hf-to-orbax`)")
    saved, _ = _read_step(checkpoint_dir(run_dir) / str(steps[-1]))
    as_f32 = lambda tree: jax.tree.map(  # noqa: E731 - compare shapes only
        lambda x: jax.ShapeDtypeStruct(tuple(x.shape), np.float32), tree)
    diff = _shape_diff({"params": as_f32(saved.get("params", {}))},
                       {"params": as_f32(abstract_params)})
    if diff:
        raise CheckpointError(
            f"checkpoint.init_from={str(run_dir)!r} holds parameters of another model "
            f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); its config.yaml says "
            "which model section to train with")
    return steps[-1]


def restore_params(run_dir: str | os.PathLike, step: int | None = None,
                   abstract_params: Any = None) -> tuple[Config, Any]:
    """``(config, params)`` of the latest (or the given) checkpoint of ``run_dir``, parameters on
    the first device, or placed as ``abstract_params`` (``ShapeDtypeStruct``s with shardings,
    a run's; each device reads only its shard) when given. Reads only the parameters, not the
    optimizer state."""
    from meshlm.models import build_model  # the model registry, only needed here

    root = checkpoint_dir(run_dir)
    steps = finished_steps(run_dir)
    if not steps:
        raise CheckpointError(f"no checkpoint in {str(root)!r} (train a model into that run first)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {str(root)!r}; have {steps}")
    cfg = _read_config(root / str(step))
    if abstract_params is None:
        model = build_model(cfg.model)
        inputs = cfg.model.example_inputs(1, cfg.data.seq_len)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]
        device = SingleDeviceSharding(jax.devices()[0])
        abstract_params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), meta.unbox(boxed))
    target = {"params": abstract_params}
    path = root / str(step) / "state"
    try:
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ))
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or does not hold this model's parameters: "
            f"{failure_reason(e)}"
        ) from e
    return cfg, restored["params"]


def _as_tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
