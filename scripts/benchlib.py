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
