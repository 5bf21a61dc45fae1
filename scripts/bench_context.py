"""Context parallelism on the GPUs of one host: ring attention fwd+bwd over N GPUs vs 1 GPU.

For each total length (default 64k and 128k tokens) this times causal attention forward +
backward (``jax.vjp`` of the output against a random cotangent) as ring attention with the
length sharded over ``--gpus`` GPUs (``meshlm.layers.ring_attention``: zig-zag layout, K/V
rotating by ``ppermute``, ``flash_attention(return_lse=True)`` per block; and the Ulysses
all-to-all method, ``--methods ring,ulysses``), and as plain
``flash_attention`` on 1 GPU at the same length, or, where 1 GPU runs out of memory, notes it and
the table's last line names the largest length that fits on 1 GPU. One table:

    tokens | method | GPUs | ms fwd+bwd | TFLOP/s per GPU | speedup vs 1 GPU | scaling eff.

FLOPs count visible (query, key) pairs only: 4 * heads * head_dim * L^2 / 2 forward, 3.5x that
for forward + backward. Scaling efficiency = speedup / GPUs. NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0``).

    PYTHONPATH=src:. python3 scripts/bench_context.py --gpus 4          # the GPU table
    PYTHONPATH=src:. python3 scripts/bench_context.py --smoke           # 8 fake CPU devices
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off
if "--smoke" in sys.argv:  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import device_description, print_table, time_ms

from meshlm import sharding
from meshlm.config import DEFAULT_RULES, MeshConfig
from meshlm.layers import ring_attention
from pallas_kernels.flash_attention import flash_attention


def fwd_bwd(attend):
    """``(q, k, v, cot) -> (out, dq, dk, dv)`` for an attention function."""
    def run(q, k, v, cot):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(cot))
    return run


def arrays(length, args, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q_shape = (args.batch, length, args.heads, args.head_dim)
    kv_shape = (args.batch, length, args.kv_heads, args.head_dim)
    return [jnp.asarray(rng.normal(size=s), dtype) for s in (q_shape, kv_shape, kv_shape, q_shape)]


def single(length, args, dtype, device):
    """fwd+bwd milliseconds and outputs of flash attention on one device."""
    xs = [jax.device_put(x, device) for x in arrays(length, args, dtype)]
    fn = jax.jit(fwd_bwd(lambda q, k, v: flash_attention(
        q, k, v, causal=True, implementation=args.impl)))
    return time_ms(fn, *xs, iters=args.iters, warmup=2), fn(*xs)


def sharded(method, length, args, dtype, devices):
    """fwd+bwd milliseconds and outputs of context-parallel attention over ``devices``."""
    mesh = sharding.make_mesh(MeshConfig(data=1, sequence=len(devices)), devices)
    with sharding.activate(mesh, DEFAULT_RULES):
        axes = (ring_attention.Q_AXES, ring_attention.KV_AXES, ring_attention.KV_AXES,
                ring_attention.Q_AXES)
        xs = [jax.device_put(x, sharding.named_sharding(mesh, DEFAULT_RULES, *a))
              for x, a in zip(arrays(length, args, dtype), axes)]
        fn = jax.jit(fwd_bwd(lambda q, k, v: ring_attention.context_parallel_attention(
            q, k, v, causal=True, method=method, implementation=args.impl)))
        return time_ms(fn, *xs, iters=args.iters, warmup=2), fn(*xs)


def tflops(length, args, ms, gpus):
    flops = 3.5 * 4.0 * args.batch * args.heads * args.head_dim * length * length / 2
    return flops / (ms * 1e-3) / gpus / 1e12


def out_of_memory(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--lengths", default="65536,131072", help="total tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--impl", default="auto", help="flash_attention implementation per block")
    p.add_argument("--methods", default="ring,ulysses", help="context-parallel methods to time")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--smoke", action="store_true",
                   help="8 fake CPU devices, tiny shapes, float32 reference; checks the ring "
                        "against 1 device")
    args = p.parse_args()
    dtype = jnp.bfloat16
    if args.smoke:
        args.lengths, args.heads, args.kv_heads, args.head_dim = "64,128", 4, 4, 16
        args.impl, args.iters, dtype = "xla", 1, jnp.float32
    devices = jax.devices()
    if len(devices) < args.gpus:
        sys.exit(f"--gpus {args.gpus} but only {len(devices)} devices")
    print(f"# {device_description()}; batch {args.batch}, heads {args.heads}/{args.kv_heads} "
          f"(q/kv), head_dim {args.head_dim}, causal, {jnp.dtype(dtype).name}, "
          f"impl {args.impl}", flush=True)

    rows, largest_single = [], None
    for length in (int(x) for x in args.lengths.split(",")):
        try:
            ms1, out1 = single(length, args, dtype, devices[0])
            largest_single = length
            rows.append([length, "1 GPU", 1, ms1, tflops(length, args, ms1, 1), 1.0, 1.0])
            print(f"  {rows[-1]}", flush=True)  # (a run cut short still shows its rows)
        except Exception as err:  # an out-of-memory row is reported
            if not out_of_memory(err):
                raise
            ms1 = out1 = None
            rows.append([length, "1 GPU", 1, "OOM", "-", "-", "-"])
        for method in args.methods.split(","):
            msn, outn = sharded(method, length, args, dtype, devices[:args.gpus])
            speedup = "-" if ms1 is None else ms1 / msn
            eff = "-" if ms1 is None else speedup / args.gpus
            rows.append([length, method, args.gpus, msn, tflops(length, args, msn, args.gpus),
                         speedup, eff])
            print(f"  {rows[-1]}", flush=True)
            if args.smoke and out1 is not None:  # equals 1 device (float32 reference)
                for a, b in zip(out1, outn):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)
    print_table(["tokens", "method", "GPUs", "ms fwd+bwd", "TFLOP/s per GPU", "speedup vs 1 GPU",
                 "scaling eff."], rows)
    print(f"largest length timed on 1 GPU: {largest_single}")


if __name__ == "__main__":
    main()
