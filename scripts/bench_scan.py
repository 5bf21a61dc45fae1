"""GPU benchmark of the Mamba-1 selective scan against plain-JAX scans timed in the same run.

    PYTHONPATH=src:. python3 scripts/bench_scan.py [--sweep] [--ssd] [--segments 1 4 8]
        [--parallel 8x16 16x16 ...] [--shapes 8,2048,1536,16 ...]

Inputs are bfloat16 with every Mamba feature on (D skip, silu(z) gate, delta bias + softplus,
one B/C group). For each shape it prints, forward and forward+backward, the milliseconds of
``implementation="triton"``, of ``lax.associative_scan`` (materializes the (B, L, D, N) decays
and inputs in float32) and of ``lax.scan`` (the reference, forward only), plus the achieved GB/s
over the memory floor: each input read once and each output written once, at the device-to-device
copy bandwidth measured here. At the first shape it first checks the kernel against the float32
reference on the same inputs (relative error of y and of every gradient). ``--sweep`` also times
launch configurations (block_d, chunk, num_warps) at the first shape; ``--ssd`` appends the
Mamba-2 table of scripts/bench_ssd.py. ``--segments 1 4 8`` times the Triton kernel once per
segment count (``Tiles.segments``: the segment-parallel scan) in the same table, each checked
against the reference at the first shape. ``--parallel 8x16`` does the same with the forward
that saves no checkpoints scanning each chunk as one parallel scan (``Tiles.parallel``) at
``forward_block_d x forward_chunk`` (its fwd+bwd row is the default training kernels').
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from pallas_kernels._ssm_math import softplus  # noqa: E402
from pallas_kernels.selective_scan import api, reference, triton  # noqa: E402
from pallas_kernels.selective_scan.common import Call  # noqa: E402

DEFAULT_SHAPES = ((8, 2048, 1536, 16), (4, 8192, 2048, 16))
# (block_d, chunk) of the training kernels; warps follow block_d. (8, 4) is the default (H200,
# session 20: narrower blocks were slower, wider ones too).
SWEEP = ((8, 4), (4, 4), (2, 4), (4, 8), (8, 8), (16, 4), (32, 4), (16, 8), (32, 8))
GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "dt_bias")


def make_inputs(batch, length, d_inner, d_state, seed=0):
    k = jax.random.split(jax.random.key(seed), 9)
    bf16 = jnp.bfloat16
    x = dict(
        u=jax.random.normal(k[0], (batch, length, d_inner), bf16),
        delta=(0.5 * jax.random.normal(k[1], (batch, length, d_inner))).astype(bf16),
        A=-jnp.exp(0.5 * jax.random.normal(k[2], (d_inner, d_state))),
        B=jax.random.normal(k[3], (batch, length, 1, d_state), bf16),
        C=jax.random.normal(k[4], (batch, length, 1, d_state), bf16),
        D=jax.random.normal(k[5], (d_inner,)),
        z=jax.random.normal(k[6], (batch, length, d_inner), bf16),
        dt_bias=0.3 * jax.random.normal(k[7], (d_inner,)),
    )
    dy = jax.random.normal(k[8], (batch, length, d_inner), bf16)
    return x, dy


def assoc_scan(u, delta, A, B, C, D, z, dt_bias):
    """Plain JAX, parallel over time: float32 (B, L, D, N) decays and inputs, log-depth combine."""
    f32 = jnp.float32
    dt = softplus(delta.astype(f32) + dt_bias)
    decay = jnp.exp(dt[..., None] * A)
    inp = (dt * u.astype(f32))[..., None] * B.astype(f32)[:, :, 0, None, :]

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    _, h = jax.lax.associative_scan(combine, (decay, inp), axis=1)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(f32)[:, :, 0]) + D * u.astype(f32)
    return (y * jax.nn.silu(z.astype(f32))).astype(u.dtype)


def lax_scan(u, delta, A, B, C, D, z, dt_bias):
    return reference.selective_scan(
        u, delta, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True
    )


def triton_config(batch, length, d_inner, d_state, tiles=None):
    """The Triton launch configuration: ``tiles``, else the device's default ones."""
    call = Call(batch, length, d_inner, 1, d_state)
    return triton.config(call, tiles or triton.default_tiles(call), True, False)


def pallas(cfg):
    def fn(u, delta, A, B, C, D, z, dt_bias):
        return api._kernel_scan(cfg, u, delta, A, B, C, D, z, dt_bias, None, None)[0]

    return fn


def fwd_bwd(fn):
    """Forward and all gradients for the cotangent ``dy`` (what a training step runs)."""

    def run(x, dy):
        y, vjp = jax.vjp(lambda *a: fn(*a), *(x[n] for n in GRAD_ARGS))
        return y, vjp(dy)

    return jax.jit(run)


def floor_bytes(x, dy, backward):
    """Bytes of one pass reading every input once and writing every output once."""
    nbytes = lambda a: a.size * a.dtype.itemsize
    fwd = sum(nbytes(x[n]) for n in GRAD_ARGS) + nbytes(dy)  # inputs + y
    if not backward:
        return fwd
    return fwd + nbytes(dy) + sum(nbytes(x[n]) for n in GRAD_ARGS)  # + dy read + gradients


def copy_bandwidth():
    """Device-to-device bandwidth in GB/s (bytes read + written) of a 2 GiB elementwise pass."""
    x = jnp.ones((1 << 29,), jnp.float32)
    f = jax.jit(lambda a: a * 1.5)
    ms = benchlib.time_ms(f, x, iters=10)
    return 2 * x.nbytes / ms / 1e6


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(x, dy, cfg, ref):
    """Kernel vs the float32 reference ``ref = (y, grads)`` on the bench inputs: relative errors
    of y (of the training pass, and ``y_fwd`` of the forward that saves no checkpoints) and the
    grads."""
    y, g = fwd_bwd(pallas(cfg))(x, dy)
    y_fwd = jax.jit(pallas(cfg))(*(x[n] for n in GRAD_ARGS))
    y_ref, g_ref = ref
    errs = {"y": rel_err(y, y_ref), "y_fwd": rel_err(y_fwd, y_ref)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(GRAD_ARGS, g, g_ref)})
    return errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in DEFAULT_SHAPES])
    p.add_argument("--sweep", action="store_true", help="also time launch configurations")
    p.add_argument("--ssd", action="store_true", help="append scripts/bench_ssd.py's table")
    p.add_argument("--segments", nargs="*", type=int, default=[],
                   help="Tiles.segments values to time beside the defaults, each with the "
                        "sequential forward (1: the sequential scan)")
    p.add_argument("--parallel", nargs="*", default=[], metavar="BLOCK_DxCHUNK",
                   help="tiles of the parallel-scan forward to time (Tiles.parallel)")
    args = p.parse_args(argv)
    for spec in args.parallel:
        if not re.fullmatch(r"\d+x\d+", spec):
            p.error(f"--parallel takes BLOCK_DxCHUNK (e.g. 8x16), got {spec!r}")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]

    print(benchlib.device_description(), flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    rows, sweep_rows = [], []
    for batch, length, d_inner, d_state in shapes:
        x, dy = make_inputs(batch, length, d_inner, d_state)
        call = Call(batch, length, d_inner, 1, d_state)
        default = triton.default_tiles(call)
        cfgs = {"default": triton_config(batch, length, d_inner, d_state, default)}
        cfg = cfgs["default"]
        for n in args.segments:
            tiles = dataclasses.replace(default, segments=n, parallel=False)
            cfgs[f"segments={n}"] = triton_config(batch, length, d_inner, d_state, tiles)
        for spec in args.parallel:
            block_d, chunk = (int(v) for v in spec.split("x"))
            tiles = dataclasses.replace(default, forward_block_d=block_d, forward_chunk=chunk,
                                        parallel=True)
            cfgs[f"parallel {spec}"] = triton_config(batch, length, d_inner, d_state, tiles)
        shape = f"{batch}x{length}x{d_inner}x{d_state}"
        # Checked at the first shape only: the reference's backward at the larger one takes minutes.
        if (batch, length, d_inner, d_state) == shapes[0]:
            ref = fwd_bwd(lax_scan)(x, dy)
            for n, c in cfgs.items():
                errs = check(x, dy, c, ref)
                print(f"{shape} triton {n} vs reference: "
                      + " ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)  # fmt: skip
                assert all(np.isfinite(v) and v < 2e-2 for v in errs.values()), errs

        impls = [("lax.associative_scan", assoc_scan, True)]
        impls += [("pallas triton" + (f" {n}" if len(cfgs) > 1 else ""), pallas(c), True)
                  for n, c in cfgs.items()]  # fmt: skip
        impls.append(("lax.scan (reference)", lax_scan, False))
        assoc_ms = {}
        for name, fn, with_bwd in impls:
            iters = 3 if fn is lax_scan else 20
            for mode in ("fwd", "fwd+bwd") if with_bwd else ("fwd",):
                if mode == "fwd":
                    ms = benchlib.time_ms(jax.jit(fn), *(x[n] for n in GRAD_ARGS), iters=iters)
                else:
                    ms = benchlib.time_ms(fwd_bwd(fn), x, dy, iters=iters)
                nbytes = floor_bytes(x, dy, mode != "fwd")
                floor_ms = nbytes / bw / 1e6
                if name.startswith("lax.assoc"):
                    assoc_ms[mode] = ms
                rows.append((shape, mode, name, ms, nbytes / ms / 1e6, ms / floor_ms,
                             assoc_ms[mode] / ms))  # fmt: skip
                print(f"  {rows[-1]}", flush=True)
        print(f"  triton config: block_d {cfg.block_d} chunk {cfg.chunk} (forward only "
              f"{cfg.forward_chunk}{', parallel' if cfg.parallel else ''}) warps "
              f"{cfg.num_warps}", flush=True)  # fmt: skip

    print("\nselective scan, bf16, D + z gate + delta bias/softplus;", benchlib.device_description())
    headers = ["shape BxLxDxN", "pass", "implementation", "ms", "GB/s", "x floor", "vs assoc"]
    table = benchlib.print_table(headers, rows)

    for batch, length, d_inner, d_state in shapes[:1] if args.sweep else ():
        x, dy = make_inputs(batch, length, d_inner, d_state)
        for block_d, chunk in SWEEP:
            c = triton_config(batch, length, d_inner, d_state, triton.Tiles(block_d, chunk, chunk))
            warps = c.num_warps
            try:
                t_f = benchlib.time_ms(jax.jit(pallas(c)), *(x[n] for n in GRAD_ARGS))
                t_fb = benchlib.time_ms(fwd_bwd(pallas(c)), x, dy)
            except Exception as e:  # noqa: BLE001 - report the configuration and go on
                print(f"  sweep {block_d, chunk, warps} failed: {type(e).__name__}: {e}")
                continue
            sweep_rows.append((f"{batch}x{length}x{d_inner}x{d_state}", block_d, chunk, warps,
                               t_f, t_fb))  # fmt: skip
            print(f"  sweep {sweep_rows[-1]}", flush=True)

    if sweep_rows:
        print("\nlaunch sweep (ms)")
        benchlib.print_table(["shape", "block_d", "chunk", "warps", "fwd", "fwd+bwd"], sweep_rows)
        print("\n" + table, flush=True)
    if args.ssd:
        try:
            import bench_ssd
        except ImportError as e:
            print(f"\n--ssd: scripts/bench_ssd.py not available ({e})")
        else:
            print()
            bench_ssd.main([])


if __name__ == "__main__":
    main()
