"""Device time per kernel from a ``jax.profiler`` trace: what the GPU ran, summed by name.

``trace_device_time(fn, steps)`` runs ``fn()`` (which must block until its work is done) under a
trace and returns a ``DeviceTime``: per kernel name its time and count per step, the busy time per
GPU stream, and the span from the first kernel's start to the last one's end (span - busy = idle
device time: launch gaps, host syncs). ``DeviceTime.report()`` formats it, with the kernels also
grouped into coarse classes (attention, matmul, copy/transpose, fusion, other) by name so that two
runs whose fusions are numbered differently can still be compared.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import re
import tempfile

# Coarse kernel classes, first match wins (kernel names as CUDA reports them, lower-cased).
CLASSES = (
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention|mosaic|_fwd_kernel|_dkv_kernel|"
                             r"_dq_kernel|generated_\w*_fprop|generated_\w*_dgrad")),
    ("matmul", re.compile(r"gemm|xmma|cutlass|cublas|wgmma|nvjet|sm90_|triton_gemm|dot")),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|dynamic_update_slice|concat|pad")),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|triton")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, pattern in CLASSES:
        if pattern.search(low):
            return label
    return "other"


@dataclasses.dataclass
class DeviceTime:
    steps: int
    kernels: dict[str, list[float]]  # name -> [microseconds, count], summed over all steps
    streams: dict[str, float]  # stream (thread) name -> busy microseconds
    span_us: float
    sample_args: list[dict]  # args of a few GPU events (which keys the trace carries)

    def per_step_ms(self, us: float) -> float:
        return us / 1e3 / self.steps

    def classes(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, (us, _) in self.kernels.items():
            label = kernel_class(name)
            out[label] = out.get(label, 0.0) + us
        return out

    def to_json(self) -> dict:
        ms = self.per_step_ms
        return {
            "steps": self.steps, "span_ms": ms(self.span_us),
            "busy_ms": ms(sum(us for us, _ in self.kernels.values())),
            "streams_ms": {k: ms(v) for k, v in self.streams.items()},
            "classes_ms": {k: ms(v) for k, v in sorted(self.classes().items(), key=lambda kv: -kv[1])},
            "kernels": [[name, ms(us), n / self.steps] for name, (us, n) in
                        sorted(self.kernels.items(), key=lambda kv: -kv[1][0])],
            "sample_args": self.sample_args,
        }

    def report(self, top: int = 40) -> str:
        d = self.to_json()
        lines = [f"per step: span {d['span_ms']:.3f} ms, kernels {d['busy_ms']:.3f} ms; streams: "
                 + ", ".join(f"{k}={v:.3f}" for k, v in d["streams_ms"].items()),
                 "classes (ms/step): " + ", ".join(f"{k}={v:.3f}" for k, v in d["classes_ms"].items())]
        for name, ms, n in d["kernels"][:top]:
            lines.append(f"{ms:8.3f} ms {n:6.1f}x  [{kernel_class(name)[:9]:9}] {name[:120]}")
        return "\n".join(lines)


def summarise(trace_path: pathlib.Path, steps: int) -> DeviceTime:
    """Sum the GPU events of a perfetto trace (``perfetto_trace.json.gz``)."""
    trace = json.load(gzip.open(trace_path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    kernels: dict[str, list[float]] = {}
    streams: dict[str, float] = {}
    samples: list[dict] = []
    first, last = float("inf"), float("-inf")
    for e in events:
        if e.get("ph") != "X" or "GPU" not in procs.get(e["pid"], ""):
            continue
        dur = float(e.get("dur", 0.0))
        entry = kernels.setdefault(e["name"], [0.0, 0])
        entry[0] += dur
        entry[1] += 1
        stream = threads.get((e["pid"], e.get("tid")), "?")
        streams[stream] = streams.get(stream, 0.0) + dur
        first, last = min(first, float(e["ts"])), max(last, float(e["ts"]) + dur)
        if len(samples) < 4 and e.get("args"):
            samples.append({"name": e["name"][:80], **{k: str(v)[:120] for k, v in e["args"].items()}})
    if not kernels:
        raise RuntimeError("no GPU events in the trace; processes: " + ", ".join(sorted(procs.values())))
    return DeviceTime(steps, kernels, streams, last - first, samples)


def trace_device_time(fn, steps: int) -> DeviceTime:
    """Trace ``fn()`` (``steps`` steps' worth of work, blocking at its end) and summarise it."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        fn()
        jax.profiler.stop_trace()
        (path,) = pathlib.Path(tmp).glob("plugins/profile/*/perfetto_trace.json.gz")
        return summarise(path, steps)
