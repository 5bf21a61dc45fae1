"""Flash attention on the GPU: TFLOP/s of the Pallas lowerings beside cuDNN and XLA, in one run.

    PYTHONPATH=src:. python3 scripts/bench_attention.py [--impls triton,cudnn,xla] [--check]

Rows are bf16, head_dim 128, 16 query heads and 16k tokens per batch (seq 1k/4k/16k, causal and
not), plus a GQA row (8 query heads per kv head) and a sliding-window row. FLOPs count only the
visible (query, key) pairs: 4 * batch * heads * head_dim * pairs for the forward (causal halves
the square), and 3.5x that for forward + backward (two matmuls forward, five backward). Times are
the kernels' device time in a profiler trace (``--timer wall``: the median wall time of a
synchronised call, the older tables' measure).

``cudnn`` is ``flash_attention(implementation="cudnn")``; ``xla`` is jax's own XLA attention
(``jax.nn.dot_product_attention``), not the float32 reference. ``--check`` compares every
lowering with cuDNN on the timed shapes and with the float32 reference on small shapes with the
features cuDNN lacks. ``--sweep [triton|mosaic_gpu]`` times that lowering's tile
configurations at the largest sequence (``--head-dim``; causal with ``--causal yes``) and prints
the best, to be copied into its ``DEFAULT_TILES``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import device_description, device_ms, print_table, time_ms

from pallas_kernels.flash_attention import api, flash_attention, flash_attention_qkv
from pallas_kernels.flash_attention import common as fa_common
from pallas_kernels.flash_attention import cudnn as fa_cudnn
from pallas_kernels.flash_attention import mosaic_gpu as fa_mosaic
from pallas_kernels.flash_attention import triton as fa_triton
from pallas_kernels.flash_attention.common import AttentionSpec, Call

PALLAS = ("triton", "mosaic_gpu")
BASELINES = ("cudnn", "cudnn_masked", "xla")
# Implementations run with a module switch set while the call is traced, for rows of packed
# documents (``--documents``): cudnn_masked, cuDNN with its packed-rows layout off (an explicit
# mask; "cudnn" runs them on the packed layout); mosaic_gpu_all_blocks / triton_all_blocks, those
# kernels walking every block of a row (``common.SKIP_DOCUMENTS`` off), masking other documents.
# Any row: mosaic_gpu_dq_kernel, dQ by its own kernel (``mosaic_gpu.DQ_IN_DKV`` off).
SWITCHED = {"cudnn_masked": ("cudnn", fa_cudnn, "PACKED_ROWS", False),
            "mosaic_gpu_all_blocks": ("mosaic_gpu", fa_common, "SKIP_DOCUMENTS", False),
            "mosaic_gpu_dq_kernel": ("mosaic_gpu", fa_mosaic, "DQ_IN_DKV", False),
            "triton_all_blocks": ("triton", fa_common, "SKIP_DOCUMENTS", False)}


def lowering(impl: str) -> str:
    """The implementation ``impl`` runs (a ``SWITCHED`` row's, or its own name)."""
    return SWITCHED[impl][0] if impl in SWITCHED else impl


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    batch: int
    seq: int
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 128
    causal: bool = False
    window: int | None = None
    alibi: bool = False  # the Pallas lowerings only: cuDNN and XLA rows are timed without it
    documents: int = 1  # equal packed documents per row (segment ids), each attending to itself
    ids: bool = False  # segment ids even for one document per row, as a training batch has
    packed: bool = False  # Pallas rows: flash_attention_qkv on one (batch, len, heads, 3, dim)

    def pairs(self) -> int:
        """Visible (query, key) pairs per batch element and head."""
        n = self.seq // self.documents
        if self.window is not None:
            w = min(self.window, n)
            return self.documents * (w * n - w * (w - 1) // 2)
        return self.documents * (n * n // 2 if self.causal else n * n)

    def segment_ids(self):
        """``(batch, seq)`` ids of the row's documents, None for one document without ``ids``."""
        if self.documents == 1 and not self.ids:
            return None
        ids = jnp.arange(self.seq, dtype=jnp.int32) // (self.seq // self.documents)
        return jnp.broadcast_to(ids, (self.batch, self.seq))

    def fwd_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.head_dim * self.pairs()


def make_rows(seqs, tokens, causal_modes, extra: bool, head_dim=128, alibi=False,
              documents=1, ids=False, packed=False) -> list[Row]:
    rows = []
    kw = dict(head_dim=head_dim, alibi=alibi, documents=documents, ids=ids, packed=packed)
    docs = (f" {documents} docs" if documents > 1 else " ids" if ids else "") + (
        " qkv" if packed else "")
    for seq in seqs:
        for causal in causal_modes:
            rows.append(Row(f"L={seq}{' causal' if causal else ''}{docs}", tokens // seq, seq,
                            causal=causal, **kw))
    if extra:
        seq = max(seqs)
        gqa = {**kw, "packed": False}  # q/k/v of one shape only
        rows.append(Row(f"L={seq} causal GQA 16:2{docs.removesuffix(' qkv')}", tokens // seq,
                        seq, kv_heads=2, causal=True, **gqa))
        rows.append(Row(f"L={seq} window 2048{docs}", tokens // seq, seq, causal=True,
                        window=2048, **kw))
    return rows


INTERPRET = False  # --interpret: Pallas in interpret mode, to smoke-test this script on a CPU


def attention_fn(impl: str, row: Row):
    ids = row.segment_ids()
    if impl == "xla":
        # Query i sees keys i-w+1..i: w-1 to the left, none to the right.
        window = None if row.window is None else (row.window - 1, 0)
        mask = None if ids is None else ids[:, None, :, None] == ids[:, None, None, :]
        return functools.partial(
            jax.nn.dot_product_attention, is_causal=row.causal, local_window_size=window,
            mask=mask, implementation="xla",
        )
    name = lowering(impl)
    # ALiBi's geometric slopes 2^(-8i/heads) (Press et al. 2022), for the lowerings that take it.
    slopes = 2.0 ** (-8.0 * jnp.arange(1, row.heads + 1) / row.heads)
    fn = functools.partial(
        flash_attention, causal=row.causal, sliding_window=row.window, segment_ids=ids,
        implementation=name, interpret=INTERPRET and name in PALLAS,
        alibi_slopes=slopes if row.alibi and name in PALLAS else None,
    )
    return fn


@contextlib.contextmanager
def switched(impl: str):
    """``impl``'s module switch (``SWITCHED``) set while its calls are traced and run: around the
    whole jitted call, as a custom VJP's backward is traced after its forward returns."""
    if impl not in SWITCHED:
        yield
        return
    _, module, flag, value = SWITCHED[impl]
    before = getattr(module, flag)
    setattr(module, flag, value)
    try:
        yield
    finally:
        setattr(module, flag, before)


def inputs(row: Row, seed: int, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    q_shape = (row.batch, row.seq, row.heads, row.head_dim)
    kv_shape = (row.batch, row.seq, row.kv_heads, row.head_dim)
    q = jax.random.normal(keys[0], q_shape, dtype)
    k = jax.random.normal(keys[1], kv_shape, dtype)
    v = jax.random.normal(keys[2], kv_shape, dtype)
    d_out = jax.random.normal(keys[3], q_shape, dtype)
    return q, k, v, d_out


def fwd_bwd(fn):
    return jax.jit(lambda q, k, v, d_out: jax.vjp(fn, q, k, v)[1](d_out))


def timed_calls(impl: str, row: Row, q, k, v, d_out):
    """``(mode, jitted call, its arguments, FLOPs multiple)`` for the forward and forward +
    backward of ``impl`` on ``row``; a packed row's Pallas calls take q, k and v as one array
    (stacked outside the timing), as a fused q/k/v projection's output."""
    fn = attention_fn(impl, row)
    if not (row.packed and lowering(impl) in PALLAS):
        return [("fwd", jax.jit(fn), (q, k, v), 1.0),
                ("fwd+bwd", fwd_bwd(fn), (q, k, v, d_out), 3.5)]
    packed = functools.partial(flash_attention_qkv, **fn.keywords)
    qkv = jnp.stack([q, k, v], axis=3)
    return [("fwd", jax.jit(packed), (qkv,), 1.0),
            ("fwd+bwd", jax.jit(lambda x, d: jax.vjp(packed, x)[1](d)), (qkv, d_out), 3.5)]


def short_error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:90]}" if str(e) else type(e).__name__


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def available_pallas(names) -> list[str]:
    """Lowerings that exist and run on this backend (the others are reported, not timed)."""
    out = []
    for name in names:
        if reason := api.DISPATCH.unavailable(name, interpret=INTERPRET):
            print(f"skipping {name}: {reason}", flush=True)
        else:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- timing


def bench(rows, impls, iters, results, timer=device_ms):
    """One table row per (row, impl): fwd and fwd+bwd ms by ``timer`` and their TFLOP/s."""
    table = []
    for row in rows:
        q, k, v, d_out = inputs(row, seed=len(table))
        flops = row.fwd_flops()
        for impl in impls:
            cells = []
            for mode, call, args, mult in timed_calls(impl, row, q, k, v, d_out):
                try:
                    with switched(impl):
                        ms = timer(call, *args, iters=iters)
                    cells += [ms, mult * flops / ms / 1e9]
                except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
                    cells += [short_error(e), "-"]
                    if lowering(impl) in PALLAS:
                        traceback.print_exc()
            table.append([row.name, impl, *cells])
            results.append(dict(row=dataclasses.asdict(row), impl=impl, cells=cells))
            print(table[-1], flush=True)
    return table


TIMERS = {"device": device_ms, "kernels": functools.partial(device_ms, show=True), "wall": time_ms}


# ----------------------------------------------------------------------------- checks


def check_vs_baseline(rows, impls, baseline):
    """Relative L2 errors of out, dq, dk, dv against a baseline on the timed shapes (bf16)."""
    table = []
    for row in rows:
        q, k, v, d_out = inputs(row, seed=100 + len(table))
        fn = attention_fn(baseline, row)
        ref = (jax.jit(fn)(q, k, v), *fwd_bwd(fn)(q, k, v, d_out))
        for impl in impls:
            try:
                fn = attention_fn(impl, row)
                with switched(impl):
                    got = (jax.jit(fn)(q, k, v), *fwd_bwd(fn)(q, k, v, d_out))
                errs = [rel_err(g, r) for g, r in zip(got, ref)]
                ok = all(e < 2e-2 for e in errs)
                table.append([row.name, impl, *errs, "ok" if ok else "FAIL"])
            except Exception as e:  # noqa: BLE001
                table.append([row.name, impl, short_error(e), "-", "-", "-", "FAIL"])
            print(table[-1], flush=True)
    return table


FEATURES = {
    "causal GQA segments": dict(causal=True, kv_heads=2, segments=True),
    "window + soft cap": dict(causal=True, sliding_window=100, logits_soft_cap=20.0),
    "ALiBi causal": dict(causal=True, alibi=True),
    "ALiBi soft cap MQA": dict(kv_heads=1, alibi=True, logits_soft_cap=30.0),
    "decode q_offset": dict(causal=True, q_len=7, q_offset=100),
    "q_len != kv_len": dict(q_len=33),
    "head_dim 64": dict(head_dim=64, causal=True),
    "head_dim 256": dict(head_dim=256, causal=True),
    "float16": dict(dtype=jnp.float16, causal=True),
    "float32": dict(dtype=jnp.float32, causal=True),
}
FEATURE_TOL = {jnp.bfloat16: 1.5e-2, jnp.float16: 4e-3, jnp.float32: 1e-4}


def check_features(impls, kv_len):
    """Relative L2 errors against the float32 reference on small shapes with every feature."""
    table = []
    for name, cfg in FEATURES.items():
        cfg = dict(cfg)
        dtype = cfg.pop("dtype", jnp.bfloat16)
        head_dim = cfg.pop("head_dim", 128)
        kv_heads = cfg.pop("kv_heads", 4)
        q_len = min(cfg.pop("q_len", kv_len), kv_len)
        heads, batch = 4, 2
        keys = jax.random.split(jax.random.key(len(table)), 4)
        q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
        k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
        v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
        d_out = jax.random.normal(keys[3], q.shape, dtype)
        if cfg.pop("segments", False):
            ids = (jnp.arange(kv_len)[None, :] >= jnp.array([[kv_len // 3], [kv_len // 2]]))
            ids = ids.astype(jnp.int32)
            cfg["segment_ids"] = ids
        if cfg.pop("alibi", False):
            cfg["alibi_slopes"] = 2.0 ** -jnp.arange(1, heads + 1, dtype=jnp.float32)
        up = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
        ref_fn = functools.partial(flash_attention, implementation="xla", **cfg)
        ref = (jax.jit(ref_fn)(*up[:3]), *fwd_bwd(ref_fn)(*up))
        for impl in impls:
            try:
                fn = functools.partial(
                    flash_attention, implementation=impl, interpret=INTERPRET, **cfg)
                got = (jax.jit(fn)(q, k, v), *fwd_bwd(fn)(q, k, v, d_out))
                errs = [rel_err(g, r) for g, r in zip(got, ref)]
                ok = all(e < FEATURE_TOL[dtype] for e in errs) and all(
                    np.isfinite(np.asarray(g, np.float32)).all() for g in got)
                table.append([name, impl, *errs, "ok" if ok else "FAIL"])
            except Exception as e:  # noqa: BLE001
                table.append([name, impl, short_error(e), "-", "-", "-", "FAIL"])
            print(table[-1], flush=True)
    return table


# ----------------------------------------------------------------------------- tuning sweep


def _sweep_candidates(impl: str):
    """``{kernel: [tiles of that kernel]}`` to time for lowering ``impl`` and how each kernel's
    tiles print as table columns (``block_q, block_k, warps, stages`` for Triton; ``owned,
    streamed, stages`` for Mosaic GPU, whose warps are fixed)."""
    if impl == "triton":
        KT = fa_triton.KernelTiles
        grid = [(w, s) for w in (4, 8) for s in (2, 3, 4)]
        return {
            "fwd": [KT(bq, bk, w, s) for bq, bk in ((128, 64), (128, 128), (64, 64), (64, 128))
                    for w, s in grid],
            "dkv": [KT(bq, bk, w, s)
                    for bq, bk in ((64, 128), (32, 128), (64, 64), (128, 128), (32, 64))
                    for w, s in grid if s < 4],
            "dq": [KT(bq, bk, w, s)
                   for bq, bk in ((128, 64), (64, 64), (128, 32), (64, 32), (128, 128))
                   for w, s in grid if s < 4],
        }, lambda t: [t.block_q, t.block_k, t.num_warps, t.num_stages]
    KT = fa_mosaic.KernelTiles
    sizes = [(o, st) for o in (64, 128) for st in (64, 128, 192, 256)]
    return {kind: [KT(o, st, stages) for o, st in sizes for stages in (1, 2, 3, 4)]
            for kind in ("fwd", "dkv", "dq")}, lambda t: [t.owned, t.streamed, "-", t.stages]


def sweep(impl: str, row: Row, deadline: float, iters: int):
    """Times tile configurations of lowering ``impl`` (triton or mosaic_gpu) for the forward,
    dK/dV and dQ kernels of ``row``, one kernel's tiles at a time (the others at their default;
    dQ beside the best dK/dV), by device time (``device_ms``): wall time at these sizes is mostly
    dispatch, and its best tiles were no faster in a train step (BENCHMARKS.md, session 16).
    Tiles the lowering's ``supports`` rejects are skipped."""
    module = {"triton": fa_triton, "mosaic_gpu": fa_mosaic}[impl]
    q, k, v, d_out = inputs(row, seed=7)
    spec = AttentionSpec(causal=row.causal, scale=row.head_dim ** -0.5)
    call = Call(q.shape, k.shape, q.dtype, spec)
    default = module.default_tiles(call)
    candidates, columns = _sweep_candidates(impl)
    common = dict(spec=spec, interpret=INTERPRET)
    out, lse = jax.jit(lambda q, k, v: module.forward(q, k, v, None, None, None, **common,
                                                      tiles=default))(q, k, v)
    flops = row.fwd_flops()
    found = {}

    def run(kind, make, args):
        timings = []
        for tiles in candidates[kind]:
            whole = dataclasses.replace(default, **{kind: tiles})
            if (why := module.supports(call, whole)) is not None:
                print(f"sweep {kind} {tiles}: skipped: {why}", flush=True)
                continue
            if time.monotonic() > deadline:
                print(f"sweep {kind}: out of time", flush=True)
                break
            try:
                ms = device_ms(jax.jit(make(whole)), *args, iters=iters)
            except Exception as e:  # noqa: BLE001 - e.g. a tile that overflows shared memory
                print(f"sweep {kind} {tiles}: {short_error(e)}", flush=True)
                continue
            timings.append((ms, tiles))
            print(f"sweep {kind} {tiles}: {ms:.3f} ms", flush=True)
        timings.sort(key=lambda t: t[0])
        found[kind] = timings[:3]
        return timings[0][1] if timings else None

    run("fwd", lambda t: lambda q, k, v: module.forward(q, k, v, None, None, None, **common,
                                                        tiles=t), (q, k, v))

    def bwd(tiles):
        return lambda q, k, v, out, lse, d_out: module.backward(
            q, k, v, None, None, None, out, lse, d_out, **common, tiles=tiles)

    bwd_args = (q, k, v, out, lse, d_out)
    best_dkv = run("dkv", bwd, bwd_args) or default.dkv
    default = dataclasses.replace(default, dkv=best_dkv)
    run("dq", bwd, bwd_args)
    rows = []
    for kind, timings in found.items():
        for ms, tiles in timings:
            mult = 1.0 if kind == "fwd" else 2.5  # the backward alone: 5 of the 7 matmuls
            rows.append([kind, *columns(tiles), ms, mult * flops / ms / 1e9])
    return rows


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="triton,mosaic_gpu,cudnn,xla",
                        help="comma-separated among triton, mosaic_gpu, cudnn, xla")
    parser.add_argument("--seqs", default="1024,4096,16384", help="comma-separated lengths")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--no-extra", action="store_true", help="skip the GQA and window rows")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--documents", type=int, default=1,
                        help="equal packed documents per row (segment ids) in the timed rows")
    parser.add_argument("--ids", action="store_true",
                        help="segment ids in every row, also with one document per row (as "
                             "the train step's batches carry them)")
    parser.add_argument("--qkv", action="store_true",
                        help="the Pallas rows call flash_attention_qkv on q, k and v stacked "
                             "into one (batch, len, heads, 3, head_dim) array, as GPT's "
                             "model.fuse_qkv does (the GQA row and the baselines: three arrays)")
    parser.add_argument("--alibi", action="store_true",
                        help="ALiBi in the Pallas rows (cuDNN and XLA rows run without it)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--timer", choices=tuple(TIMERS), default="device",
                        help="device: the kernels' summed time in a profiler trace (default; "
                             "wall time of a sub-millisecond call is mostly dispatch, and moved "
                             "25%% between identical kernels in session 21); kernels: the same, "
                             "each kernel's share printed under its cell (a --ids row's XLA "
                             "document spans apart from the attention kernels); wall: the median "
                             "wall time of a synchronised call, as the tables before session 22")
    parser.add_argument("--check", action="store_true", help="check numerics before timing")
    parser.add_argument("--check-against", choices=BASELINES, default="cudnn")
    parser.add_argument("--feature-len", type=int, default=1007,
                        help="kv length of the feature checks (>= 107 for the decode case)")
    parser.add_argument("--interpret", action="store_true",
                        help="Pallas in interpret mode: a CPU smoke test of this script")
    parser.add_argument("--no-bench", action="store_true", help="skip the timing table")
    parser.add_argument("--sweep", nargs="?", const="triton", choices=PALLAS, default=None,
                        help="tune that lowering's tiles (default triton) at the largest seq, "
                             "causal as --causal yes makes it")
    parser.add_argument("--sweep-seconds", type=float, default=150.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="where JSON goes")
    args = parser.parse_args()
    global INTERPRET
    INTERPRET = args.interpret

    impls = args.impls.split(",")
    known = PALLAS + BASELINES + tuple(SWITCHED)
    if unknown := set(impls) - set(known):
        parser.error(f"unknown --impls {sorted(unknown)}; choose among {known}")
    if args.alibi and args.check:
        parser.error("--check compares with cuDNN or XLA, which run without ALiBi: check without "
                     "--alibi (its float32-reference cases include ALiBi)")
    pallas = available_pallas([i for i in impls if i in PALLAS])
    switched = [i for i in impls if i in SWITCHED and (
        lowering(i) not in PALLAS or available_pallas([lowering(i)]))]
    impls = pallas + switched + [i for i in impls if i in BASELINES and i not in SWITCHED]
    seqs = [int(s) for s in args.seqs.split(",")]
    if args.documents < 1 or any(s % args.documents for s in seqs):
        parser.error(f"--documents ({args.documents}) must be >= 1 and divide every --seqs "
                     f"length ({seqs})")
    causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    rows = make_rows(seqs, args.tokens, causal_modes, not args.no_extra, args.head_dim,
                     args.alibi, args.documents, args.ids, args.qkv)
    print(f"# {device_description()}", flush=True)
    report = {"device": device_description()}

    if args.check:
        report["check_baseline"] = check_vs_baseline(rows, pallas, args.check_against)
        report["check_features"] = check_features(pallas, args.feature_len)
    if args.sweep in pallas:
        seq = max(seqs)
        row = Row(f"L={seq}", args.tokens // seq, seq, head_dim=args.head_dim,
                  causal=args.causal == "yes")
        report["sweep"] = sweep(args.sweep, row, time.monotonic() + args.sweep_seconds,
                                max(5, args.iters // 2))
    if not args.no_bench:
        results = []
        report["bench"] = bench(rows, impls, args.iters, results,
                                TIMERS[args.timer])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)

    print(f"\n## {device_description()}")
    if "check_baseline" in report:
        print(f"\nrelative L2 error vs {args.check_against} (bf16, timed shapes)")
        print_table(["row", "impl", "out", "dq", "dk", "dv", ""], report["check_baseline"])
        print("\nrelative L2 error vs float32 reference (small shapes)")
        print_table(["case", "impl", "out", "dq", "dk", "dv", ""], report["check_features"])
    if "sweep" in report:
        causal = " causal" if args.causal == "yes" else " non-causal"
        print(f"\n{args.sweep} sweep at L={max(seqs)}{causal}, head_dim {args.head_dim} (best 3 "
              "per kernel; Mosaic GPU: block_q/block_k are owned/streamed rows, fixed warps)")
        print_table(["kernel", "block_q", "block_k", "warps", "stages", "ms", "TFLOP/s"],
                    report["sweep"])
    if "bench" in report:
        alibi = ", ALiBi (Pallas rows)" if args.alibi else ""
        print(f"\nbf16, head_dim {args.head_dim}, 16 heads{alibi}, TFLOP/s (fwd+bwd counted as "
              "3.5x fwd)")
        print_table(["row", "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"],
                    report["bench"])


if __name__ == "__main__":
    main()
