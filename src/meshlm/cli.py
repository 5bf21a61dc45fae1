"""``meshlm train --config F [section.key=value ...]``, ``meshlm generate --run-dir R ...`` and
``meshlm convert hf-to-orbax | orbax-to-hf ...``.

Bad input (a config, a checkpoint or a prompt that cannot work) prints one line,
``meshlm: error: ...``, and exits with status 2; a checkpoint that cannot be written exits with
1. A run stopped by SIGTERM or Ctrl-C exits with 128 + the signal's number (143, 130) after
saving its checkpoint, so a scheduler sees a preemption, not a success; a second Ctrl-C exits
with 130 at once, without saving.

With ``--distributed`` a process that cannot go on with the others (no coordinator within
``--init-timeout``, a peer gone, process 0 failed preparing the data) prints one line and exits
with 1 at once, not through JAX's shutdown barrier, so the others stop too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from meshlm import distributed
from meshlm.config import ConfigError, load_config
from meshlm.distributed import HEARTBEAT_TIMEOUT_S, INIT_TIMEOUT_S

EXIT_FAILED = 1  # the run could not go on (a checkpoint could not be written)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # SIGTERM: 143


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="settings applied over the file, e.g. train.steps=100")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes (one per host); the flags below, else "
                        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else "
                        "SLURM, Open MPI, Kubernetes or Cloud TPU say who the processes are")
    p.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="--distributed: process 0's host and a free port on it")
    p.add_argument("--num-processes", type=int, metavar="N", help="--distributed: processes")
    p.add_argument("--process-id", type=int, metavar="I", help="--distributed: this one, 0..N-1")
    p.add_argument("--init-timeout", type=int, default=INIT_TIMEOUT_S, metavar="S",
                   help="--distributed: seconds for all processes to reach the coordinator "
                        f"(default {INIT_TIMEOUT_S})")
    p.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S, metavar="S",
                   help="--distributed: seconds of silence after which a process counts as dead "
                        f"and every process stops (default {HEARTBEAT_TIMEOUT_S})")

    p = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    p.add_argument("--run-dir", required=True, help="the run's train.run_dir")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="0 = off (default 0)")
    p.add_argument("--top-p", type=float, help="1 = off (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beam-width", type=int, default=1,
                   help="> 1: beam search (deterministic) instead of sampling (default 1)")
    p.add_argument("--length-penalty", type=float,
                   help="beam search: alpha of the ((5 + length) / 6) ** alpha divisor of a "
                        "hypothesis' log-probability; 0 = none, > 0 favours longer (default 0.6)")

    p = sub.add_parser("convert", help="HuggingFace checkpoints <-> meshlm run directories")
    way = p.add_subparsers(dest="direction", required=True)
    q = way.add_parser("hf-to-orbax", help="a HF directory (config.json, *.safetensors) -> a run")
    q.add_argument("--hf", required=True, help="local HF model directory")
    q.add_argument("--out", required=True, help="the run directory to create")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameter and compute dtype of the run")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q = way.add_parser("orbax-to-hf", help="a run's latest parameters -> a HF directory")
    q.add_argument("--run-dir", required=True, help="the run directory to read")
    q.add_argument("--out", required=True, help="the HF directory to create")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _train(args) -> int:
    import jax

    from meshlm.accelerators import startup_report
    from meshlm.train.loop import train

    _quiet_orbax_failures()
    cluster_flags = [f for f in ("coordinator_address", "num_processes", "process_id")
                     if getattr(args, f) is not None]
    if cluster_flags and not args.distributed:
        raise ConfigError(f"--{cluster_flags[0].replace('_', '-')} needs --distributed")
    if args.distributed:  # before anything asks JAX for its devices
        cluster = distributed.resolve(args.coordinator_address, args.num_processes,
                                      args.process_id)
        distributed.initialize(cluster, args.init_timeout, args.heartbeat_timeout)
    cfg = load_config(args.config, args.overrides)
    for line in startup_report(jax.devices()):  # the devices; a warning if JAX misses a GPU/TPU
        logging.getLogger("meshlm").info(line)
    summary = train(cfg)
    print(json.dumps(summary))
    return 128 + signal.Signals[summary["signal"]] if summary["signal"] else 0


def _generate(args) -> int:
    from meshlm.generate.text import Request, complete

    _quiet_orbax_failures()
    print(complete(Request(
        run_dir=args.run_dir, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        beam_width=args.beam_width, length_penalty=args.length_penalty,
    )))
    return 0


def _convert(args) -> int:
    from meshlm.convert.hf import hf_to_orbax, orbax_to_hf

    _quiet_orbax_failures()
    if args.direction == "hf-to-orbax":
        cfg = hf_to_orbax(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"meshlm: wrote run {args.out} (model.family={cfg.model.family})", file=sys.stderr)
    else:
        hf = orbax_to_hf(args.run_dir, args.out, overwrite=args.overwrite)
        print(f"meshlm: wrote {hf['model_type']} checkpoint {args.out}", file=sys.stderr)
    return 0


def _quiet_orbax_failures() -> None:
    """Orbax logs a failed save or restore with a traceback from each of its threads (and
    asyncio one for each unawaited write that failed too); meshlm raises one error naming the
    root cause instead. (Not in ``main``: importing the checkpoint module imports Orbax, which
    ``--help`` and config errors do without.)"""
    from meshlm.train.checkpoint import drop_orbax_errors

    for logger in ("absl", "asyncio"):
        logging.getLogger(logger).addFilter(drop_orbax_errors)  # once: the same function object


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Our progress lines at INFO; libraries (Orbax logs every file it renames) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("meshlm").setLevel(logging.INFO)
    try:
        code = {"train": _train, "generate": _generate, "convert": _convert}[args.command](args)
    except BaseException as e:  # noqa: BLE001 - reported by _failure in one line, or re-raised
        code = _failure(e) if not _several_processes() else _failure_of_one_process(e)
    if code not in (0, 128 + signal.SIGTERM) and _several_processes():
        # A failure leaves now, not through atexit: JAX's shutdown barrier would wait for peers
        # that are gone, then abort. The others see this one leave and stop too. (Finished or
        # preempted runs meet at that barrier, so process 0's coordinator outlives the others.)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _several_processes() -> bool:
    return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


def _failure_of_one_process(e: BaseException) -> int:
    """``_failure``, except that a bug prints its traceback and returns: the process must still
    leave at once, so that the others stop too."""
    try:
        return _failure(e)
    except BaseException:  # noqa: BLE001 - printed, and the process exits with status 1
        import traceback

        traceback.print_exc()
        return EXIT_FAILED


def _say(line: str) -> None:
    """``line`` on stderr in one write: ``print`` writes the text and its newline apart on the
    unbuffered stderr, and a library's log line from another thread (Gloo's) landed between
    them."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _failure(e: BaseException) -> int:
    """The exit status for ``e`` after printing its one line; re-raises ``e`` when it is not
    a failure meshlm reports (a bug)."""
    if isinstance(e, KeyboardInterrupt):  # a Ctrl-C outside the training loop, or a second one
        _say("meshlm: interrupted")
        return EXIT_INTERRUPTED
    if isinstance(e, ConfigError):
        _say(f"meshlm: error: {e}")
        return EXIT_BAD_INPUT
    if isinstance(e, (distributed.DistributedError, OSError)):  # OSError: a path, a disk, a peer
        _say(f"meshlm: error: {e}")
        return EXIT_FAILED
    if not isinstance(e, (ValueError, RuntimeError)):
        raise e
    from meshlm.train.checkpoint import CheckpointError, CheckpointSaveError

    if isinstance(e, (CheckpointError, CheckpointSaveError)):
        _say(f"meshlm: error: {e}")
        return EXIT_BAD_INPUT if isinstance(e, CheckpointError) else EXIT_FAILED
    if _several_processes() and isinstance(e, sys.modules["jax"].errors.JaxRuntimeError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say(f"meshlm: error: {distributed.where()}: a computation across the processes failed "
             f"(did another process stop?): {first}")
        return EXIT_FAILED
    raise e


if __name__ == "__main__":
    sys.exit(main())
