"""Several processes as one run (``meshlm train --distributed``): who they are, and failing fast.

Each of the three facts JAX needs comes from, in order: the flag (``--coordinator-address``,
``--num-processes``, ``--process-id``: the names of ``jax.distributed.initialize``'s arguments),
its environment variable (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``),
then JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU). A fact none of them gives
is one ``ConfigError`` naming its flag.

JAX's own failure modes are a hang of up to five minutes and then an abort with a C++ stack
trace. Here a coordinator or peer that does not show up within ``init_timeout`` ends the process
with one line; a peer that dies mid-run fails the next collective (on the CPU, gloo sees the
closed connection at once), which the CLI reports in one line, and JAX's heartbeat ends anything
still waiting after ``heartbeat_timeout``. Process 0's data preparation reports its outcome to the
others (``check_process_0``) instead of leaving them at a barrier.
(JAX is imported inside the functions: ``meshlm --help`` goes without it.)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping

from meshlm.config import ConfigError

INIT_TIMEOUT_S = 300  # JAX's defaults: to connect, and to declare a silent process dead
HEARTBEAT_TIMEOUT_S = 100
EXIT_FAILED = 1

# argument of jax.distributed.initialize -> (flag, environment variable)
SOURCES = {
    "coordinator_address": ("--coordinator-address", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("--num-processes", "JAX_NUM_PROCESSES"),
    "process_id": ("--process-id", "JAX_PROCESS_ID"),
}


class DistributedError(RuntimeError):
    """The processes of a run cannot go on together (a peer failed or never came)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None  # from cluster detection (one GPU a rank)


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: Mapping[str, str] | None = None,
            detect: bool = True) -> Cluster:
    """The run's processes from the flags, else the environment, else cluster detection;
    ``ConfigError`` naming the flag of whatever is missing or invalid."""
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    for name, (flag, var) in SOURCES.items():
        if given[name] is None and environ.get(var, "").strip():
            value = environ[var].strip()
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigError(f"{var}={environ[var]!r} is not an integer (it stands "
                                      f"for {flag})") from None
            given[name] = value
    local = None
    if detect:  # also for every fact given: it may restrict each process to its own GPU
        given["coordinator_address"], given["num_processes"], given["process_id"], local = (
            _detect(**given))
    missing = [SOURCES[k][0] for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(
            f"--distributed: {', '.join(missing)} not given and no cluster detected (SLURM, Open "
            "MPI, Kubernetes, Cloud TPU); pass " + " ".join(
                f"{SOURCES[k][0]} (or set {SOURCES[k][1]})" for k, v in given.items()
                if v is None))
    address, n, i = given["coordinator_address"], given["num_processes"], given["process_id"]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator-address {address!r} must be HOST:PORT (process 0's "
                          "host and a free port on it)")
    if n < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"--process-id must be in [0, {n}) for --num-processes {n}, got {i}")
    return Cluster(address, n, i, None if local is None else tuple(local))


def _detect(coordinator_address, num_processes, process_id):
    """JAX's cluster detection for what is still unset (the given values stay)."""
    from jax._src import (
        clusters,  # the detection jax.distributed.initialize runs itself
    )

    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        coordinator_address, num_processes, process_id, None, None, INIT_TIMEOUT_S)


def initialize(cluster: Cluster, init_timeout: int = INIT_TIMEOUT_S,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S) -> None:
    """``jax.distributed.initialize`` for ``cluster``, with gloo for the CPU's cross-process
    collectives. If the processes have not all met at the coordinator within ``init_timeout``
    seconds, prints one line and ends the process with status 1 (JAX would abort with a stack
    trace, later)."""
    for name, value in (("init_timeout", init_timeout), ("heartbeat_timeout", heartbeat_timeout)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 second, got {value}")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend's only
    where = f"process {cluster.process_id} of {cluster.num_processes}"
    hint = ("did every process start, and can they reach this port?" if cluster.process_id == 0
            else "is process 0 running on that host, is the port open, and did every process "
                 "start?")
    message = (f"{where}: the {cluster.num_processes} processes did not all reach the "
               f"coordinator at {cluster.coordinator_address} within {init_timeout} s "
               f"(--init-timeout); {hint}")
    watchdog = threading.Timer(init_timeout, die, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes, process_id=cluster.process_id,
            local_device_ids=None if cluster.local_device_ids is None
            else list(cluster.local_device_ids),
            cluster_detection_method="deactivate",  # resolve() did it
            initialization_timeout=init_timeout + 60,  # the watchdog speaks first
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=heartbeat_timeout,
        )
    finally:
        watchdog.cancel()


def die(message: str) -> None:
    """One ``meshlm: error:`` line, then exit at once with status 1: no atexit handlers, whose
    shutdown barrier would wait for processes that are gone (and then abort)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.write(2, f"meshlm: error: {message}\n".encode())
    os._exit(EXIT_FAILED)


def where() -> str:
    """``process I of N``: which process speaks, for messages."""
    import jax

    return f"process {jax.process_index()} of {jax.process_count()}"


def check_process_0(ok: bool, what: str) -> None:
    """Every process calls this after process 0 did ``what`` (``ok``: it succeeded): a barrier
    that carries the outcome, so the others raise ``DistributedError`` instead of waiting for
    files that will not come. Process 0 raises its own error afterwards."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(ok))
    if not int(np.asarray(flags).reshape(-1)[0]) and jax.process_index() != 0:
        raise DistributedError(f"{where()}: process 0 failed while {what}; its log has the "
                               "error")
