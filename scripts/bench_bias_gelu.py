"""Benchmark the bias-GELU backward kernel against XLA's fusion of the same pass, in one run.

    PYTHONPATH=src:. python3 scripts/bench_bias_gelu.py [--shapes 16384x3072 ...]
        [--variants default 16x256x256x4 ...] [--iters 30]

Each shape is ``tokens x d_ff`` (defaults: GPT-2 125M's and 350M's MLP at 16 x 1024 tokens and
1.3B's at 8 x 2048), bfloat16 as the models run it. First each implementation's gradients
against the float32 reference on the device, then the device time of the kernels (a profiler
trace: no dispatch) of ``bias_gelu``'s backward from its saved pre-activation, the speed-up
over XLA's, and the GB/s of its one read of the pre-activation and the output gradient
and one write of the pre-activation's gradient. ``--variants``: ``triton.Tiles`` as
``block_rows x block_features x rows_per_program x num_warps [x num_stages]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from pallas_kernels.bias_gelu import bias_gelu, reference, triton  # noqa: E402


def _rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["16384x3072", "16384x4096", "16384x8192"])
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args(argv)
    print(f"device: {benchlib.device_description()}", flush=True)
    impls = benchlib.variant_impls(a.variants, triton.Tiles)
    rows = []
    for text in a.shapes:
        tokens, features = map(int, text.split("x"))
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        h = (3 * jax.random.normal(k1, (tokens, features))).astype(jnp.bfloat16)
        bias = jax.random.normal(k2, (features,)).astype(jnp.bfloat16)
        g = jax.random.normal(k3, (tokens, features)).astype(jnp.bfloat16)
        want = reference.backward((h + bias).astype(jnp.float32), g.astype(jnp.float32))
        base = None
        for name, kw in impls.items():
            # The backward alone, from the saved pre-activation (in a model, the product's
            # epilogue writes it): the VJP closure is a pytree of its residuals.
            _, saved = jax.vjp(lambda h, b, kw=kw: bias_gelu(h, b, **kw), h, bias)
            backward = jax.jit(lambda saved, g: saved(g))
            dh, db = backward(saved, g)
            err = max(_rel(dh, want[0]), _rel(db, want[1]))
            ms = benchlib.device_ms(backward, saved, g, iters=a.iters)
            base = base or ms
            rows.append([text, name, ms, base / ms, 3 * h.nbytes / ms / 1e6, f"{err:.1e}"])
            print(rows[-1], flush=True)
    print(f"\n{benchlib.device_description()}; bf16, "
          f"{'kernel' if jax.default_backend() == 'gpu' else 'wall'} time")
    return benchlib.print_table(
        ["tokens x d_ff", "implementation", "bwd ms", "speed-up", "GB/s (3 passes)",
         "max rel. err vs f32 ref"], rows)


if __name__ == "__main__":
    main()
