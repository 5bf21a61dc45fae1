"""Checkpoints through the real loop: keep-K, SIGTERM saves, exact resume, interrupted saves and
missing or corrupt checkpoints. The loop runs on the 8 fake CPU devices (8-way data parallel)."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meshlm.config import load_config
from meshlm.train import checkpoint
from meshlm.train.checkpoint import CheckpointError
from meshlm.train.loop import train
from meshlm.train.metrics import read_jsonl
from meshlm.train.state import TrainState

pytestmark = pytest.mark.usefixtures("fast_compile")

STEPS = 10
TINY_RUN = [
    "model.vocab_size=384", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
    "model.d_ff=64", "model.max_seq_len=32", "model.attention=xla", "model.dtype=float32",
    "data.seq_len=32", "data.batch_size=8", "data.max_files=30", f"train.steps={STEPS}",
    "train.log_every=1", "train.eval_every=5", "train.eval_batches=1", "train.progress_bar=false",
    "optimizer.warmup_steps=2", "checkpoint.every=3", "checkpoint.keep=2",
]


def tiny_run(run_dir, *overrides):
    return load_config(None, TINY_RUN + [f"train.run_dir={run_dir}", *overrides])


def train_losses(run_dir) -> dict[int, float]:
    """Step -> train loss, the last record of each step winning (a resumed run rewrites none)."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir) if r["split"] == "train"}


def snapshot(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted run: the reference losses and a finished checkpoint directory."""
    run_dir = tmp_path_factory.mktemp("full")
    summary = train(tiny_run(run_dir))
    return run_dir, summary


def test_uninterrupted_run_keeps_last_k(full_run):
    run_dir, summary = full_run
    assert summary["step"] == STEPS and not summary["preempted"]
    # Saved at 3, 6, 9 and the final 10; keep=2 leaves the last two.
    assert checkpoint.finished_steps(run_dir) == [9, 10]
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    assert summary["val_loss"] is not None and np.isfinite(summary["val_loss"])
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "config.yaml").is_file()


def _first_train_record_written(run_dir) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"split": "train"' in metrics.read_text()


def _handler_installed(run_dir) -> bool:
    return signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL


@pytest.mark.parametrize("arrives", [_first_train_record_written, _handler_installed],
                         ids=["mid_run", "before_first_step"])
def test_sigterm_saves_and_resume_reproduces_losses(full_run, tmp_path, arrives):
    """SIGTERM saves a checkpoint at whatever step it arrived, also before the first step (during
    the initial evaluation); rerunning resumes there (train state and data position) and every
    later loss equals the uninterrupted run's."""
    # Python delivers signals to the main thread only; elsewhere SIGTERM would end the process.
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    reference = train_losses(full_run[0])
    run_dir = tmp_path / "run"
    cfg = tiny_run(run_dir, f"data.tokenizer={full_run[0] / 'tokenizer.json'}")

    def send_sigterm():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if arrives(run_dir):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.001)

    killer = threading.Thread(target=send_sigterm, daemon=True)
    killer.start()
    first = train(cfg)
    killer.join()
    stopped = first["step"]
    assert first["preempted"] and 0 <= stopped < STEPS, first
    assert checkpoint.finished_steps(run_dir)[-1] == stopped  # saved where it stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back

    second = train(cfg)
    assert second["step"] == STEPS and not second["preempted"]
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == reference[step], (step, stopped, resumed[step], reference[step])


def test_restore_params_reads_the_latest_checkpoint(full_run):
    run_dir, _ = full_run
    cfg, params = checkpoint.restore_params(run_dir)
    assert cfg.train.steps == STEPS and cfg.model.d_model == 32
    leaves = jax.tree.leaves(params)
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
    embedding = np.asarray(params["embed"]["embedding"])
    assert embedding.shape == (384, 32)
    _, earlier = checkpoint.restore_params(run_dir, step=9)
    assert not np.array_equal(embedding, np.asarray(earlier["embed"]["embedding"]))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .*checkpoints"):
        checkpoint.restore_params(tmp_path)


@pytest.fixture
def copied_run(full_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(full_run[0], run_dir)
    return run_dir


def test_corrupt_metadata_falls_back_and_none_readable_stops_before_compute(full_run,
                                                                            copied_run, caplog):
    """With every checkpoint's metadata unreadable the run stops before compute, naming the
    newest and changing nothing; with only the newest unreadable it resumes from the one
    before, setting the newest aside with one line."""
    root = copied_run / "checkpoints"
    for step in (9, 10):
        (root / str(step) / "state" / "_METADATA").write_text("{ not json")
    before = snapshot(root)
    with pytest.raises(CheckpointError, match=f"{root / '10'}.*corrupt.*_METADATA"):
        train(tiny_run(copied_run, "train.steps=12"))
    assert snapshot(root) == before
    shutil.copy(full_run[0] / "checkpoints" / "9" / "state" / "_METADATA",
                root / "9" / "state" / "_METADATA")
    with caplog.at_level("WARNING", logger="meshlm.train.checkpoint"):
        summary = train(tiny_run(copied_run, "train.steps=12"))
    assert summary["step"] == 12 and (root / "10.unreadable").is_dir()
    skipped = [r.getMessage() for r in caplog.records if r.name == checkpoint.__name__]
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint step 10 does not restore")
    assert "resuming from step 9" in skipped[0]
    assert checkpoint.finished_steps(copied_run) == [9, 12]  # every=3: step 10 is not saved


def test_corrupt_array_data_is_a_clear_error(copied_run):
    latest = copied_run / "checkpoints" / "10"
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 64)
    before = snapshot(copied_run / "checkpoints")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.restore_params(copied_run)
    assert snapshot(copied_run / "checkpoints") == before


def test_changed_model_is_refused(copied_run):
    with pytest.raises(CheckpointError, match=r"model\.d_model: 32 -> 64"):
        train(tiny_run(copied_run, "model.d_model=64"))


_INTERRUPTED_SAVE = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    import jax.numpy as jnp, orbax.checkpoint as ocp
    root = pathlib.Path(sys.argv[1])
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    manager = ocp.CheckpointManager(root, item_names=("state",), options=options)
    manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"w": jnp.ones(8)})))
    manager.wait_until_finished()
    big = {f"w{i}": jnp.full((1 << 20,), i, jnp.float32) for i in range(48)}  # 192 MiB
    manager.save(2, args=ocp.args.Composite(state=ocp.args.PyTreeSave(big)))
    while not any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir()):
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)  # dies mid-write, as on a power loss
""")


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
    """A process killed while writing step 2 leaves step 1 as the latest checkpoint, intact."""
    root = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_SAVE, str(root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir())  # the torn write
    assert checkpoint.finished_steps(tmp_path) == [1]
    with checkpoint.open_manager(tmp_path, load_config(None).checkpoint) as manager:
        assert manager.latest_step() == 1
        restored = manager.restore(
            1, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    np.testing.assert_array_equal(restored["state"]["w"], np.ones(8, np.float32))



def _small_state(step: int) -> TrainState:
    params = {"w": jax.random.normal(jax.random.key(step), (512,)), "b": jnp.arange(7.0) * step}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=())


def _damage_arrays(step_dir: pathlib.Path) -> None:
    """Zero the second half of every array data file, as a torn or overwritten write would."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            data = bytearray(f.read_bytes())
            data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
            f.write_bytes(bytes(data))


def test_restore_falls_back_past_checkpoints_whose_arrays_are_damaged(tmp_path, caplog):
    """The newest checkpoint that restores is used; each newer damaged one is set aside with one
    line naming its root cause (no TensorStore spec dump), and that step can be saved again."""
    cfg = tiny_run(tmp_path, "checkpoint.keep=3")
    with checkpoint.open_manager(tmp_path, cfg.checkpoint) as manager:
        for step in (1, 2, 3):
            checkpoint.save(manager, _small_state(step), {"next": step}, cfg)
        manager.wait_until_finished()
    root = checkpoint.checkpoint_dir(tmp_path)
    for step in (2, 3):
        _damage_arrays(root / str(step))
    abstract = jax.eval_shape(lambda: _small_state(0))
    with checkpoint.open_manager(tmp_path, cfg.checkpoint) as manager:
        with caplog.at_level("WARNING", logger="meshlm.train.checkpoint"):
            step, state, data_state = checkpoint.restore_latest(manager, abstract)
        assert (step, data_state) == (1, {"next": 1})
        np.testing.assert_array_equal(state.params["w"], _small_state(1).params["w"])
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2 and "tensorstore_spec" not in caplog.text, caplog.text
        for line, bad in zip(lines, (3, 2)):
            assert line.startswith(f"checkpoint step {bad} does not restore (")
            assert "ZSTD_decompressStream() failed" in line and "resuming from step 1" in line
        assert sorted(p.name for p in root.iterdir()) == ["1", "2.unreadable", "3.unreadable"]
        assert checkpoint.finished_steps(tmp_path) == [1]
        checkpoint.save(manager, _small_state(2), {"next": 2}, cfg)  # the step is free again
        manager.wait_until_finished()
    assert checkpoint.finished_steps(tmp_path) == [1, 2]


def test_restore_with_no_good_checkpoint_is_one_error_and_renames_nothing(tmp_path):
    cfg = tiny_run(tmp_path)
    with checkpoint.open_manager(tmp_path, cfg.checkpoint) as manager:
        assert checkpoint.restore_latest(manager, jax.eval_shape(lambda: _small_state(0))) is None
        checkpoint.save(manager, _small_state(1), {"next": 1}, cfg)
        manager.wait_until_finished()
    _damage_arrays(checkpoint.checkpoint_dir(tmp_path) / "1")
    with checkpoint.open_manager(tmp_path, cfg.checkpoint) as manager:
        with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores; the newest, "
                                                  r"step 1: .*ZSTD_decompressStream\(\) failed"):
            checkpoint.restore_latest(manager, jax.eval_shape(lambda: _small_state(0)))
    assert checkpoint.finished_steps(tmp_path) == [1]


_FULL_DISK = textwrap.dedent("""
    import pathlib, resource, signal, sys, time
    import jax, jax.numpy as jnp
    from meshlm.config import load_config
    from meshlm.train import checkpoint
    from meshlm.train.state import TrainState

    run = pathlib.Path(sys.argv[1])
    cfg = load_config(None, [f"train.run_dir={run}", "checkpoint.keep=1"])
    def state(step, n):
        w = jax.random.normal(jax.random.key(step), (n,))
        return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": w}, opt_state=())
    manager = checkpoint.open_manager(run, cfg.checkpoint)
    checkpoint.save(manager, state(1, 1000), {}, cfg)
    manager.wait_until_finished()
    # A file-size limit fails writes past 100 kB as a full disk does (EFBIG instead of ENOSPC).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    checkpoint.save(manager, state(2, 100_000), {}, cfg)
    for polls in range(600):  # what the loop does after each step
        try:
            checkpoint.raise_if_save_failed(manager)
        except checkpoint.CheckpointSaveError as e:
            print(e)
            break
        time.sleep(0.05)
""")


def test_a_failed_background_save_is_reported_at_once_and_keeps_the_last_good_one(tmp_path):
    """The write of step 2 fails in Orbax's background thread: ``raise_if_save_failed`` (called
    after every step) raises one line with the OS error, step 2 is never listed as complete,
    and step 1 survives although ``keep=1`` would have removed it after a good save."""
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = proc.stdout.strip()
    assert message.startswith("saving a checkpoint failed: ") and "\n" not in message, message
    assert "File too large" in message and "tensorstore_spec" not in message
    assert message.endswith("the last complete checkpoint is step 1")
    assert checkpoint.finished_steps(tmp_path) == [1]
    names = [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()]
    assert any(n.startswith("2.") and "tmp" in n for n in names), names


def _record(logger: str, pathname: str, exc: BaseException | None, level=logging.ERROR):
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(logger, level, pathname, 1, "failed", None, exc_info)


def _raised_from(filename: str, context: BaseException | None = None) -> BaseException:
    """An exception whose traceback has one frame in ``filename`` (raised while handling
    ``context``, when given)."""
    try:
        exec(compile("raise ValueError('write failed')", filename, "exec"), {})
    except ValueError as e:
        e.__context__ = context
        return e
    raise AssertionError("unreachable")


def test_orbax_error_records_are_dropped_and_others_kept():
    """What the CLI filters off the ``absl`` and ``asyncio`` loggers: Orbax's own ERROR records,
    and asyncio's report of a future whose exception (or one it was raised while handling)
    passed through Orbax; everything else reaches the console."""
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    other_file = os.path.join(os.sep, "site-packages", "other", "module.py")
    in_orbax, elsewhere = _raised_from(orbax_file), _raised_from(other_file)
    drop = checkpoint.drop_orbax_errors
    assert not drop(_record("absl", orbax_file, None))
    assert not drop(_record("asyncio", "base_events.py", in_orbax))
    assert not drop(_record("asyncio", "base_events.py", _raised_from(other_file, in_orbax)))
    assert drop(_record("asyncio", "base_events.py", elsewhere))
    assert drop(_record("absl", other_file, None))
    assert drop(_record("absl", orbax_file, None, level=logging.WARNING))
