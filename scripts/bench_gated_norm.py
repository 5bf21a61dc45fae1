"""Benchmark the norm kernels (gated RMSNorm, LayerNorm, RMSNorm) against the plain-JAX forms XLA
fuses, timed in the same run.

    PYTHONPATH=src:. python3 scripts/bench_gated_norm.py [--op gated|layernorm|rmsnorm]
        [--shapes 8x2048x1536 ...] [--groups 1] [--iters 50] [--variants default 2x16x8 ...]
        [--kernels]

Each shape is ``batch x length x features``; defaults by op: Mamba-2 130M's gated norm (8 x 2048
x 1536, one group), GPT-2 125M's and GPT 1.3B's LayerNorm (16 x 1024 x 768 / 2048, with bias),
Mamba-2 130M's RMSNorm (8 x 2048 x 768). Inputs bfloat16, parameters float32. First a check of
the output and gradients against the float32 reference on the device, then ms forward and
forward+backward (a VJP that keeps the output) of ``"xla"`` and ``"triton"`` by the kernels'
device time (a profiler trace: wall times of ~0.1 ms calls are mostly dispatch, which hid the
tiles' differences in the sweeps before session 23), the speed-up, and the bytes each direction
must move at the least (forward: read the inputs, write the output; backward: read the inputs and
the output gradient, write their gradients) as GB/s. ``--variants`` times Triton tiles
(``layer_norm.triton.Tiles`` fields in order: ``block_rows x bwd_rows x num_warps
[x bwd_stages]``) beside the default; ``--kernels`` adds each row's per-kernel device ms.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from pallas_kernels import gated_rms_norm as gated  # noqa: E402
from pallas_kernels import layer_norm as norm  # noqa: E402
from pallas_kernels.gated_rms_norm import reference as gated_ref  # noqa: E402
from pallas_kernels.layer_norm import reference as norm_ref  # noqa: E402
from pallas_kernels.layer_norm import triton  # noqa: E402

SHAPES = {"gated": ["8x2048x1536", "2x8192x1536"], "layernorm": ["16x1024x768", "16x1024x2048"],
          "rmsnorm": ["8x2048x768"]}


def _rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _op(op, groups):
    """``(fn(*args, impl), reference(*args) in float32, args(shape), activation operands)``."""
    f32 = jnp.float32

    def args(shape, seed=0):
        k = jax.random.split(jax.random.key(seed), 4)
        x, z = (jax.random.normal(k[i], shape).astype(jnp.bfloat16) for i in (0, 1))
        scale = 1.0 + 0.3 * jax.random.normal(k[2], (shape[-1],))
        bias = 0.5 * jax.random.normal(k[3], (shape[-1],))
        return {"gated": (x, z, scale), "layernorm": (x, scale, bias), "rmsnorm": (x, scale)}[op]

    if op == "gated":
        return (lambda y, z, s, impl, tiles=None: gated.gated_rms_norm(
                    y, z, s, groups=groups, implementation=impl, tiles=tiles),
                lambda y, z, s: gated_ref.gated_rms_norm(y.astype(f32), z.astype(f32), s,
                                                         groups=groups, epsilon=1e-5, dtype=f32),
                args, 2)
    center = op == "layernorm"
    return (lambda x, *p, impl, tiles=None: norm.layer_norm(x, *p, subtract_mean=center,
                                                            implementation=impl, tiles=tiles),
            lambda x, s, b=None: norm_ref.layer_norm(x.astype(f32), s, b, subtract_mean=center,
                                                     epsilon=1e-5, dtype=f32),
            args, 1)


def _fns(fn, impl, tiles=None):
    run = lambda *a: fn(*a, impl=impl, tiles=tiles)

    @jax.jit
    def fwd_bwd(dout, *a):
        out, vjp = jax.vjp(run, *a)
        return out, vjp(dout)

    return jax.jit(run), fwd_bwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=tuple(SHAPES), default="gated")
    p.add_argument("--shapes", nargs="+", default=None)
    p.add_argument("--groups", type=int, default=1, help="the gated norm's groups")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=["default"],
                   help="Triton tiles: 'default' or block_rows x bwd_rows x num_warps "
                        "[x bwd_stages]")
    p.add_argument("--kernels", action="store_true",
                   help="per-kernel device ms of each row's forward+backward (a trace)")
    a = p.parse_args(argv)
    impls = [(label, kw["implementation"], kw.get("tiles"))
             for label, kw in benchlib.variant_impls(a.variants, triton.Tiles).items()]
    print(f"device: {benchlib.device_description()}", flush=True)
    fn, ref, make_args, inputs = _op(a.op, a.groups)
    rows = []
    for text in a.shapes or SHAPES[a.op]:
        shape = tuple(int(v) for v in text.split("x"))
        args = make_args(shape)
        dout = jax.random.normal(jax.random.key(9), shape).astype(jnp.bfloat16)
        want, vjp = jax.vjp(ref, *args)
        want = (want, *vjp(dout.astype(jnp.float32)))
        n = args[0].size * args[0].dtype.itemsize
        times = {}
        for label, impl, tiles in impls:
            fwd, fwd_bwd = _fns(fn, impl, tiles)
            try:
                out, grads = fwd_bwd(dout, *args)
            except Exception as e:  # noqa: BLE001 - a variant the call rejects: report, go on
                print(f"{label} at {text}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            err = max(_rel(g, w) for g, w in zip((out, *grads), want))
            times[label] = (benchlib.device_ms(fwd, *args, iters=a.iters),
                            benchlib.device_ms(fwd_bwd, dout, *args, iters=a.iters))
            t_fwd, t_all = times[label]
            fwd_bytes, bwd_bytes = (inputs + 1) * n, (2 * inputs + 1) * n
            rows.append([text, label, t_fwd, t_all, times["xla"][0] / t_fwd,
                         times["xla"][1] / t_all, fwd_bytes / t_fwd / 1e6,
                         (fwd_bytes + bwd_bytes) / t_all / 1e6, f"{err:.1e}"])
            print(rows[-1], flush=True)
            if a.kernels:
                for name, ms in benchlib.kernel_ms(fwd_bwd, dout, *args, iters=a.iters)[1]:
                    print(f"    {ms:8.3f} ms  {name}", flush=True)
    print(f"\n{benchlib.device_description()}; {a.op}, bf16 activations, "
          f"{'kernel' if jax.default_backend() == 'gpu' else 'wall'} time"
          + (f", groups {a.groups}" if a.op == "gated" else ""))
    return benchlib.print_table(
        ["shape", "implementation", "fwd ms", "fwd+bwd ms", "fwd speed-up", "fwd+bwd speed-up",
         "fwd GB/s (min bytes)", "fwd+bwd GB/s (min bytes)", "max rel. err vs f32 ref"], rows)


if __name__ == "__main__":
    main()
