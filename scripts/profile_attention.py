"""The attention op of a train step alone, wired as the model wires it, per implementation.

Times ``meshlm.layers.attention.attend`` (forward, and forward + backward through its custom VJP)
at one model's attention shape, with the all-ones segment ids a train step passes and without
them, and lists the device kernels of each from a ``jax.profiler`` trace: the attention kernels
and everything XLA runs around them (masks, transposes, the backward's ``delta``). That splits
"the kernel is slow at this shape" from "the wiring around it costs time". ``--sweep`` also times
Mosaic GPU tile sizes at the model shape.

    PYTHONPATH=src:. python3 scripts/profile_attention.py --out $OUT          # GPU
    PYTHONPATH=src:. python3 scripts/profile_attention.py --smoke             # CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp

from meshlm.layers.attention import attend
from pallas_kernels.flash_attention.mosaic_gpu import KernelTiles, Tiles
from scripts.profile_trace import trace_device_time


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    segments: bool
    tiles: Tiles | None = None  # Mosaic-GPU tiles (None: the lowering's default)

    @property
    def label(self) -> str:
        tiles = "" if self.tiles is None else " " + ",".join(
            f"{k}={t.owned}/{t.streamed}/{t.stages}" for k, t in vars(self.tiles).items())
        seg = "seg" if self.segments else "noseg"
        return f"{self.impl} B{self.batch} L{self.seq} H{self.heads} D{self.head_dim} {seg}{tiles}"

    def fwd_flops(self) -> float:  # causal: half the (query, key) pairs
        return 4.0 * self.batch * self.heads * self.head_dim * self.seq * self.seq / 2


def functions(case: Case):
    if case.tiles is None:
        impl_fn = attend
    else:  # tiles for a Pallas lowering: call flash_attention directly, as attend would
        from pallas_kernels.flash_attention import flash_attention

        def impl_fn(q, k, v, *, q_segment_ids, kv_segment_ids, causal, implementation):
            return flash_attention(q, k, v, causal=causal, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids, implementation=implementation,
                                   tiles=case.tiles)

    def attn(q, k, v, seg):
        return impl_fn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                       implementation=case.impl)

    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(lambda q, k, v, seg, d: jax.vjp(lambda *a: attn(*a, seg), q, k, v)[1](d))
    return fwd, fwd_bwd


def inputs(case: Case, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    q, k, v, d = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    seg = jnp.ones((case.batch, case.seq), jnp.int32) if case.segments else None
    return q, k, v, seg, d


def measure(case: Case, iters: int, profile: bool) -> dict:
    q, k, v, seg, d = inputs(case)
    fwd, fwd_bwd = functions(case)
    result = {"case": case.label}
    for mode, fn, args, mult in (("fwd", fwd, (q, k, v, seg), 1.0),
                                 ("fwd+bwd", fwd_bwd, (q, k, v, seg, d), 3.5)):
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            jax.block_until_ready(compiled(*args))

        def run(n=iters):
            for _ in range(n):
                out = compiled(*args)
            jax.block_until_ready(out)

        t0 = time.perf_counter()
        run()
        ms = (time.perf_counter() - t0) * 1e3 / iters
        entry = {"ms": ms, "tflops": mult * case.fwd_flops() / ms / 1e9, "compile_s": compile_s}
        if profile:
            try:
                entry["device"] = trace_device_time(lambda: run(3), 3).to_json()
            except RuntimeError as e:
                entry["device"] = str(e)
        result[mode] = entry
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="cudnn,mosaic_gpu,triton")
    parser.add_argument("--shape", default="16,1024,12,64", help="batch,seq,heads,head_dim")
    parser.add_argument("--also-d128", action="store_true",
                        help="also the same FLOPs at head_dim 128 (half the heads)")
    parser.add_argument("--sweep", action="store_true", help="Mosaic GPU tiles at the shape")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=300.0)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shape, impl xla")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    b, s, h, dh = (int(x) for x in args.shape.split(","))
    impls = args.impls.split(",")
    if args.smoke:
        impls, (b, s, h, dh), args.iters = ["xla"], (2, 64, 2, 64), 2
    cases = [Case(i, b, s, h, dh, seg) for i in impls for seg in (True, False)]
    if args.also_d128:
        cases += [Case(i, b, s, h // 2, 2 * dh, seg) for i in impls if i != "triton"
                  for seg in (True, False)]
    if args.sweep and "mosaic_gpu" in impls:
        k = KernelTiles  # (owned, streamed, stages) around the d64 defaults
        for fwd, dkv in (((64, 64, 3), (64, 64, 2)), ((64, 256, 2), (64, 64, 2)),
                         ((64, 128, 3), (128, 64, 2)), ((64, 128, 3), (64, 128, 2)),
                         ((64, 128, 3), (128, 128, 2))):
            tiles = Tiles(fwd=k(*fwd), dkv=k(*dkv), dq=k(*fwd))
            cases.append(Case("mosaic_gpu", b, s, h, dh, True, tiles))

    deadline = time.monotonic() + args.deadline_s
    results = []
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    for case in cases:
        if time.monotonic() > deadline:
            print(f"{case.label}: skipped (deadline)", flush=True)
            continue
        try:
            r = measure(case, args.iters, profile=case.tiles is None)
        except Exception as e:  # noqa: BLE001 - a failing case is reported, not fatal
            traceback.print_exc()
            r = {"case": case.label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        results.append(r)
        line = r["case"]
        for mode in ("fwd", "fwd+bwd"):
            if mode in r:
                e = r[mode]
                line += (f" | {mode} {e['ms']:.3f} ms {e['tflops']:.0f} TFLOP/s "
                         f"(compile {e['compile_s']:.1f} s)")
        print(line if "error" not in r else f"{line}: {r['error']}", flush=True)
        for mode in ("fwd", "fwd+bwd"):
            dev = r.get(mode, {}).get("device")
            if isinstance(dev, dict):
                print(f"  {mode} device: span {dev['span_ms']:.3f} busy {dev['busy_ms']:.3f} ms; "
                      + "; ".join(f"{n[:70]} {ms:.3f}ms x{c:.0f}" for n, ms, c in dev["kernels"][:8]),
                      flush=True)
        with open(os.path.join(args.out, "profile_attention.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
