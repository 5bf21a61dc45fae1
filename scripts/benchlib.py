"""Shared timing and table printing for the GPU benchmark scripts (scripts/bench_*.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax


def time_ms(fn: Callable, *args, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds, synchronising on its outputs.

    ``fn`` should already be jitted; warm-up calls keep compilation out of the numbers.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def kernel_ms(fn: Callable, *args, iters: int = 10) -> tuple[float, list[tuple[str, float]]]:
    """Device time of one ``fn(*args)`` call from a profiler trace of ``iters`` calls: the sum
    over its kernels, and each kernel's share (largest first). Unlike ``time_ms`` it leaves out
    dispatch and synchronisation, which a 0.1 ms kernel's wall time mostly is."""
    from profile_trace import trace_device_time  # scripts/ is on sys.path for every bench

    def run():
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)

    trace = trace_device_time(run, iters)
    kernels = sorted(((name, trace.per_step_ms(us)) for name, (us, _) in trace.kernels.items()),
                     key=lambda kv: -kv[1])
    return sum(ms for _, ms in kernels), kernels


def device_ms(fn: Callable, *args, iters: int = 10, show: bool = False) -> float:
    """``kernel_ms`` after one untraced call (compilation and its autotuning stay out of the
    trace) on a GPU, each kernel's share printed with ``show``; ``time_ms`` elsewhere (a CPU
    smoke run)."""
    if jax.default_backend() != "gpu":
        return time_ms(fn, *args, iters=iters)
    jax.block_until_ready(fn(*args))
    total, kernels = kernel_ms(fn, *args, iters=iters)
    if show:
        print("    " + ", ".join(f"{name} {ms:.3f}" for name, ms in kernels), flush=True)
    return total


def variant_impls(variants: Sequence[str], tiles_cls) -> dict[str, dict]:
    """``{"xla": ...}`` plus, on a GPU, ``{"triton <v>": ...}`` per ``--variants`` entry, each the
    keyword arguments of an op call: ``"default"`` (the lowering's tiles) or ``tiles_cls``'s
    fields as ``"AxBxC..."``."""
    impls = {"xla": dict(implementation="xla")}
    if jax.default_backend() == "gpu":
        for v in variants:
            tiles = None if v == "default" else tiles_cls(*map(int, v.split("x")))
            impls[f"triton {v}"] = dict(implementation="triton", tiles=tiles)
    return impls


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Print (and return) a Markdown table, ready to paste into BENCHMARKS.md."""

    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform}), jax {jax.__version__}"
