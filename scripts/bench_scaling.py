"""Scaling of meshlm's train step over the GPUs of one host: one table, one run.

For each model (default: GPT ~1.3B and ~350M) this times the real train step on 1 GPU, then on
N GPUs under each parallelism strategy of ``STRATEGIES`` (DP, FSDP, TP, pipeline GPipe and
circular, and combinations), with the per-GPU batch held fixed (weak scaling: the N-GPU runs
take N times the rows). It prints:

    model | strategy | GPUs | mesh | batch x seq | tok/s/GPU | MFU | scaling eff. | peak GiB

scaling efficiency = tokens/s per GPU on N GPUs / tokens/s on 1 GPU; MFU = tokens/s per GPU *
training FLOPs per token / the GPU's dense bf16 peak. The last line names the best N-GPU row.
Every measurement is a child process of ``scripts/bench_train.py`` (its worker: the same step
``meshlm.train.setup.build`` compiles, the same timing), seeing only the GPUs it uses; an error
(e.g. out of memory) fills its row and the run goes on. NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0``). All rows scan the layer stack (the pipeline needs it), so compare
single-GPU numbers with bench_train's unrolled ones only knowingly.

    PYTHONPATH=src:. python3 scripts/bench_scaling.py --gpus 4            # the GPU table
    PYTHONPATH=src:. python3 scripts/bench_scaling.py --smoke             # 8 fake CPU devices
    PYTHONPATH=src:. python3 scripts/bench_scaling.py --gpus 4 --models moe_mixtral_1b \\
        --strategies 1gpu,ep,dp                                           # expert parallelism
    PYTHONPATH=src:. python3 scripts/bench_scaling.py --gpus 4 --models gpt_1p3b \\
        --strategies 1gpu,fsdp,pp_circular --set train.microbatches=32     # a subset

To add a strategy, add an entry to ``STRATEGIES``: a name -> a function of the GPU count (and
the model's layer count) returning the overrides of that row.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from scripts import bench_train  # noqa: E402  (after the path set-up)

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (inherited by every child)

PIPELINE_REPEATS = 2  # layer groups per stage of the circular schedule


def _mesh(data=1, fsdp=1, tensor=1, pipeline=1, sequence=1, expert=1) -> list[str]:
    return [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
            f"mesh.pipeline={pipeline}", f"mesh.sequence={sequence}", f"mesh.expert={expert}"]


def _pipeline(n: int, repeats: int = 1, data: int = 1) -> list[str]:
    """``n`` stages over a batch of ``4 n`` microbatches per data shard (bubble (n-1)/(5n-1))."""
    return [*_mesh(data=data, pipeline=n), f"train.microbatches={4 * n}",
            f"train.pipeline_repeats={repeats}"]


# name -> (GPUs used given --gpus n, overrides given n). The "1gpu" row is the baseline that
# scaling efficiency divides by.
STRATEGIES: dict[str, tuple[Callable[[int], int], Callable[[int], list[str]]]] = {
    "1gpu": (lambda n: 1, lambda n: _mesh()),
    "dp": (lambda n: n, lambda n: _mesh(data=n)),
    "fsdp": (lambda n: n, lambda n: _mesh(fsdp=n)),
    "tp": (lambda n: n, lambda n: _mesh(tensor=n)),
    "pp_gpipe": (lambda n: n, lambda n: _pipeline(n)),
    "pp_circular": (lambda n: n, lambda n: _pipeline(n, PIPELINE_REPEATS)),
    "fsdp_x_tp2": (lambda n: n, lambda n: _mesh(fsdp=n // 2, tensor=2)),
    "dp_x_pp2": (lambda n: n, lambda n: _pipeline(2, data=n // 2)),
    # MoE models only: the experts spread over the GPUs (tokens exchanged by all-to-all).
    "ep": (lambda n: n, lambda n: _mesh(expert=n)),
}

# model -> per-GPU batch, sequence length and overrides (bench_train's tuned settings, scanned).
MODELS = {
    "gpt_1p3b": dict(batch=8, seq=2048, overrides=("model.remat=dots_no_batch",)),
    "gpt2_350m": dict(batch=16, seq=1024, overrides=("model.remat=none",)),
    "moe_mixtral_1b": dict(batch=8, seq=2048, overrides=()),
}
SMOKE_MODEL = dict(batch=4, seq=32, overrides=(
    "model.d_model=32", "model.n_heads=8", "model.d_ff=64", "model.n_layers=16",
    "model.vocab_size=256", "model.max_seq_len=32", "model.dtype=float32",
    "model.attention=xla"))


def worker_args(args) -> argparse.Namespace:
    """What bench_train.run_worker reads from its own command line."""
    return argparse.Namespace(steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                              profile=False, xla_flags=args.xla_flags,
                              worker_timeout=args.worker_timeout)


def measure(args, model: str, gpus: int, overrides: list[str], batch: int, seq: int) -> dict:
    """One row in a child process that sees ``gpus`` devices (fake CPU devices with --smoke)."""
    env = dict(os.environ)
    wargs = worker_args(args)
    try:
        if args.smoke:
            wargs.xla_flags = f"{args.xla_flags} --xla_force_host_platform_device_count={gpus}"
            os.environ["JAX_PLATFORMS"] = "cpu"
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
        return bench_train.run_worker("jax", wargs, model, batch, seq, overrides)
    finally:
        os.environ.clear()
        os.environ.update(env)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=4, help="N (default: %(default)s)")
    parser.add_argument("--models", default="gpt_1p3b,gpt2_350m",
                        help="comma-separated config names (default: %(default)s)")
    parser.add_argument("--strategies", default=",".join(s for s in STRATEGIES if s != "ep"),
                        help="comma-separated rows of STRATEGIES (default: all but ep)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="meshlm override for every row, applied last; repeatable")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--xla-flags", default="", help="added to XLA_FLAGS for the runs")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: by device kind)")
    parser.add_argument("--worker-timeout", type=int, default=900)
    parser.add_argument("--out", default=None, help="directory for results.jsonl and table.md")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: 8 fake devices, a 16-layer d_model-32 GPT, 2 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.gpus, args.models, args.steps, args.warmup, args.rounds = 8, "default", 2, 1, 1
    unknown = set(args.strategies.split(",")) - set(STRATEGIES)
    if unknown:
        raise SystemExit(
            f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")

    from meshlm.config import load_config

    headers = ["model", "strategy", "GPUs", "mesh", "batch x seq", "tok/s/GPU", "MFU",
               "scaling eff.", "peak GiB"]
    rows, records = [], []
    out = pathlib.Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        spec = SMOKE_MODEL if args.smoke else MODELS.get(model, dict(batch=None, seq=None,
                                                                      overrides=()))
        base = load_config(bench_train.config_path(model))
        per_gpu = spec["batch"] or base.data.batch_size
        seq = spec["seq"] or base.data.seq_len
        baseline = None
        for name in args.strategies.split(","):
            gpus_of, overrides_of = STRATEGIES[name]
            gpus = gpus_of(args.gpus)
            overrides = [*spec["overrides"], "model.scan_layers=true", *overrides_of(args.gpus),
                         *args.set]
            cfg = load_config(bench_train.config_path(model), [*overrides, f"data.seq_len={seq}"])
            batch = per_gpu * gpus
            print(f"== {model} {name}: {gpus} GPUs, batch {batch} x {seq}, {overrides}",
                  flush=True)
            r = measure(args, model, gpus, overrides, batch, seq)
            print(f"   {json.dumps(r)}", flush=True)
            flops = cfg.model.flops_per_token(seq)
            peak = (args.peak_tflops * 1e12 if args.peak_tflops
                    else bench_train.peak_flops(r.get("device_kind", "")))
            mesh = " ".join(o.split(".", 1)[1] for o in overrides_of(args.gpus)
                            if not o.endswith("=1")) or "-"
            if "error" in r:
                cells = ["error: " + r["error"][:60], "-", "-", "-"]
            else:
                tps = r["tokens_per_s"] / r["num_devices"]
                if name == "1gpu":
                    baseline = tps
                cells = [f"{tps:,.0f}", f"{100 * tps * flops / peak:.1f}%" if peak else "n/a",
                         f"{100 * tps / baseline:.0f}%" if baseline else "n/a",
                         f"{r.get('peak_gib', 0):.1f}"]
                r["tokens_per_s_per_gpu"] = tps
            rows.append([model, name, gpus, mesh, f"{batch} x {seq}", *cells])
            records.append({"model": model, "strategy": name, "gpus": gpus, "batch": batch,
                            "seq": seq, "overrides": overrides, "flops_per_token": flops,
                            "peak_flops": peak, **r})
            if out:
                (out / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
                (out / "table.md").write_text(bench_train._table(headers, rows) + "\n")

    kinds = sorted({r.get("device_kind", "?") for r in records if "error" not in r})
    print(f"\nmeshlm scaling, {args.gpus} GPUs of one host, device: {', '.join(kinds)}; best of "
          f"{args.rounds} rounds of {args.steps} steps after {args.warmup}; NCCL_NVLS_ENABLE=0; "
          f"XLA_FLAGS+={args.xla_flags!r}")
    print(bench_train._table(headers, rows), flush=True)
    for model in args.models.split(","):
        ok = [r for r in records if r["model"] == model and r["gpus"] > 1 and "error" not in r]
        if ok:
            best = max(ok, key=lambda r: r["tokens_per_s_per_gpu"])
            print(f"best on {args.gpus} GPUs for {model}: {best['strategy']} "
                  f"({best['tokens_per_s_per_gpu']:,.0f} tok/s/GPU)")
    if any("error" in r for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
