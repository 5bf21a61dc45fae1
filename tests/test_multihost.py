"""``meshlm train --distributed`` with real processes: two local processes of 4 fake CPU devices
each (loopback coordinator, gloo collectives) against one in-process run on 8 devices.

Launches are shared between assertions (the machine is small): one two-process run on a DP+FSDP
mesh that a SIGTERM to process 1 stops, one launch on a DP+TP mesh that resumes it to the end,
then the failure cases, which stop before anything compiles.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import portpicker
import pytest

from meshlm import distributed
from meshlm.cli import EXIT_BAD_INPUT, main
from meshlm.train import checkpoint

# Compile time is most of a launch; the one-process run compiles alike (the same numbers).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compile")]

REPO = pathlib.Path(__file__).parents[1]
CONFIG = str(REPO / "configs" / "default.yaml")
STEPS = 5
TINY = [f"train.steps={STEPS}", "model.n_layers=1", "model.d_model=32", "model.n_heads=4",
        "model.d_ff=64", "model.vocab_size=300", "data.max_files=12", "data.seq_len=32",
        "data.batch_size=8", "train.log_every=1", "train.eval_batches=1", "train.eval_every=100",
        "checkpoint.every=100"]
DP_FSDP = ["mesh.data=2", "mesh.fsdp=4"]
DP_TP = ["mesh.data=2", "mesh.tensor=4"]
SUMMARY = "{"  # the summary is the one stdout line that is a JSON object


class Process:
    """One ``meshlm train --distributed`` process; its merged output is collected by a thread."""

    def __init__(self, index: int, count: int, port: int, args: list[str],
                 extra: tuple[str, ...] = ()):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshlm.cli", "train", "--distributed",
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(count),
             "--process-id", str(index), *extra, "--config", CONFIG, *args],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {text!r} in the output:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"still running after {timeout:.0f} s:\n" + "\n".join(self.lines[-30:]))
        self.reader.join(5)
        return code

    @property
    def summary(self) -> dict:
        return json.loads([line for line in self.lines if line.startswith(SUMMARY)][-1])

    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("meshlm: error:")]


def launch(args: list[str], count: int = 2, extra: tuple[str, ...] = ()) -> list[Process]:
    port = portpicker.pick_unused_port()
    return [Process(i, count, port, args, extra) for i in range(count)]


def train_losses(run_dir: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert len(steps) == len(set(steps)), f"a step recorded twice: {steps}"  # one writer
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run in this one process on its 8 devices: ``(run_dir, losses)``."""
    run_dir = tmp_path_factory.mktemp("one_process")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--config", CONFIG, *TINY, *DP_FSDP,
                     f"train.run_dir={run_dir}"]) == 0
    return run_dir, train_losses(run_dir)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Two processes on a DP+FSDP mesh, process 1 sent SIGTERM once training is set up, then a
    second launch on a DP+TP mesh that resumes the run: ``(run_dir, stopped, resumed)``."""
    run_dir = tmp_path_factory.mktemp("two_processes")
    args = [*TINY, f"train.run_dir={run_dir}"]
    stopped = launch([*args, *DP_FSDP])
    stopped[0].wait_for("parameters,", timeout=150)  # state created, the loop about to start
    stopped[1].proc.send_signal(signal.SIGTERM)
    codes = [p.finish(timeout=120) for p in stopped]
    assert codes == [128 + signal.SIGTERM] * 2, "\n".join(stopped[0].lines + stopped[1].lines)
    resumed = launch([*args, *DP_TP])
    codes = [p.finish(timeout=150) for p in resumed]
    assert codes == [0, 0], "\n".join(resumed[0].lines + resumed[1].lines)
    return run_dir, stopped, resumed


def test_sigterm_to_one_process_stops_both_at_one_step_with_a_checkpoint(two_processes):
    stopped = two_processes[1]
    steps = {p.summary["step"] for p in stopped}
    assert len(steps) == 1 and 0 < steps.pop() < STEPS
    assert all(p.summary["signal"] == "SIGTERM" for p in stopped)
    step = stopped[0].summary["step"]
    assert stopped[0].summary["checkpoint_step"] == step
    assert any(f"SIGTERM: saved a checkpoint at step {step}" in line for line in stopped[0].lines)


def test_the_relaunch_resumes_and_both_meshes_match_one_process(two_processes, reference):
    """Per-step losses of the two launches (DP+FSDP until the stop, DP+TP after it) equal the
    one-process run's; each step is recorded once, by process 0."""
    run_dir, stopped, resumed = two_processes
    stop = stopped[0].summary["step"]
    assert any(f"resumed {run_dir} from step {stop}" in line for line in resumed[0].lines)
    assert all(p.summary["step"] == STEPS for p in resumed)
    losses, expected = train_losses(run_dir), reference[1]
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(expected)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [expected[s] for s in sorted(losses)], rtol=2e-5)
    assert len(set(losses.values())) == STEPS  # it trained: no step repeated another's loss


def test_one_copy_of_the_run_records(two_processes, reference):
    run_dir, stopped, resumed = two_processes
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in reference[0].iterdir()} == {
        "checkpoints", "config.yaml", "data", "metrics.jsonl", "tensorboard", "tokenizer.json",
        "tokenizer.corpus.json"}
    assert len(list((run_dir / "tensorboard").iterdir())) == 2  # one event file per launch
    assert (run_dir / "tokenizer.json").read_text() == (reference[0] / "tokenizer.json").read_text()
    # Progress, evaluation and the stop note are process 0's: process 1 prints only its summary.
    for p in (*stopped, *resumed):
        said = [line for line in p.lines if line.startswith(("step ", "SIGTERM:"))]
        assert bool(said) == (p is stopped[0] or p is resumed[0]), said


def test_the_checkpoint_holds_every_shard(two_processes, reference):
    """The two processes' checkpoint, restored in this one process, equals the one-process
    run's parameters (each process wrote only the shards its devices held). Entries whose
    gradients are rounding noise differ by ~1e-6 after Adam's normalised steps: atol 1e-5."""
    assert checkpoint.finished_steps(two_processes[0])[-1] == STEPS
    cfg, params = checkpoint.restore_params(two_processes[0])
    _, expected = checkpoint.restore_params(reference[0])
    assert cfg.mesh.tensor == 4
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_process_0_failing_to_prepare_the_data_stops_the_others(tmp_path):
    """Process 0 cannot write the token cache (``data`` is a file): process 1 leaves the
    barrier with one line instead of waiting for files that never come."""
    (tmp_path / "data").write_text("not a directory")
    procs = launch([*TINY, f"train.run_dir={tmp_path}"])
    codes = [p.finish(timeout=120) for p in procs]
    assert codes[0] != 0 and any(line.startswith("meshlm: error: [Errno 17] File exists")
                                 for line in procs[0].lines)
    assert not any("Traceback" in line for line in procs[0].lines)
    assert codes[1] == distributed.EXIT_FAILED
    assert procs[1].errors() == [("meshlm: error: process 1 of 2: process 0 failed while "
                                  "preparing the tokenizer and token cache; its log has the error")]


@pytest.mark.parametrize("index", [0, 1])
def test_a_coordinator_or_peer_that_never_comes_ends_within_the_timeout(index, tmp_path):
    """Process 1 without a coordinator, or process 0 (the coordinator) without process 1."""
    started = time.monotonic()
    only = Process(index, 2, portpicker.pick_unused_port(), [*TINY, f"train.run_dir={tmp_path}"],
                   ("--init-timeout", "3"))
    assert only.finish(timeout=60) == distributed.EXIT_FAILED
    assert time.monotonic() - started < 45  # 3 s past JAX's import, not its 300 s default
    (line,) = only.errors()
    assert "did not all reach the coordinator at 127.0.0.1:" in line
    assert "within 3 s (--init-timeout)" in line
    assert not any("Traceback" in line or "Check failure" in line for line in only.lines)


def test_a_peer_that_dies_ends_the_others_within_the_heartbeat_timeout(tmp_path):
    """SIGKILL to process 1 (no goodbye): process 0 ends within --heartbeat-timeout, through
    JAX's own fatal message when it was waiting on no collective (here: preparing the data)."""
    procs = launch([*TINY, f"train.run_dir={tmp_path}"], extra=("--heartbeat-timeout", "5"))
    procs[0].wait_for("devices: 8 x cpu in 2 processes", timeout=60)
    killed = time.monotonic()
    procs[1].proc.kill()
    assert procs[0].finish(timeout=60) != 0
    assert time.monotonic() - killed < 25
    said = "\n".join(procs[0].lines)
    assert "another task died" in said or "did another process stop?" in said, said[-2000:]


@pytest.mark.parametrize("argv, env, message", [
    (["--coordinator-address", "127.0.0.1:1234", "--process-id", "0"], {},
     "--num-processes not given and no cluster detected"),
    ([], {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     ("--process-id not given and no cluster detected (SLURM, Open MPI, Kubernetes, Cloud TPU); "
      "pass --process-id (or set JAX_PROCESS_ID)")),
    ([], {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer (it stands for --num-processes)"),
    (["--coordinator-address", "h", "--num-processes", "2", "--process-id", "0"], {},
     "--coordinator-address 'h' must be HOST:PORT"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"], {},
     "--process-id must be in [0, 2) for --num-processes 2, got 2"),
])
def test_a_missing_or_bad_piece_is_one_line_naming_the_flag(argv, env, message, monkeypatch,
                                                             capsys):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_detect", lambda **given: (*given.values(), None))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main(["train", "--distributed", *argv, "--config", CONFIG]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshlm: error: ") and message in err[0], err


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setattr(distributed, "_detect", lambda **given: (*given.values(), None))
    env = {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ=env) == distributed.Cluster("env:1", 4, 3)
    assert distributed.resolve("flag:2", 2, 1, environ=env) == distributed.Cluster("flag:2", 2, 1)
    assert distributed.resolve(process_id=0, environ=env) == distributed.Cluster("env:1", 4, 0)


def test_slurm_is_detected_and_flags_override_it(monkeypatch):
    slurm = {"SLURM_JOB_ID": "4096", "SLURM_STEP_NODELIST": "node[007-008]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    port = 4096 % 2**12 + 65535 - 2**12 + 1  # SLURM's job id picks the port
    assert distributed.resolve(environ={}) == distributed.Cluster(f"node007:{port}", 2, 1, (0,))
    assert distributed.resolve("head:9", process_id=0, environ={}) == distributed.Cluster(
        "head:9", 2, 0, (0,))


def test_cluster_flags_need_distributed(capsys):
    assert main(["train", "--num-processes", "2", "--config", CONFIG]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == "meshlm: error: --num-processes needs --distributed"
