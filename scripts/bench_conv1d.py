"""Benchmark the causal depthwise conv kernel against its plain-JAX form, timed in the same run.

Shapes are Mamba-2 130M's train step (8 x 2048 tokens): ``conv_x`` over 1536 channels and
``conv_bc`` over 256 (2 x 1 group x d_state 128), bfloat16, K = 4, bias, SiLU and packed
documents (``doc_pos``) fused as the mixer calls it.

    PYTHONPATH=src:. python3 scripts/bench_conv1d.py [--channels 1536 256] [--batch 8]
        [--length 2048] [--variants 32x64x4 32x64x8x4 32x64x4s ...] [--documents 512]
        [--no-check] [--kernels]

First a correctness check on the device (float32 plain-JAX form on the same inputs, odd length
and channels, output and every gradient), then per shape: ms forward and forward+backward (a VJP
of x, kernel and bias, with its forward's output) of every Triton tile variant ``block_t x
block_c x num_warps [x blocks]``, ``s`` at the end for the split backward (``triton.Tiles``),
beside the plain-JAX form (also under ``jax.checkpoint``: autodiff keeps float32 intermediates
per tap, ~0.6 GB per Mamba-2 130M layer at 8 x 2048), and the speed-up. Wall times include a
call's dispatch and sync, a large part of a 0.1 ms kernel's; ``--kernels`` adds device time from
a profiler trace. Off a GPU only the plain-JAX rows run.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from pallas_kernels.causal_conv1d import causal_conv1d, reference, triton  # noqa: E402

K = 4


def _inputs(key, batch, length, channels, dtype, documents):
    k = jax.random.split(key, 5)
    x = jax.random.normal(k[0], (batch, length, channels), jnp.float32).astype(dtype)
    kernel = 0.5 * jax.random.normal(k[1], (K, channels), jnp.float32)
    bias = 0.1 * jax.random.normal(k[2], (channels,), jnp.float32)
    # Positions within documents starting at random steps (~`documents` apart).
    starts = jax.random.uniform(k[3], (batch, length)) < 1.0 / documents
    steps = jnp.arange(length)[None, :]
    begun = jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)
    dy = jax.random.normal(k[4], x.shape, jnp.float32).astype(dtype)
    return (x, kernel, bias, (steps - begun).astype(jnp.int32)), dy


def parse_variant(text):
    """``"32x64x8x4s"`` -> ``Tiles(32, 64, 8, blocks=4, split_bwd=True)``."""
    split = text.endswith("s")
    return triton.Tiles(*map(int, text.removesuffix("s").split("x")), split_bwd=split)


def _fwd_and_vjp(impl, remat=False, **opts):
    """Jitted forward and forward + VJP; ``remat``: under ``jax.checkpoint`` (the backward
    recomputes the forward from the inputs instead of keeping autodiff's float32 intermediates)."""

    def f(x, kernel, bias, doc_pos):
        return causal_conv1d(x, kernel, bias, doc_pos, activation="silu", implementation=impl,
                             **opts)

    if remat:
        f = jax.checkpoint(f)

    fwd = jax.jit(f)

    @jax.jit
    def fwd_bwd(dy, x, kernel, bias, doc_pos):
        y, vjp = jax.vjp(lambda *d: f(*d, doc_pos), x, kernel, bias)
        return y, vjp(dy)  # y too: a train step's forward writes it

    return fwd, fwd_bwd


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(dtype, tol, tiles=None, batch=2, length=1001, channels=300):
    """Output and gradients of the Triton kernel (``tiles``: None, the default) against the
    float32 plain-JAX form."""
    (x, kernel, bias, pos), dy = _inputs(jax.random.PRNGKey(3), batch, length, channels, dtype, 64)
    got = _fwd_and_vjp("triton", tiles=tiles)[1](dy, x, kernel, bias, pos)
    f32 = lambda v: v.astype(jnp.float32)
    y, vjp = jax.vjp(lambda *d: reference.causal_conv1d(*d, pos, activation="silu"),
                     f32(x), kernel, bias)
    want = (y, *vjp(f32(dy)))
    errs = dict(zip(("y", "dx", "dkernel", "dbias"), map(_rel, (got[0], *got[1]), want)))
    worst = max(errs.values())
    print(f"check triton {tiles or 'default'} {jnp.dtype(dtype).name}: max rel err "
          f"{worst:.2e} (tol {tol}) "
          f"{'ok' if worst < tol else 'FAIL'}", flush=True)
    print("   " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    return worst < tol


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, nargs="+", default=[1536, 256],
                   help="1536: conv_x of Mamba-2 130M; 256: its conv_bc")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--variants", nargs="+",
                   default=["32x64x4", "32x64x4s", "32x64x8s", "64x64x8s", "32x64x4x8s"],
                   help="Triton tiles block_t x block_c x num_warps [x blocks], 's' at the end "
                        "for the split backward")
    p.add_argument("--documents", type=int, default=512, help="mean packed-document length")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--kernels", action="store_true",
                   help="also device time per call from a profiler trace (no dispatch or sync)")
    a = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    print(f"device: {benchlib.device_description()}", flush=True)
    if on_gpu and not a.no_check:
        for tiles in [None] + [parse_variant(v) for v in a.variants]:
            check(jnp.float32, 1e-5, tiles)
            check(jnp.bfloat16, 1e-2, tiles)

    if a.kernels and not on_gpu:
        print("--kernels reads GPU kernels from a trace: left out on this host", flush=True)
    kernels = a.kernels and on_gpu
    names = ["fwd", "fwd+bwd"] + (["fwd kernels", "fwd+bwd kernels"] if kernels else [])

    def times(fwd, fwd_bwd, vals, dy):
        out = [benchlib.time_ms(fwd, *vals, iters=a.iters),
               benchlib.time_ms(fwd_bwd, dy, *vals, iters=a.iters)]
        if kernels:
            out += [benchlib.kernel_ms(fwd, *vals, iters=a.iters)[0],
                    benchlib.kernel_ms(fwd_bwd, dy, *vals, iters=a.iters)[0]]
        return out

    rows = []
    for channels in a.channels:
        vals, dy = _inputs(jax.random.PRNGKey(channels), a.batch, a.length, channels,
                           jnp.bfloat16, a.documents)
        shape = f"{a.batch}x{a.length}x{channels}"
        base_fwd, base_bwd = _fwd_and_vjp("xla")
        base = times(base_fwd, base_bwd, vals, dy)
        y_base = base_fwd(*vals)
        rows.append([shape, "plain-JAX (xla)", *base, *[1.0] * len(base), "-"])
        print(rows[-1], flush=True)
        candidates = [("plain-JAX, rematerialised", "xla", dict(remat=True))]
        candidates += [(f"triton {v}", "triton", dict(tiles=parse_variant(v)))
                       for v in (a.variants if on_gpu else [])]
        for label, impl, opts in candidates:
            try:
                fwd, fwd_bwd = _fwd_and_vjp(impl, **opts)
                got = times(fwd, fwd_bwd, vals, dy)
                err = _rel(fwd(*vals), y_base)
            except Exception as e:  # noqa: BLE001 - report the variant and go on
                print(f"{label} at {shape}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            rows.append([shape, label, *got, *(b / t for b, t in zip(base, got)), f"{err:.1e}"])
            print(rows[-1], flush=True)
    print(f"\n{benchlib.device_description()}; bf16, K {K}, bias + SiLU + doc_pos "
          f"(documents of ~{a.documents} steps); wall ms per call (dispatch and sync included)"
          + ("; kernels: device ms per call from a profiler trace" if kernels else ""))
    return benchlib.print_table(
        ["shape", "implementation", *(f"{n} ms" for n in names),
         *(f"{n} speed-up" for n in names), "y rel. diff vs xla"], rows)

if __name__ == "__main__":
    main()
