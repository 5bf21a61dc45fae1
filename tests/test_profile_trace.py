"""scripts/profile_trace.py: kernel names of a compiled program -> the model code they run
(parsed from optimized HLO text), and the per-kernel report that prints it."""

import gzip
import inspect
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from scripts.profile_trace import (
    hlo_kernel_map,
    kernel_key,
    map_text,
    short_op_name,
    summarise,
)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="up")(x)
        h = jax.nn.gelu(h)
        return nn.Dense(4, name="down")(h) + x


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = jax.lax.scan(lambda c, _: (0.5 * c + jnp.sin(c), None), x, None, length=3)
        return Block(name="block")(x)


def _grad_hlo() -> str:
    """The after-optimizations HLO of a small module's gradient, with a scan (a while loop)."""
    net, x = Net(), jax.random.normal(jax.random.key(0), (3, 7, 4))
    params = net.init(jax.random.key(1), x)
    loss = lambda p, x: jnp.mean(net.apply(p, x) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()


def test_map_names_module_path_shape_and_source_of_compiled_fusions():
    text = _grad_hlo()
    got = hlo_kernel_map(text)
    # Every fusion of the entry and of the while body is a key, named as a GPU trace names it.
    fusions = re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ fusion\(", text, re.M)
    assert fusions and {kernel_key(f) for f in fusions} <= got.keys()
    lines = [d.splitlines() for d in got.values()]
    # The bias gradient of block/up: a reduction to the bias shape, in the backward pass, from
    # the line of this file that calls Dense "up" (flax's own frames skipped).
    up_line = next(n for n, src in enumerate(inspect.getsourcelines(Block)[0],
                                             inspect.getsourcelines(Block)[1])
                   if 'name="up"' in src)
    bias = [d[1].split("; ")[0] for d in lines if "f32[16] <-" in d[0] and "reduce" in d[0]]
    expect = f"bwd Net/block/up/reduce_sum @ tests/test_profile_trace.py:{up_line}"
    assert expect in bias, (expect, map_text(got))
    # The scan body's sin/add fusion, inside the while loop: the carry's shape, forward.
    scan = [d for d in lines if "sine" in d[0] and "Net/while/" in d[1]]
    assert scan and scan[0][0].split(" <- ")[0].endswith("f32[3,7,4]"), map_text(got)
    assert not scan[0][1].startswith("bwd")


# Hand-written module text: several computations, a tuple-shaped fusion, a fusion nested in a
# while body, the older source_file/source_line metadata, a custom call with a kernel name.
HLO = """HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8]{0}}

%fused_body (p0: f32[8,4]) -> (f32[8,4], f32[8]) {
  %p0 = f32[8,4]{1,0} parameter(0)
  %e = f32[8,4]{1,0} exponential(%p0), metadata={op_name="jit(step)/jvp(LM)/attn/exp" \
source_file="/x/src/meshlm/layers/attention.py" source_line=42}
  %c = f32[] constant(0)
  %r = f32[8]{0} reduce(%e, %c), dimensions={1}, to_apply=%add_region
  ROOT %t = (f32[8,4]{1,0}, f32[8]{0}) tuple(%e, %r)
}

%add_region (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_step (q0: f32[8,4]) -> f32[8,4] {
  %q0 = f32[8,4]{1,0} parameter(0)
  ROOT %m = f32[8,4]{1,0} multiply(%q0, %q0), metadata={op_name="jit(step)/transpose(\
jvp(LM))/while/body/layers/mlp/mul" source_file="/x/src/meshlm/layers/mlp.py" source_line=7}
}

%body (arg: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %arg = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %v = f32[8,4]{1,0} get-tuple-element(%arg), index=1
  %loop_multiply_fusion.3 = f32[8,4]{1,0} fusion(%v), kind=kLoop, calls=%fused_step
  ROOT %out = (s32[], f32[8,4]{1,0}) tuple(%i, %loop_multiply_fusion.3)
}

ENTRY %main (x: f32[8,4]) -> f32[8] {
  %x = f32[8,4]{1,0} parameter(0)
  %input_reduce_fusion.2 = (f32[8,4]{1,0}, f32[8]{0}) fusion(%x), kind=kInput, \
calls=%fused_body, metadata={op_name="jit(step)/jvp(LM)/attn/reduce_sum"}
  %g = f32[8,4]{1,0} get-tuple-element(%input_reduce_fusion.2), index=0
  %custom-call.1 = f32[8,4]{1,0} custom-call(%g), custom_call_target="__gpu$xla.gpu.triton", \
backend_config={"name":"_fwd_kernel","num_warps":4}, metadata={op_name="jit(step)/attn/pallas_call"}
  %gemm_fusion_dot.4 = f32[8,4]{1,0} fusion(%g), kind=kCustom, calls=%fused_step, \
backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %w = (s32[], f32[8,4]{1,0}) while(%custom-call.1), condition=%cond, body=%body
  ROOT %y = f32[8]{0} get-tuple-element(%input_reduce_fusion.2), index=1
}
""".replace("\\\n", "")


def test_map_of_hand_written_module_tuples_while_bodies_custom_calls():
    got = hlo_kernel_map([HLO])
    assert set(got) == {"input_reduce_fusion_2", "loop_multiply_fusion_3", "custom_call_1",
                        "_fwd_kernel", "gemm_fusion_dot_4"}
    head, src = got["input_reduce_fusion_2"].splitlines()
    assert head == "fusion kInput (f32[8,4], f32[8]) <- f32[8,4] | exponential, reduce", head
    # The outputs' ops first (the tuple's), then the fusion's own op name.
    assert src == "LM/attn/exp @ meshlm/layers/attention.py:42; LM/attn/reduce_sum", src
    head, src = got["loop_multiply_fusion_3"].splitlines()
    assert head.startswith("fusion kLoop f32[8,4] <- f32[8,4] | multiply"), head
    assert src == "bwd LM/while/layers/mlp/mul @ meshlm/layers/mlp.py:7", src
    assert got["gemm_fusion_dot_4"].startswith("fusion kCustom __triton_gemm f32[8,4] <- ")
    assert got["_fwd_kernel"] == got["custom_call_1"]
    assert got["custom_call_1"].startswith("custom-call __gpu$xla.gpu.triton f32[8,4] <- f32[8,4]")


def test_short_op_name():
    name = ("jit(train_step)/transpose(jvp(DecoderLM))/while/body/eval_jaxpr/layers/mixer/"
            "jit(silu)/mul")
    assert short_op_name(name) == "bwd DecoderLM/while/layers/mixer/silu/mul"
    assert short_op_name("jit(step)/jvp(LM)/embed/jit(_take)/lt;jit(step)/x") == "LM/embed/_take/lt"


def test_report_prints_descriptions_under_kernels(tmp_path):
    """A synthetic trace: a fusion found by its name, a library GEMM by its ``hlo_op`` arg."""
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}}]
    events = [{"ph": "X", "pid": 1, "tid": 7, "ts": 10.0 * k, "dur": dur, "name": name, "args": a}
              for k, (name, dur, a) in enumerate(
                  [("loop_add_fusion_1", 3000.0, {}), ("sm90_xmma_gemm", 1000.0,
                                                       {"hlo_op": "custom-call.3"})] * 2)]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    trace = summarise(path, steps=2)
    plain = trace.report(5)
    hlo_map = {"loop_add_fusion_1": "fusion kLoop bf16[8] <- bf16[8] x2 | add\nbwd LM/mlp/add",
               "custom_call_3": "custom-call __cublas$gemm bf16[8,8] <- bf16[8,4] x2\nLM/mlp/dot"}
    lines = trace.report(5, hlo_map).splitlines()
    assert lines[:3] == plain.splitlines()[:3]  # header lines, then the first kernel unchanged
    assert "3.000 ms" in lines[2] and "loop_add_fusion_1" in lines[2]
    assert lines[3:5] == [" " * 12 + "fusion kLoop bf16[8] <- bf16[8] x2 | add",
                          " " * 12 + "bwd LM/mlp/add"]
    assert "sm90_xmma_gemm" in lines[5] and lines[7] == " " * 12 + "LM/mlp/dot"
    assert len(lines) == 8 and len(plain.splitlines()) == 4
    # The two steps' kernels take 4 ms each; a 5 ms untraced step leaves 1 ms with none running.
    header = trace.report(5, step_ms=5.0).splitlines()[0]
    assert ("kernels 4.000 ms; untraced step 5.000 ms, 1.000 ms of it with no kernel running"
            in header)
