"""What a user meets when things go wrong or the output is not a terminal: Ctrl-C and SIGTERM
(signals), an unwritable run directory, metrics replayed after a kill, and the console's plain
lines off a terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import pytest

from meshlm.config import ConfigError
from meshlm.train.console import Console
from meshlm.train.metrics import MetricWriter, drop_records_from, read_jsonl
from meshlm.train.run_dir import check_writable
from meshlm.train.signals import stop_on_signals

# ------------------------------------------------------------------------------------ signals


def test_sigterm_and_first_ctrl_c_request_a_stop_and_handlers_are_restored(capfd):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals() as stop:
        assert not stop and stop.name is None
        os.kill(os.getpid(), signal.SIGINT)  # handled before os.kill returns to Python code
        assert stop.signal == signal.SIGINT and stop.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # the first request is the one reported
        assert stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
    assert "press Ctrl-C again to quit without saving" in capfd.readouterr().err
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"


def test_nothing_is_installed_when_told_not_to():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(install=False) as stop:
        assert signal.getsignal(signal.SIGINT) is before
        stop.signal = signal.SIGTERM  # the caller's own request (JAX's preemption sync point)
        assert stop.name == "SIGTERM"


# ------------------------------------------------------------------------------------ run dir


def test_empty_run_dir_is_refused():
    for empty in ("", "  "):
        with pytest.raises(ConfigError, match="train.run_dir is empty"):
            check_writable(empty)


def test_unwritable_run_dir_is_refused_before_anything_is_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"train.run_dir=.*a_file/run.* is not writable"):
        check_writable(blocker / "run")
    assert check_writable(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checked in the nearest existing parent
    if os.geteuid() != 0:  # root writes through permission bits
        checkpoints = tmp_path / "run" / "checkpoints"
        checkpoints.mkdir(parents=True)
        checkpoints.chmod(0o500)
        try:
            with pytest.raises(ConfigError, match=r"not writable \(in .*checkpoints"):
                check_writable(tmp_path / "run")
        finally:
            checkpoints.chmod(0o700)


# ------------------------------------------------------------------------------------ metrics


def test_records_of_replayed_steps_are_dropped(tmp_path):
    """A run killed after its checkpoint at step 4 wrote steps 5 and 6 (the last line torn by
    the kill); resumed from step 4 it writes them again, once."""
    rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 7)]
    rows.insert(4, {"step": 4, "split": "val", "loss": 0.5})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "spl'
    (tmp_path / "metrics.jsonl").write_text(text)
    writer = MetricWriter(tmp_path, first_step=5)
    writer.write(5, "train", {"loss": 0.25})
    writer.close()
    got = read_jsonl(tmp_path)
    assert [(r["step"], r["split"]) for r in got] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "val"), (5, "train")]
    assert got[-1]["loss"] == 0.25
    assert drop_records_from(tmp_path, 0) == 6 and read_jsonl(tmp_path) == []
    assert drop_records_from(tmp_path / "none", 0) == 0


# ------------------------------------------------------------------------------------ console


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_prints_plain_lines_off_a_terminal():
    out = io.StringIO()
    console = Console(total_steps=20, initial_step=0, stream=out)
    for step in range(1, 11):
        console.step()
    console.train(10, loss=2.5, lr=3e-4, tokens_per_s=12345.6, mfu=0.412)
    console.eval(10, loss=2.25, perplexity=9.49)
    console.train(20, loss=2.0, lr=1e-4, tokens_per_s=999.0, mfu=None)
    console.close()
    assert out.getvalue().splitlines() == [
        "step 10/20: loss 2.5000, lr 0.0003, 12,346 tokens/s, MFU 41.2%",
        "step 10: val loss 2.2500, perplexity 9.49",
        "step 20/20: loss 2.0000, lr 0.0001, 999 tokens/s, MFU n/a",
    ]
    assert "\r" not in out.getvalue()


def test_console_uses_a_bar_on_a_terminal_and_lines_without_it():
    tty = _Terminal()
    console = Console(total_steps=4, initial_step=0, stream=tty)
    assert console.bar is not None
    console.step()
    console.train(1, loss=2.5, lr=1e-3, tokens_per_s=10.0, mfu=None)  # into the bar's postfix
    console.close()
    assert "\r" in tty.getvalue() and "step 1/4" not in tty.getvalue()
    plain = _Terminal()  # train.progress_bar=false on a terminal: the loss still shows
    console = Console(total_steps=4, initial_step=0, progress_bar=False, stream=plain)
    console.train(1, loss=2.5, lr=1e-3, tokens_per_s=10.0, mfu=None)
    assert plain.getvalue() == "step 1/4: loss 2.5000, lr 0.001, 10 tokens/s, MFU n/a\n"
    quiet = io.StringIO()
    console = Console(total_steps=4, initial_step=0, primary=False, stream=quiet)
    console.train(1, loss=2.5, lr=1e-3, tokens_per_s=10.0, mfu=None)
    console.note("x")
    assert quiet.getvalue() == ""


def test_console_defaults_to_stderr():
    assert Console(total_steps=1, initial_step=0).stream is sys.stderr
