"""Training throughput and MFU of meshlm's real train step beside a torch.compile baseline.

For each config (default: GPT ~125M, ~350M, ~1.3B parameters; any family) this times, on one
device, the train step ``meshlm.train.setup.build`` compiles (bf16 compute, fp32 parameters and
AdamW state, global-norm clipping) and, for the GPT and T5 families, a PyTorch model of the same
architecture and batch (``scripts/torch_gpt.py``; ``scripts/torch_t5.py``: transformers'
``T5ForConditionalGeneration``; torch.compile, bf16 autocast, fused AdamW; skipped where torch
has no CUDA), then prints one Markdown table. For T5 a token is a row position (one encoder and
one decoder token, both sides ``--seq`` long). A config entry may carry its own
overrides after ``@`` (``mamba_130m@model.implementation=xla``), so one run can set a model
beside a variant of itself. A step time is the mean of ``--steps`` steps with one
sync at the end, the fastest of ``--rounds`` such rounds (all recorded), after ``--warmup`` steps:

    config | params | batch x seq | meshlm tok/s | MFU | torch tok/s | torch MFU | ratio

MFU = tokens/s * the model's training FLOPs per token / the device's dense bf16 peak. Every
measurement runs in its own child process, so JAX's and PyTorch's allocators never hold GPU memory
at the same time and an out-of-memory in one row does not lose the others.

    PYTHONPATH=src:. python3 scripts/bench_train.py                   # the GPU table
    PYTHONPATH=src:. python3 scripts/bench_train.py --smoke           # CPU check, tiny config
    PYTHONPATH=src:. python3 scripts/bench_train.py --configs gpt2_125m --batch 32 \\
        --set model.remat=none --skip-torch                           # one tuning point
    PYTHONPATH=src:. python3 scripts/bench_train.py --configs \
        gpt2_125m@model.max_seq_len=2048,mamba2_130m --batch 8 --seq 2048  # families, same tokens
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Dense bf16 peak (TFLOP/s, without sparsity) by substring of jax's device_kind.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L4": 121.0}

# Per config: the batch, sequence length and meshlm overrides this benchmark runs by default,
# tuned on an H100 (notes in BENCHMARKS.md): the config's own attention; layers unrolled
# (nn.scan's stacked residuals cost ~25% of a 125M step in copies and dynamic-update-slices); no
# remat where the activations fit. The PyTorch baseline gets the same batch and sequence length.
_FAST = ("model.scan_layers=false",)
DEFAULTS = {
    "gpt2_125m": dict(batch=16, seq=1024, overrides=(*_FAST, "model.remat=none")),
    "gpt2_350m": dict(batch=16, seq=1024, overrides=(*_FAST, "model.remat=none")),
    "gpt_1p3b": dict(batch=8, seq=2048, overrides=(*_FAST, "model.remat=none")),
}
SMOKE = dict(config="default", batch=4, seq=64, steps=2, warmup=1)
# The PyTorch baseline module (its ``measure``) of each family that has one.
TORCH_BASELINES = {"gpt": "scripts.torch_gpt", "t5": "scripts.torch_t5"}


def config_path(name: str) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
        raise SystemExit(f"unknown config {name!r}: give a YAML path or one of {names}")
    return path


def _has_cuda_torch() -> bool:
    """Whether a torch with CUDA is installed (checked in a child: no CUDA context here)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True,
                              timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def peak_flops(device_kind: str) -> float | None:
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_kind:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------- workers


def jax_worker(args) -> dict:
    """Build the real train state and step for one config, then time ``args.steps`` steps."""
    import jax
    import numpy as np

    from meshlm.config import load_config
    from meshlm.train.setup import build
    from meshlm.train.state import param_count
    from meshlm.train.xla_options import compiler_options

    overrides = [*args.set, f"data.batch_size={args.batch}", f"data.seq_len={args.seq}"]
    cfg = load_config(config_path(args.config), overrides)
    t0 = time.perf_counter()
    run = build(cfg)
    state = run.init_state()
    train_step = run.train_step
    compile_s = time.perf_counter() - t0

    # Full rows of random tokens (one document per row), four batches used in rotation.
    rng = np.random.default_rng(0)
    b, length = args.batch, args.seq
    batches = [jax.device_put(random_batch(cfg, rng, b, length, args.documents),
                              run.batch_sharding)
               for _ in range(4)]

    state, metrics = train_step(state, batches[0])
    first_loss = float(metrics["loss"])
    for i in range(1, args.warmup):
        state, metrics = train_step(state, batches[i % 4])
    jax.block_until_ready((state, metrics))
    # Each round: ``steps`` steps and one sync. ``dispatch_s`` is the host time spent inside the
    # step calls; when it nears the step time, the host, not the GPU, sets the pace.
    # ``call_s`` (each call's, per round) tells a host that waits on the device (calls past
    # the first few as long as a step) from one busy launching kernels (every call as long).
    round_s, dispatch_s, call_s = [], [], []
    for _ in range(args.rounds):
        t0, calls = time.perf_counter(), []
        for i in range(args.steps):
            t = time.perf_counter()
            state, metrics = train_step(state, batches[i % 4])
            calls.append(time.perf_counter() - t)
        jax.block_until_ready((state, metrics))
        round_s.append((time.perf_counter() - t0) / args.steps)
        dispatch_s.append(sum(calls) / args.steps)
        call_s.append(calls)
    step_s = min(round_s)
    last_loss = float(metrics["loss"])
    summary = None
    if args.profile:
        def run_steps(n):
            nonlocal state, metrics
            for i in range(n):
                state, metrics = train_step(state, batches[i % 4])
            jax.block_until_ready((state, metrics))

        summary = _jax_profile(run_steps, 2, train_step, args.profile_file, step_s * 1e3)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "step_s": step_s, "round_s": round_s, "dispatch_s": dispatch_s, "call_s": call_s,
        "tokens_per_s": b * length / step_s, "params": param_count(state.params),
        "first_loss": first_loss, "last_loss": last_loss,
        "finite": bool(np.isfinite(last_loss)), "compile_s": compile_s,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device_kind": device.device_kind,
        "platform": device.platform, "num_devices": jax.device_count(),
        "compiler_options": compiler_options(cfg.train.xla_flags, device.platform),
        "versions": f"jax {jax.__version__}", **({"profile": summary} if summary else {}),
    }


def random_batch(cfg, rng, b: int, length: int, documents: int = 1) -> dict:
    """A batch of the family's type (``batch_fields``): random token fields, ``documents`` equal
    packed documents per row (segment ids 1, 2, ..., positions restarting at each), every token
    counted in the loss. A seq2seq decoder side has the run's ``data.target_len`` instead of
    ``length``."""
    import numpy as np

    from meshlm.data.batches import batch_shapes, decoder_fields

    shapes, decoder = batch_shapes(cfg), decoder_fields(cfg.model.batch_fields)

    def field(name, dtype):
        n = shapes[name][1] if name in decoder else length
        doc = n // documents if name not in decoder else n
        if name.endswith("positions"):
            return np.broadcast_to(np.arange(n, dtype=dtype) % doc, (b, n))
        if name.endswith("segment_ids"):
            return np.broadcast_to(1 + np.arange(n, dtype=dtype) // doc, (b, n))
        if name == "loss_mask":
            return np.ones((b, n), dtype)
        return rng.integers(0, cfg.model.vocab_size, (b, n), dtype=dtype)

    return {k: field(k, np.dtype(d)) for k, d in cfg.model.batch_fields.items()}


def _jax_profile(run_steps, steps: int, compiled, path: str | None, step_ms: float,
                 top: int = 40) -> str:
    """Device time per kernel of ``run_steps(steps)`` (a jax.profiler trace, summed by name),
    each kernel described from the ``compiled`` step's HLO, beside ``step_ms``, the step timed
    without the trace; the full table goes to ``path`` when given (on a CPU run, which has no GPU
    events, the descriptions alone), and the optimised HLO beside it (``path`` +
    ``.hlo.txt.gz``), to trace what the map cannot name (memcpys)."""
    from scripts.profile_trace import hlo_kernel_map, map_text, trace_device_time

    try:
        text = compiled.as_text()
        if path:
            pathlib.Path(path + ".hlo.txt.gz").write_bytes(gzip.compress(text.encode()))
        hlo_map = hlo_kernel_map(text)
    except Exception as e:  # a diagnostic: never lose the measurement (device time) over it
        print(f"no kernel descriptions: {type(e).__name__}: {e}", flush=True)
        hlo_map = {}
    try:
        trace = trace_device_time(lambda: run_steps(steps), steps)
    except RuntimeError as e:  # no GPU events (a CPU run)
        if path:
            pathlib.Path(path).write_text(map_text(hlo_map))
            return f"{e}\n(the HLO descriptions of {len(hlo_map)} kernels: {path})"
        return str(e)
    if path:
        pathlib.Path(path).write_text(
            trace.report(len(trace.kernels), hlo_map, None, step_ms) + "\n")
    return trace.report(top, hlo_map, step_ms=step_ms)


def torch_worker(args) -> dict:
    import importlib

    import torch

    from meshlm.config import load_config

    cfg = load_config(config_path(args.config), [*args.set, f"data.seq_len={args.seq}"])
    measure = importlib.import_module(TORCH_BASELINES[cfg.model.family]).measure
    result = measure(cfg.model, args.batch, args.seq, steps=args.steps, warmup=args.warmup,
                     profile=args.profile, rounds=args.rounds)
    result["versions"] = f"torch {torch.__version__}"
    result["device_kind"] = torch.cuda.get_device_name()
    return result


# ------------------------------------------------------------------------------------ driver


def run_worker(kind: str, args, config: str, batch: int, seq: int, overrides,
               profile_file=None) -> dict:
    """One measurement in a child process; returns its result or ``{"error": ...}``."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", kind,
           "--config", config, "--batch", str(batch), "--seq", str(seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
           "--documents", str(args.documents)]
    for item in overrides:
        cmd += ["--set", item]
    if args.profile:
        cmd.append("--profile")
        if profile_file and kind == "jax":
            cmd += ["--profile-file", str(profile_file)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if kind == "jax":
        env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS"), args.xla_flags) if f)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - t0
            return result
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    # A native crash ends in a stack of frames: its cause is the fatal log line before them.
    fatal = [line for line in lines if _FATAL.search(line)][:5]
    print(f"[{kind} {config} failed, exit {proc.returncode}]\n" + "\n".join(fatal + lines[-25:]),
          flush=True)
    last = next((line for line in reversed(lines) if line.strip()
                 and not line.lstrip().startswith("@")), "no output")
    return {"error": (fatal[0] if fatal else last)[:300]}


_FATAL = re.compile(r"^F\d{4} |Check failed|\*\*\* SIG|Fatal Python error")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULTS),
                        help="comma-separated config names (configs/NAME.yaml) or YAML paths "
                             "(default: %(default)s)")
    parser.add_argument("--batch", default=None,
                        help="batch size: one value, or one per config (default: per-config table)")
    parser.add_argument("--seq", default=None,
                        help="sequence length: one value, or one per config (default: per config)")
    parser.add_argument("--steps", type=int, default=24,
                        help="timed steps per round (default: 24). A round starts from an idle "
                             "GPU, and JAX's first step of a round reaches the GPU ~11 ms late "
                             "(gpt2_125m, H200): that latency, which a training loop hides, is "
                             "~1.3%% of a 24-step round and ~5%% of a 6-step one (BENCHMARKS.md)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed steps first (default: 4, one pass over the 4 rotating "
                             "batches, so that no timed step is the first use of its inputs)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds of --steps steps; the fastest counts, all are "
                             "recorded (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="meshlm config override for every config, after the per-config "
                             "defaults (e.g. model.remat=none); repeatable")
    parser.add_argument("--skip-torch", action="store_true", help="time meshlm only")
    parser.add_argument("--documents", type=int, default=1,
                        help="equal packed documents per row (segment ids; the torch baseline "
                             "has none, so it needs --skip-torch; MFU still counts every row's "
                             "whole attention square)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: configs/default.yaml, batch 4 x 64, 2 steps, no torch")
    parser.add_argument("--xla-flags", default="",
                        help="added to XLA_FLAGS for the JAX runs (the steps' own XLA options "
                             "are train.xla_flags over meshlm.train.xla_options.BACKEND_DEFAULTS)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: by device kind, H100 989.4)")
    parser.add_argument("--worker-timeout", type=int, default=600,
                        help="seconds allowed per measurement (default: %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="also print each run's top kernels by device time (2 extra steps), "
                             "each described from the compiled HLO (shapes, ops, model code); "
                             "with --out, all kernels in OUT/<config>_profile.txt")
    parser.add_argument("--out", default=None,
                        help="directory for results.jsonl and table.md, rewritten after each row")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.batch, args.seq = int(args.batch), int(args.seq)
        result = (jax_worker if args.worker == "jax" else torch_worker)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.smoke:
        args.configs, args.skip_torch = SMOKE["config"], True
        args.batch, args.seq = args.batch or str(SMOKE["batch"]), args.seq or str(SMOKE["seq"])
        args.steps, args.warmup = min(args.steps, SMOKE["steps"]), min(args.warmup, SMOKE["warmup"])
    configs = [c for c in args.configs.split(",") if c]
    if args.documents < 1 or (args.documents > 1 and not args.skip_torch):
        parser.error(f"--documents must be >= 1 (got {args.documents}), and above 1 needs "
                     "--skip-torch: the torch baseline packs no documents")

    def per_config(text, key):
        if text is None:
            return [DEFAULTS.get(pathlib.Path(c.split("@")[0]).stem, {}).get(key)
                    for c in configs]
        values = [int(v) for v in text.split(",")]
        if len(values) not in (1, len(configs)):
            raise SystemExit(f"--{key}: give one value or {len(configs)} (one per config)")
        return values * len(configs) if len(values) == 1 else values

    batches, seqs = per_config(args.batch, "batch"), per_config(args.seq, "seq")
    from meshlm.config import load_config
    from meshlm.train.setup import flops_per_token

    rows, records = [], []
    out = pathlib.Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    headers = ["config", "params", "batch x seq", "meshlm tok/s", "MFU", "torch tok/s",
               "torch MFU", "ratio"]
    for entry, batch, seq in zip(configs, batches, seqs):
        config, *own = entry.split("@")
        base = load_config(config_path(config))
        batch = batch or base.data.batch_size
        seq = seq or base.data.seq_len
        overrides = [*DEFAULTS.get(pathlib.Path(config).stem, {}).get("overrides", ()), *own,
                     *args.set]
        cfg = load_config(config_path(config), [*overrides, f"data.seq_len={seq}"])
        flops = flops_per_token(cfg)
        print(f"== {entry}: batch {batch} x {seq}, overrides {overrides}", flush=True)
        # With --profile --out, the full kernel table with descriptions: one file per entry
        # (plain characters only: mamba2_130m@model.remat=none -> mamba2_130m_model.remat_none).
        profile_file = out / (re.sub(r"[^\w.-]+", "_", entry) + "_profile.txt") if (
            out and args.profile) else None
        res = {"jax": run_worker("jax", args, config, batch, seq, overrides, profile_file)}
        if not args.skip_torch and cfg.model.family in TORCH_BASELINES and _has_cuda_torch():
            res["torch"] = run_worker("torch", args, config, batch, seq, overrides)
        for kind, r in res.items():
            profile = r.pop("profile", None)
            print(f"   {kind}: {json.dumps(r)}", flush=True)
            if profile:
                print(profile, flush=True)
        kind = res["jax"].get("device_kind") or res.get("torch", {}).get("device_kind", "")
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(kind)

        def cols(r):
            if r is None:
                return ["skipped", "-"]
            if "error" in r:
                return ["error", "-"]
            tps = r["tokens_per_s"]
            return [f"{tps:,.0f}", f"{100 * tps * flops / peak:.1f}%" if peak else "n/a"]

        jax_res, torch_res = res["jax"], res.get("torch")
        ratio = "-"
        if "error" not in jax_res and torch_res and "error" not in torch_res:
            ratio = f"{jax_res['tokens_per_s'] / torch_res['tokens_per_s']:.2f}x"
        params = jax_res.get("params")
        if params and torch_res and torch_res.get("params") not in (None, params):
            print(f"   WARNING: parameter counts differ: meshlm {params:,}, torch "
                  f"{torch_res['params']:,}", flush=True)
        name = entry.replace(str(ROOT / "configs") + "/", "")
        rows.append([name, f"{params / 1e6:.0f}M" if params else "?", f"{batch} x {seq}",
                     *cols(jax_res), *cols(torch_res), ratio])
        records.append({"config": entry, "batch": batch, "seq": seq, "overrides": overrides,
                        "xla_flags": args.xla_flags, "flops_per_token": flops,
                        "peak_flops": peak, **res})
        if out:
            (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (out / "table.md").write_text(_table(headers, rows) + "\n")

    devices = sorted({r["jax"].get("device_kind", "?") for r in records})
    print(f"\nmeshlm train step vs torch.compile, device: {', '.join(devices)}; "
          f"best of {args.rounds} rounds of {args.steps} steps after {args.warmup}; "
          f"XLA_FLAGS+={args.xla_flags!r}")
    print(_table(headers, rows), flush=True)
    if any("error" in r["jax"] for r in records):
        sys.exit(1)


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
