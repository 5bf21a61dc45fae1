"""Benchmark the gated RMSNorm kernel against the plain-JAX form XLA fuses, timed in the same run.

    PYTHONPATH=src:. python3 scripts/bench_gated_norm.py [--shapes 8x2048x1536 2x8192x1536]
        [--groups 1] [--iters 50]

Each shape is ``batch x length x features`` (Mamba-2 130M's norm is 8 x 2048 x 1536, one group),
bfloat16 ``y`` and ``z``, float32 ``scale``. First a check of the kernel's output and gradients
against the float32 reference on the device, then ms forward and forward+backward (a VJP that
keeps the output) of ``"xla"`` and ``"triton"``, the speed-up, and the bytes each direction must
move at the least (forward: read y, z, write the output; backward: read y, z, the output
gradient, write dy, dz) as GB/s.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from pallas_kernels.gated_rms_norm import gated_rms_norm, reference  # noqa: E402


def _rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _inputs(shape, dtype=jnp.bfloat16, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    y, z, dout = (jax.random.normal(k[i], shape).astype(dtype) for i in (0, 1, 3))
    return y, z, 1.0 + 0.3 * jax.random.normal(k[2], (shape[-1],)), dout


def _fns(impl, groups):
    norm = lambda y, z, s: gated_rms_norm(y, z, s, groups=groups, implementation=impl)

    @jax.jit
    def fwd_bwd(y, z, s, dout):
        out, vjp = jax.vjp(norm, y, z, s)
        return out, vjp(dout)

    return jax.jit(norm), fwd_bwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["8x2048x1536", "2x8192x1536"])
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)
    impls = ["xla"] + (["triton"] if jax.default_backend() == "gpu" else [])
    print(f"device: {benchlib.device_description()}", flush=True)
    rows = []
    for text in a.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        y, z, s, dout = _inputs(shape)
        want = jax.vjp(lambda *v: reference.gated_rms_norm(
            *v, groups=a.groups, epsilon=1e-5, dtype=jnp.float32),
            y.astype(jnp.float32), z.astype(jnp.float32), s)
        want = (want[0], *want[1](dout.astype(jnp.float32)))
        n = y.size * y.dtype.itemsize
        times = {}
        for impl in impls:
            fwd, fwd_bwd = _fns(impl, a.groups)
            out, grads = fwd_bwd(y, z, s, dout)
            err = max(_rel(g, w) for g, w in zip((out, *grads), want))
            times[impl] = (benchlib.time_ms(fwd, y, z, s, iters=a.iters),
                           benchlib.time_ms(fwd_bwd, y, z, s, dout, iters=a.iters))
            t_fwd, t_all = times[impl]
            rows.append([text, impl, t_fwd, t_all, times["xla"][0] / t_fwd,
                         times["xla"][1] / t_all, 3 * n / t_fwd / 1e6,
                         (3 * n + 5 * n) / t_all / 1e6, f"{err:.1e}"])
            print(rows[-1], flush=True)
    print(f"\n{benchlib.device_description()}; bf16 y, z; groups {a.groups}")
    return benchlib.print_table(
        ["shape", "implementation", "fwd ms", "fwd+bwd ms", "fwd speed-up", "fwd+bwd speed-up",
         "fwd GB/s (min bytes)", "fwd+bwd GB/s (min bytes)", "max rel. err vs f32 ref"], rows)


if __name__ == "__main__":
    main()
