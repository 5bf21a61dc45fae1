"""``meshlm train --config F [section.key=value ...]``, ``meshlm generate --run-dir R ...`` and
``meshlm convert hf-to-orbax | orbax-to-hf ...``.

Bad input (a config, a checkpoint or a prompt that cannot work) prints one line,
``meshlm: error: ...``, and exits with status 2; a checkpoint that cannot be written exits with
1. A run stopped by SIGTERM or Ctrl-C exits with 128 + the signal's number (143, 130) after
saving its checkpoint, so a scheduler sees a preemption, not a success; a second Ctrl-C exits
with 130 at once, without saving.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence

from meshlm.config import ConfigError, load_config

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
                   help="one of several processes (one per host): jax.distributed.initialize() "
                        "finds the others through SLURM, Open MPI, Kubernetes or Cloud TPU")

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
    if args.distributed:
        jax.distributed.initialize()  # before anything asks JAX for its devices
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
    """Orbax logs a failed save or restore with a traceback from each of its threads; meshlm
    raises one error naming the root cause instead. (Not in ``main``: importing the checkpoint
    module imports Orbax, which ``--help`` and config errors do without.)"""
    from meshlm.train.checkpoint import drop_orbax_errors

    logging.getLogger("absl").addFilter(drop_orbax_errors)  # once: the same function object


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Our progress lines at INFO; libraries (Orbax logs every file it renames) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("meshlm").setLevel(logging.INFO)
    try:
        return {"train": _train, "generate": _generate, "convert": _convert}[args.command](args)
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop, or a second one inside it
        print("meshlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as e:
        print(f"meshlm: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, RuntimeError) as e:
        from meshlm.train.checkpoint import CheckpointError, CheckpointSaveError

        if not isinstance(e, (CheckpointError, CheckpointSaveError)):
            raise
        print(f"meshlm: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(e, CheckpointError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
