"""Benchmark the cross-entropy kernels against XLA's reductions and elementwise pass, in one run.

    PYTHONPATH=src:. python3 scripts/bench_cross_entropy.py [--shapes 16384x50304 ...]
        [--variants default 2048x4 ...] [--iters 20]

Each shape is ``tokens x vocab`` (default: GPT-2 125M's 16 x 1024 tokens and GPT-2's padded
vocabulary; 1.3B's 8 x 2048 is the same), bfloat16 logits as the models emit them. First each
implementation's loss and logits gradient against the float32 reference on the device, then the
device time of the kernels (a profiler trace: no dispatch) of the forward and of a VJP (XLA's
elementwise pass or the Triton backward kernel), the speed-up, and the forward's GB/s for the
one read of the logits it needs at the least. ``--variants``: ``triton.Tiles`` as
``block_v x num_warps [x num_stages]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from pallas_kernels.cross_entropy import cross_entropy, reference, triton  # noqa: E402


def _rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _fns(**kw):
    loss = lambda logits, targets: cross_entropy(logits, targets, **kw)

    @jax.jit
    def fwd_bwd(g, logits, targets):
        ce, vjp = jax.vjp(lambda x: loss(x, targets), logits)
        return ce, vjp(g)[0]

    return jax.jit(loss), fwd_bwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["16384x50304"])
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args(argv)
    print(f"device: {benchlib.device_description()}", flush=True)
    impls = benchlib.variant_impls(a.variants, triton.Tiles)
    rows = []
    for text in a.shapes:
        tokens, vocab = map(int, text.split("x"))
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        logits = (4 * jax.random.normal(k1, (tokens, vocab))).astype(jnp.bfloat16)
        targets = jax.random.randint(k2, (tokens,), 0, vocab)
        g = jax.random.uniform(k3, (tokens,))
        want, vjp = jax.vjp(lambda x: reference.forward(x, targets)[0], logits.astype(jnp.float32))
        want_grad = vjp(g)[0]
        base = None
        for name, kw in impls.items():
            fwd, fwd_bwd = _fns(**kw)
            ce, grad = fwd_bwd(g, logits, targets)
            err = max(_rel(ce, want), _rel(grad, want_grad))
            t_fwd = benchlib.device_ms(fwd, logits, targets, iters=a.iters)
            t_all = benchlib.device_ms(fwd_bwd, g, logits, targets, iters=a.iters)
            base = base or (t_fwd, t_all)
            rows.append([text, name, t_fwd, t_all, base[0] / t_fwd, base[1] / t_all,
                         logits.nbytes / t_fwd / 1e6, f"{err:.1e}"])
            print(rows[-1], flush=True)
    print(f"\n{benchlib.device_description()}; bf16 logits, "
          f"{'kernel' if jax.default_backend() == 'gpu' else 'wall'} time")
    return benchlib.print_table(
        ["tokens x vocab", "implementation", "fwd ms", "fwd+bwd ms", "fwd speed-up",
         "fwd+bwd speed-up", "fwd GB/s (one read)", "max rel. err vs f32 ref"], rows)


if __name__ == "__main__":
    main()
