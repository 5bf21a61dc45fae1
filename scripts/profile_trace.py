"""Device time per kernel from a ``jax.profiler`` trace: what the GPU ran, summed by name.

``trace_device_time(fn, steps)`` runs ``fn()`` (which must block until its work is done) under a
trace and returns a ``DeviceTime``: per kernel name its time and count per step, the busy time per
GPU stream, and the span from the first kernel's start to the last one's end (span - busy = idle
device time: launch gaps, host syncs). ``DeviceTime.report()`` formats it, with the kernels also
grouped into coarse classes (attention, matmul, copy/transpose, fusion, other) by name so that two
runs whose fusions are numbered differently can still be compared. ``hlo_kernel_map(compiled
.as_text())`` says which model code each kernel is (its shapes, fused ops and jax op names with
their source lines); ``report(top, hlo_map)`` prints that under each kernel.
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
    hlo_ops: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> its "hlo_op" arg

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
            "classes_ms": {k: ms(v) for k, v in
                           sorted(self.classes().items(), key=lambda kv: -kv[1])},
            "kernels": [[name, ms(us), n / self.steps] for name, (us, n) in
                        sorted(self.kernels.items(), key=lambda kv: -kv[1][0])],
            "sample_args": self.sample_args,
        }

    def report(self, top: int = 40, hlo_map: dict[str, str] | None = None,
               width: int | None = 150, step_ms: float | None = None) -> str:
        """The per-step summary and the ``top`` kernels by time; with ``hlo_map``
        (``hlo_kernel_map``) each kernel's description from the compiled HLO under its line,
        cut at ``width`` characters (None: whole). ``step_ms``, the step's time measured without
        the trace, says how much of it no kernel runs (launch gaps, host waits): the traced span
        cannot, as tracing slows the host that launches the kernels."""
        d = self.to_json()
        idle = ("" if step_ms is None else f"; untraced step {step_ms:.3f} ms, "
                f"{step_ms - d['busy_ms']:.3f} ms of it with no kernel running")
        lines = [f"per step: span {d['span_ms']:.3f} ms, kernels {d['busy_ms']:.3f} ms{idle}; "
                 "streams: " + ", ".join(f"{k}={v:.3f}" for k, v in d["streams_ms"].items()),
                 "classes (ms/step): "
                 + ", ".join(f"{k}={v:.3f}" for k, v in d["classes_ms"].items())]
        for name, ms, n in d["kernels"][:top]:
            lines.append(f"{ms:8.3f} ms {n:6.1f}x  [{kernel_class(name)[:9]:9}] {name[:120]}")
            desc = hlo_map and (hlo_map.get(kernel_key(name))
                                or hlo_map.get(kernel_key(self.hlo_ops.get(name, "?"))))
            lines += [" " * 12 + line[:width] for line in (desc or "").splitlines()]
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
    hlo_ops: dict[str, str] = {}
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
        if "hlo_op" in e.get("args", {}):  # the HLO instruction of a library kernel (cuBLAS)
            hlo_ops.setdefault(e["name"], str(e["args"]["hlo_op"]))
        if len(samples) < 4 and e.get("args"):
            samples.append({"name": e["name"][:80],
                            **{k: str(v)[:120] for k, v in e["args"].items()}})
    if not kernels:
        raise RuntimeError("no GPU events in the trace; processes: "
                           + ", ".join(sorted(procs.values())))
    return DeviceTime(steps, kernels, streams, last - first, samples, hlo_ops)


def trace_device_time(fn, steps: int) -> DeviceTime:
    """Trace ``fn()`` (``steps`` steps' worth of work, blocking at its end) and summarise it."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        fn()
        jax.profiler.stop_trace()
        (path,) = pathlib.Path(tmp).glob("plugins/profile/*/perfetto_trace.json.gz")
        return summarise(path, steps)


# ------------------------------------------------------------------ kernels -> model code (HLO)
#
# XLA names a GPU kernel after the HLO instruction it runs (``loop_add_fusion.1`` runs as
# ``loop_add_fusion_1``), and every instruction of the optimized module carries the jax op that
# made it (``metadata={op_name="jit(step)/transpose(jvp(DecoderLM))/layers_0/mixer/mul" ...}``).
# ``hlo_kernel_map`` reads the compiled step's ``as_text()`` once so that a profile can say which
# model code each opaque fusion is, without another device run.

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
_FIELD = re.compile(r"(\w+)=(\"(?:[^\"\\]|\\.)*\"|[^\s}]+)")
# Instructions that never run as kernels of their own.
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
                "conditional", "after-all", "partition-id", "replica-id", "add-dependency",
                "opt-barrier", "domain"}
# Opcodes left out of a fused computation's op counts (data plumbing, not work).
_PLUMBING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
# Call wrappers jax puts around op names; their argument (if any) is the traced function's name.
_WRAPPER = re.compile(r"^(\w+)\((.*)\)$")


def kernel_key(name: str) -> str:
    """The name a GPU trace gives the kernel of HLO instruction ``name`` (``.``, ``-`` -> ``_``)."""
    return re.sub(r"[^\w]", "_", name)


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str  # result shape without layouts: "f32[2,5]" or "(f32[2], s32[])"
    opcode: str
    operands: list[str]
    attrs: str  # the text after the operand list
    root: bool

    def meta(self, key: str) -> str | None:
        """A ``metadata={...}`` field (op_name, source_file, source_line, stack_frame_id)."""
        start = self.attrs.find("metadata={")
        if start < 0:
            return None
        for k, v in _FIELD.findall(self.attrs[start + len("metadata={"):]):
            if k == key:
                return v[1:-1].replace('\\"', '"').replace("\\'", "'") if v[0] == '"' else v
        return None


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    depth, quote = 0, False
    for i in range(start, len(text)):
        c = text[i]
        if c == '"' and text[i - 1] != "\\":
            quote = not quote
        elif not quote and c in "([{":
            depth += 1
        elif not quote and c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> _Instr | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    close = _balanced(rest, paren)
    operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
    shape = re.sub(r"\{[^{}]*\}", "", shape)  # layouts {1,0} (and tiling) are noise here
    return _Instr(name, shape, rest[:paren].strip(), operands, rest[close:], root)


def _parse_module(text: str):
    """-> (computations: name -> [instructions], source tables: frame id -> (file, line, fn))."""
    comps: dict[str, list[_Instr]] = {}
    tables: dict[str, dict[int, str]] = {}
    current, table = None, None
    for line in text.splitlines():
        if current is not None:
            if line.strip() == "}":
                current = None
            elif (instr := _parse_instruction(line)) is not None:
                comps[current].append(instr)
            continue
        if m := _COMPUTATION.match(line):
            current, table = m.group(1), None
            comps[current] = []
        elif line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line.strip(), {})
        elif table is not None and (m := _TABLE_ROW.match(line.strip())):
            table[int(m.group(1))] = m.group(2)
    return comps, _stack_frames(tables)


def _stack_frames(tables) -> dict[int, list[tuple[str, int, str]]]:
    """Frame id -> its call stack, innermost first, as (file, line, function)."""
    names = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f = dict(_FIELD.findall(v))
        locs[k] = (names.get(int(f.get("file_name_id", 0)), "?"), int(f.get("line", 0)),
                   funcs.get(int(f.get("function_name_id", 0)), "?"))
    frames = {k: dict(_FIELD.findall(v)) for k, v in tables.get("StackFrames", {}).items()}
    stacks = {}
    for k in frames:
        stack, seen, fid = [], set(), k
        # The text prints a frame's parent as its id + 1 (0: none).
        while fid in frames and fid not in seen:
            seen.add(fid)
            stack.append(locs.get(int(frames[fid].get("file_location_id", 0)), ("?", 0, "?")))
            fid = int(frames[fid].get("parent_frame_id", 0)) - 1
        stacks[k] = stack
    return stacks


def _library(path: str) -> bool:
    return any(s in path for s in ("site-packages", "dist-packages", "/jax/", "/flax/", "/optax/"))


def _short_file(path: str) -> str:
    for anchor in ("/pallas_kernels/", "/scripts/", "/meshlm/"):
        if anchor in path:
            return anchor.strip("/") + "/" + path.rsplit(anchor, 1)[1]
    return "/".join(path.split("/")[-2:])


def _source(instr: _Instr, stacks) -> str:
    """``file:line`` of the innermost frame in the project's own code (else the innermost)."""
    if (file := instr.meta("source_file")) is not None:
        return f"{_short_file(file)}:{instr.meta('source_line')}"
    frame = instr.meta("stack_frame_id")
    stack = stacks.get(int(frame), []) if frame else []
    if not stack:
        return ""
    file, line, _ = next((f for f in stack if not _library(f[0])), stack[0])
    return f"{_short_file(file)}:{line}"


def short_op_name(op_name: str) -> str:
    """``jit(step)/transpose(jvp(DecoderLM))/layers_0/mixer/mul`` -> ``bwd DecoderLM/layers_0/
    mixer/mul``: call wrappers unwrapped to the function they name, ``jit``/``pjit`` segments
    dropped, ``bwd`` where the op is in a transpose (the gradient pass)."""
    op_name = op_name.split(";")[0]
    backward = "transpose(" in op_name
    parts = []
    for k, seg in enumerate(op_name.split("/")):
        if k == 0 and re.match(r"p?jit\(", seg):
            continue
        while m := _WRAPPER.match(seg):
            seg = m.group(2)
        if not seg or _WRAPPER.match(seg) or seg in ("eval_jaxpr", "body"):
            continue
        parts.append(seg)
    return ("bwd " if backward else "") + "/".join(parts)


def _counts(items, limit: int) -> str:
    tally: dict[str, int] = {}
    for item in items:
        tally[item] = tally.get(item, 0) + 1
    ranked = sorted(tally.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in ranked[:limit])
    return text + (f", +{len(ranked) - limit} more" if len(ranked) > limit else "")


def _describe(instr: _Instr, comps, shapes, stacks) -> str:
    """Two lines: what goes in and out and which ops run; which model code it is."""
    operands = _counts((shapes.get(o, "?") for o in instr.operands), 4)
    body = []  # the fused computation's instructions, nested fusions expanded
    todo = re.findall(r"calls=%([\w.\-]+)", instr.attrs)
    while todo:
        for sub in comps.get(todo.pop(), []):
            if sub.opcode == "fusion":
                todo += re.findall(r"calls=%([\w.\-]+)", sub.attrs)
            else:
                body.append(sub)
    kind = re.search(r"kind=(\w+)|custom_call_target=\"([^\"]+)\"", instr.attrs)
    kind = next((g for g in kind.groups() if g), "") if kind else ""
    # A GPU fusion's backend (__triton_gemm, __cudnn$fusion, ...) from its backend_config.
    if backend := re.search(r'\\?"kind\\?"\s*:\s*\\?"(__[^"\\]+)', instr.attrs):
        kind += " " + backend.group(1)
    ops = _counts((b.opcode for b in body if b.opcode not in _PLUMBING), 8)
    head = " ".join(x for x in (instr.opcode, kind, instr.shape) if x)
    line1 = f"{head} <- {operands}" + (f" | {ops}" if ops else "")
    # The root says what the kernel produces; then the ops it folds in, most frequent first.
    roots = [b for b in body if b.root][-1:] or [instr]
    if roots[0].opcode == "tuple":  # a multi-output fusion: what each output is
        roots = [b for b in body if b.name in roots[0].operands] or roots
    tally: dict[str, int] = {}
    for b in roots + [b for b in body if not b.root] + [instr]:
        if op := b.meta("op_name"):
            where = _source(b, stacks)
            text = short_op_name(op) + (f" @ {where}" if where else "")
            tally[text] = tally.get(text, 0) + (1 << 20 if b in roots else 1)
    sources = sorted(tally, key=lambda k: -tally[k])
    extra = f"; also {len(sources) - 3} more" if len(sources) > 3 else ""
    return line1 + "\n" + ("; ".join(sources[:3]) + extra if sources else "(no op metadata)")


def hlo_kernel_map(hlo_text: str | list[str]) -> dict[str, str]:
    """Kernel name (``kernel_key`` of an instruction that runs: fusions, custom calls, unfused
    ops, inside while bodies too) -> a two-line description from the optimized HLO text of a
    compiled program (``Compiled.as_text()``; several modules may be given as a list)."""
    out: dict[str, str] = {}
    for text in [hlo_text] if isinstance(hlo_text, str) else hlo_text:
        comps, stacks = _parse_module(text)
        # Computations that run inside one kernel: fused bodies, reduce/scatter/sort regions.
        # (not while bodies, call targets or async wrappers: their instructions are kernels)
        inner = {c for instrs in comps.values() for i in instrs
                 for key, c in re.findall(r"(calls|to_apply)=%([\w.\-]+)", i.attrs)
                 if (i.opcode == "fusion" if key == "calls" else i.opcode != "call")}
        for name, instrs in comps.items():
            if name in inner:
                continue
            shapes = {i.name: i.shape for i in instrs}
            for i in instrs:
                if i.opcode in _NOT_KERNELS:
                    continue
                desc = _describe(i, comps, shapes, stacks)
                out.setdefault(kernel_key(i.name), desc)
                # A Pallas/Triton custom call's kernel runs under its own name.
                if m := re.search(r'\\?"name\\?"\s*:\s*\\?"([\w.\-]+)', i.attrs):
                    out.setdefault(kernel_key(m.group(1)), desc)
    return out


def map_text(hlo_map: dict[str, str]) -> str:
    """Every kernel of a ``hlo_kernel_map``: its name, then its description indented."""
    return "".join(f"{name}\n" + "".join(f"    {line}\n" for line in desc.splitlines())
                   for name, desc in hlo_map.items())
