"""Registers, spills and shared memory of every Triton kernel, from Triton's compiler and ptxas,
on any machine (no GPU needed).

    PYTHONPATH=src:. python3 scripts/kernel_resources.py [--gpu "NVIDIA H100"] [--ops ...]

A tile that spills registers to local memory or asks for more shared memory than an SM has is
slow or unlaunchable whatever its timing elsewhere; this catches both before a device is at hand.
Each operation is lowered for CUDA at its benchmark shape (the same as scripts/bench_*.py) under
an abstract mesh of the named GPU, so the kernels take that GPU's default tiles. Every Triton
kernel is then compiled with the ``triton`` package (``pip install triton``; the GPU image has it)
for that GPU's architecture and assembled with the ptxas it bundles. jaxlib compiles with its own
copy of Triton, so the numbers are a close proxy, not the device's own; timings still come from
the bench scripts. ``--sweep`` compiles the flash-attention tile candidates of
``scripts/bench_attention.py --sweep`` and lists the ones that neither spill nor overflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels import lowering_for
from pallas_kernels._api import gpu_arch
from pallas_kernels.causal_conv1d import causal_conv1d
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import triton as fa_triton
from pallas_kernels.flash_attention.common import AttentionSpec
from pallas_kernels.gated_rms_norm import gated_rms_norm
from pallas_kernels.layer_norm import layer_norm
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_scan import triton as selective_scan_triton
from pallas_kernels.ssd import common as ssd_common
from pallas_kernels.ssd import ssd
from pallas_kernels.ssd import triton as ssd_triton

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_scan  # noqa: E402
import bench_ssd  # noqa: E402
import benchlib  # noqa: E402

# Opt-in shared memory per thread block (bytes): more does not launch.
_MAX_SHARED = {"8.0": 166912, "8.6": 101376, "8.9": 101376, "9.0": 232448, "10.0": 232448}
_SDS = jax.ShapeDtypeStruct
_BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One compiled Triton kernel's launch and resource figures."""

    op: str
    name: str
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spill_bytes: int

    def fits(self, shared_limit: int | None) -> bool:
        """Spills nothing and launches (shared memory within the per-block limit)."""
        return self.spill_bytes == 0 and (shared_limit is None or self.shared <= shared_limit)


def _arch(device_kind: str) -> str:
    with lowering_for(device_kind):
        arch = gpu_arch()
    if arch is None:
        raise SystemExit(f"--gpu {device_kind!r} is not a GPU kind jax knows (e.g. 'NVIDIA H100', "
                         "'NVIDIA A100', 'NVIDIA B200')")
    return arch


def _triton_calls(fn, args, device_kind: str) -> list[dict]:
    """``fn`` lowered for CUDA: each Triton custom call's kernel text and launch parameters."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    with lowering_for(device_kind):
        module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir()
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region:
                for child in block:
                    target = child.attributes["call_target_name"] if (
                        child.name == "stablehlo.custom_call") else None
                    if target is not None and ir.StringAttr(target).value == "__gpu$xla.gpu.triton":
                        calls.append(child.attributes["mhlo.backend_config"])
                    walk(child)

    walk(module.operation)
    kernels = []
    for config in calls:
        with ir.Context() as ctx:
            tt_dialect.register_dialect(ctx)
            text = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm()
        kernels.append(dict(
            name=ir.StringAttr(config["name"]).value, ttir=text,
            num_warps=ir.IntegerAttr(config["num_warps"]).value,
            num_stages=ir.IntegerAttr(config["num_stages"]).value,
        ))
    return kernels


def _compile(op: str, call: dict, arch: str, workdir: pathlib.Path) -> Kernel:
    import triton
    from triton.backends.compiler import GPUTarget

    capability = int(arch.replace(".", ""))
    source = workdir / f"{call['name']}.ttir"
    source.write_text(call["ttir"])
    compiled = triton.compile(
        str(source), target=GPUTarget("cuda", capability, 32),
        options=dict(num_warps=call["num_warps"], num_stages=call["num_stages"]))
    ptx = source.with_suffix(".ptx")
    ptx.write_text(compiled.asm["ptx"])
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    suffix = "a" if capability >= 90 else ""  # wgmma needs the architecture-specific target
    report = subprocess.run([str(ptxas), f"-arch=sm_{capability}{suffix}", "-v", str(ptx),
                             "-o", str(ptx.with_suffix(".cubin"))],
                            capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores", report)
    return Kernel(op, call["name"], call["num_warps"], call["num_stages"],
                  compiled.metadata.shared, int(re.search(r"Used (\d+) registers", report)[1]),
                  int(spills[1]) if spills else 0)


def _fwd_bwd(fn, n_diff: int):
    """Forward and the gradients of the first ``n_diff`` arguments: all the kernels of a step."""

    def run(*args):
        y, vjp = jax.vjp(lambda *d: fn(*d, *args[n_diff:]), *args[:n_diff])
        return vjp(jnp.ones(y.shape, y.dtype))

    return run


def _attention_cases(head_dims):
    for head_dim in head_dims:
        for causal in (False, True):
            q = _SDS((1, 4096, 16, head_dim), _BF16)
            attend = functools.partial(flash_attention, causal=causal, implementation="triton")
            label = f"flash_attention d{head_dim}{' causal' if causal else ''}"
            yield label, None, _fwd_bwd(attend, 3), (q, q, q)


def _selective_scan_case():
    shape = bench_scan.DEFAULT_SHAPES[0]
    x, _ = jax.eval_shape(lambda: bench_scan.make_inputs(*shape))  # shapes only, no arrays

    def scan(u, delta, A, B, C, D, z, bias, reset=None, tiles=None):
        return selective_scan(u, delta, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True,
                              reset=reset, implementation="triton", tiles=tiles)

    label = "selective_scan " + "x".join(map(str, shape))
    args = tuple(x[n] for n in bench_scan.GRAD_ARGS)
    yield label, None, _fwd_bwd(scan, 8), args
    reset = _SDS(args[0].shape[:2], jnp.bool_)  # packed documents
    yield label + " reset", None, _fwd_bwd(scan, 8), args + (reset,)
    for block_d, chunk in ((8, 64), (16, 32), (16, 64)):  # the parallel forward (Tiles.parallel)
        tiles = selective_scan_triton.Tiles(8, 4, chunk, parallel=True, forward_block_d=block_d)
        yield (f"{label} parallel fwd {block_d}x{chunk}", None,
               functools.partial(scan, tiles=tiles), args)


def _ssd_case(device_kind: str):
    length, batch = 8192, 2  # bench_ssd's 8k row: 16k tokens
    x = jax.eval_shape(lambda: bench_ssd._inputs(
        jax.random.key(0), batch, length, bench_ssd.HEADS, bench_ssd.HEAD_DIM, bench_ssd.GROUPS,
        bench_ssd.D_STATE, _BF16))
    names = ("x", "dt", "A", "B", "C", "D", "dt_bias")

    def scan(x, dt, A, B, C, D, bias, tiles=None):
        return ssd(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True,
                   chunk_size=bench_ssd.CHUNK, implementation="triton", tiles=tiles)

    label = f"ssd {batch}x{length}x{bench_ssd.HEADS}x{bench_ssd.HEAD_DIM}x{bench_ssd.D_STATE}"
    yield label, None, _fwd_bwd(scan, 7), tuple(x[n] for n in names)
    # dB/dC per (group, tile): the kernels that change
    with lowering_for(device_kind):  # that GPU's default tiles, with group_bc
        call = ssd_common.Call((batch, length, bench_ssd.HEADS, bench_ssd.HEAD_DIM),
                               (batch, length, bench_ssd.GROUPS, bench_ssd.D_STATE),
                               bench_ssd.CHUNK)
        tiles = dataclasses.replace(ssd_triton.default_tiles(call), group_bc=True)
    grouped = _fwd_bwd(functools.partial(scan, tiles=tiles), 7)
    for kernel in ("ssd_bwd_state_side", "ssd_bwd_grads", "ssd_bwd_bc"):
        yield label + " group_bc", kernel, grouped, tuple(x[n] for n in names)
    fused = dataclasses.replace(tiles, fuse_state_side=True)
    yield (label + " group_bc fused", "ssd_bwd_grads",
           _fwd_bwd(functools.partial(scan, tiles=fused), 7), tuple(x[n] for n in names))


def _causal_conv1d_case():
    x = _SDS((8, 2048, 1536), _BF16)  # Mamba-2 130M's conv_x: 8 x 2048 tokens, K = 4
    kernel, bias, pos = _SDS((4, 1536), jnp.float32), _SDS((1536,), jnp.float32), _SDS(
        (8, 2048), jnp.int32)

    def conv(x, kernel, bias, doc_pos):
        return causal_conv1d(x, kernel, bias, doc_pos, activation="silu", implementation="triton")

    yield "causal_conv1d 8x2048x1536 K4 silu", None, _fwd_bwd(conv, 3), (x, kernel, bias, pos)


def _norm_cases():
    """GPT-2 125M's LayerNorm and GPT 1.3B's (16 x 1024 tokens), Mamba-2 130M's gated norm."""
    for features in (768, 2048):
        x, scale = _SDS((16, 1024, features), _BF16), _SDS((features,), jnp.float32)
        norm = functools.partial(layer_norm, implementation="triton")
        yield f"layer_norm 16x1024x{features} bias", None, _fwd_bwd(norm, 3), (x, scale, scale)
    y, scale = _SDS((8, 2048, 1536), _BF16), _SDS((1536,), jnp.float32)
    gated = functools.partial(gated_rms_norm, implementation="triton")
    yield "gated_rms_norm 8x2048x1536", None, _fwd_bwd(gated, 3), (y, y, scale)


_OPS = ("flash_attention", "selective_scan", "ssd", "causal_conv1d", "norms")


def _sweep_cases(head_dim: int):
    """bench_attention's sweep candidates (non-causal): ``(label, kernel to keep, fn, args)``."""
    q = _SDS((1, 4096, 16, head_dim), _BF16)
    lse = _SDS((1, 16, 4096), jnp.float32)
    common = dict(spec=AttentionSpec(causal=False, scale=head_dim ** -0.5), interpret=False)
    grid = [(w, s) for w in (4, 8) for s in (1, 2, 3)]
    shapes = {"fwd": ((128, 64), (128, 128), (64, 64), (64, 128)),
              "dkv": ((64, 128), (32, 128), (64, 64), (128, 128), (32, 64)),
              "dq": ((128, 64), (64, 64), (128, 32), (64, 32), (128, 128))}
    for kind, sizes in shapes.items():
        for (bq, bk), (w, s) in ((size, ws) for size in sizes for ws in grid):
            tiles = fa_triton.KernelTiles(bq, bk, w, s)
            every = fa_triton.Tiles(tiles, tiles, tiles)  # only the kernel named is compiled
            if kind == "fwd":
                fn = functools.partial(fa_triton.forward, **common, tiles=every)
                yield (f"d{head_dim} fwd {tiles}", None,
                       lambda q, k, v, fn=fn: fn(q, k, v, None, None, None), (q, q, q))
            else:
                fn = functools.partial(fa_triton.backward, **common, tiles=every)
                keep = "flash_attention_dkv" if kind == "dkv" else "flash_attention_dq"
                yield (f"d{head_dim} {kind} {tiles}", keep,
                       lambda q, k, v, o, l, g, fn=fn: fn(q, k, v, None, None, None, o, l, g),
                       (q, q, q, q, lse, q))


def main(argv=None) -> list[Kernel]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="NVIDIA H100", help="device kind to compile for")
    parser.add_argument("--ops", nargs="*", default=list(_OPS), choices=_OPS)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256],
                        choices=(64, 128, 256), help="flash-attention head dims")
    parser.add_argument("--sweep", action="store_true", help="flash-attention tile candidates")
    parser.add_argument("--out", type=pathlib.Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    arch = _arch(args.gpu)
    limit = _MAX_SHARED.get(arch)
    cases_of = {"flash_attention": lambda: _attention_cases(args.head_dims),
                "selective_scan": _selective_scan_case, "ssd": lambda: _ssd_case(args.gpu),
                "causal_conv1d": _causal_conv1d_case, "norms": _norm_cases}
    if args.sweep:
        cases = (case for head_dim in args.head_dims for case in _sweep_cases(head_dim))
    else:
        cases = (case for op in args.ops for case in cases_of[op]())
    kernels = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, keep, fn, fn_args in cases:
            for call in _triton_calls(fn, fn_args, args.gpu):
                if keep in (None, call["name"]):
                    kernels.append(_compile(label, call, arch, pathlib.Path(tmp)))
                    print(f"compiled {label}: {call['name']}", flush=True)
    print(f"\n{args.gpu} (sm_{arch.replace('.', '')}), jax {jax.__version__}; "
          f"shared-memory limit {limit} bytes per block")
    benchlib.print_table(
        ["operation", "kernel", "warps", "stages", "shared KiB", "registers", "spill bytes", "ok"],
        [[k.op, k.name, k.num_warps, k.num_stages, round(k.shared / 1024, 1), k.registers,
          k.spill_bytes, "yes" if k.fits(limit) else "NO"] for k in kernels])
    if args.out:
        args.out.write_text(json.dumps([dataclasses.asdict(k) for k in kernels], indent=1))
    return kernels


if __name__ == "__main__":
    main()
