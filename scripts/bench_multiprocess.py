"""Two processes with one GPU each (NCCL across processes) beside one process driving both GPUs.

The same data-parallel train step (``meshlm.train.setup.build``, the config's mesh with
``mesh.data=-1``), the same global batch, timed the same way (``scripts/bench_train.py``'s
rounds: the fastest mean step time of ``--rounds`` rounds of ``--steps`` steps, after
``--warmup``), in one run, as one table:

    layout | processes | devices | batch x seq | tok/s | tok/s/device | step ms | MFU | loss

The two-process rows start through ``meshlm.distributed`` as ``meshlm train --distributed`` does
(loopback coordinator, ``CUDA_VISIBLE_DEVICES`` one GPU per process); each process feeds only its
rows of every batch (``Run.put``). The losses of the two layouts should agree (same batches).
NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``).

    PYTHONPATH=src:. python3 scripts/bench_multiprocess.py                # 2 GPUs, GPT-2 125M
    PYTHONPATH=src:. python3 scripts/bench_multiprocess.py --batch 64     # a global batch
    PYTHONPATH=src:. python3 scripts/bench_multiprocess.py --smoke        # CPU: 2 x 2 fake devices
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from scripts import bench_train  # after the path set-up

SMOKE = {"config": "default", "batch": 8, "seq": 64, "steps": 2, "warmup": 1, "rounds": 1,
         "devices": 2}


def worker(args) -> dict:
    """Time the data-parallel step in this process (one of ``--num-processes``)."""
    from meshlm import distributed

    if args.num_processes > 1:
        distributed.initialize(distributed.Cluster(args.coordinator, args.num_processes,
                                                   args.process_id), init_timeout=300)
    import jax
    import numpy as np

    from meshlm.config import load_config
    from meshlm.data import process_rows
    from meshlm.train.setup import build

    overrides = [*bench_train.DEFAULTS.get(args.config, {}).get("overrides", ()), *args.set,
                 "mesh.data=-1", f"data.batch_size={args.batch}", f"data.seq_len={args.seq}"]
    cfg = load_config(bench_train.config_path(args.config), overrides)
    t0 = time.perf_counter()
    run = build(cfg)
    state = run.init_state()
    rows = process_rows(args.batch, jax.process_index(), jax.process_count())
    rng = np.random.default_rng(0)  # the same global batches in every process and layout
    batches = [run.put({k: v[rows] for k, v in
                        bench_train.random_batch(cfg, rng, args.batch, args.seq).items()})
               for _ in range(4)]
    state, metrics = run.train_step(state, batches[0])
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        state, metrics = run.train_step(state, batches[i % 4])
    jax.block_until_ready((state, metrics))
    round_s = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = run.train_step(state, batches[i % 4])
        jax.block_until_ready((state, metrics))
        round_s.append((time.perf_counter() - t0) / args.steps)
    step_s = min(round_s)
    tps = args.batch * args.seq / step_s
    peak = bench_train.peak_flops(jax.devices()[0].device_kind)
    return {
        "processes": jax.process_count(), "devices": jax.device_count(), "step_s": step_s,
        "round_s": round_s, "tokens_per_s": tps, "compile_s": compile_s,
        "mfu": None if peak is None else tps * run.flops_per_token / (jax.device_count() * peak),
        "first_loss": first_loss, "last_loss": float(metrics["loss"]),
        "device_kind": jax.devices()[0].device_kind, "versions": f"jax {jax.__version__}",
    }


def launch(args, processes: int, devices: int) -> dict:
    """One layout: ``processes`` children sharing ``devices`` devices equally; process 0's
    result (or ``{"error": ...}``)."""
    import portpicker

    port = portpicker.pick_unused_port()
    per = devices // processes
    with contextlib.ExitStack() as stack:
        children = []
        for i in range(processes):
            # A file, not a pipe: a child blocked on a full pipe would stall the collectives.
            log = stack.enter_context(tempfile.TemporaryFile("w+"))
            children.append((subprocess.Popen(_command(args, processes, i, port),
                                              env=_environment(args, i, per), stdout=log,
                                              stderr=subprocess.STDOUT, text=True), log))
        deadline = time.monotonic() + args.worker_timeout
        for child, _ in children:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                for c, _ in children:
                    c.kill()
                return {"error": f"timed out after {args.worker_timeout} s"}
        child, log = children[0]
        log.seek(0)
        out = log.read()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join(out.strip().splitlines()[-20:])
    print(f"[{processes} process(es) failed, exit {child.returncode}]\n{tail}", flush=True)
    return {"error": (out.strip().splitlines() or ["no output"])[-1][:160]}


def _command(args, processes: int, index: int, port: int) -> list[str]:
    return [sys.executable, __file__, "--worker", "--config", args.config,
            "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--rounds", str(args.rounds),
            "--num-processes", str(processes), "--process-id", str(index),
            "--coordinator", f"127.0.0.1:{port}", *(f"--set={s}" for s in args.set)]


def _environment(args, index: int, per: int) -> dict[str, str]:
    """Process ``index``'s devices: GPUs ``index * per ...`` (or ``per`` fake CPU devices)."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    if args.smoke:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={per}")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * per + d) for d in range(per))
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    return env


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2_125m", help="a config name or YAML path")
    parser.add_argument("--devices", type=int, default=2, help="GPUs to use (default 2)")
    parser.add_argument("--batch", type=int, default=32,
                        help="global batch (default 32: bench_train's 16 rows per GPU)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every row (repeatable)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: the tiny default config on fake devices")
    parser.add_argument("--worker-timeout", type=int, default=900)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.worker:
        result = worker(args)
        if args.process_id == 0:
            print("RESULT " + json.dumps(result), flush=True)
        sys.stdout.flush()
        os._exit(0)  # past JAX's shutdown barrier: the other process may already be gone

    layouts = [(f"{args.devices} processes x 1 device", args.devices),
               (f"1 process x {args.devices} devices", 1)]
    rows = []
    for name, processes in layouts:
        r = launch(args, processes, args.devices)
        if "error" in r:
            rows.append([name, str(processes), str(args.devices), f"{args.batch} x {args.seq}",
                         r["error"], "", "", "", ""])
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        rows.append([name, str(r["processes"]), str(r["devices"]), f"{args.batch} x {args.seq}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / r['devices']:,.0f}",
                     f"{1e3 * r['step_s']:.1f}", mfu,
                     f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"])
        print(json.dumps({"layout": name, **r}), flush=True)
    headers = ["layout", "processes", "devices", "batch x seq", "tok/s", "tok/s/device",
               "step ms", "MFU", "loss (first -> last)"]
    print(f"\n{args.config}, {args.steps} steps x {args.rounds} rounds after {args.warmup} "
          "warm-up steps")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
