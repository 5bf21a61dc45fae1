"""The grouped matmul alone on the GPU: forward and forward + backward of
``pallas_kernels.grouped_matmul`` per implementation (``jax.lax.ragged_dot``, the Triton kernels
per tile setting, JAX's Hopper kernels) beside a dense matmul of the same FLOPs, in one run.

    PYTHONPATH=src:. python3 scripts/bench_grouped_matmul.py [--m 32768 --k 1024 --n 2304
        --groups 8] [--tiles 128,64,128,8,3 64,64,128,4,4/64,64,128,4,4/64,128,128,8,3]
        [--mosaic-tiles 128,128,64,4,1]

The default shape is the MoE benchmark's first expert matmul (16,384 tokens, top-2, d_model
1024, expert d_ff 2304, 8 experts), with random group sizes near m / groups. Each
implementation is checked once against ``ragged_dot`` on float32 copies (max abs error of out,
d_lhs and d_rhs over the largest reference magnitude) before it is timed; a failure prints its
error and the run goes on.

``--tiles`` (Triton): ``BM,BK,BN,WARPS,STAGES`` for all three kernels, or ``fwd/dlhs/drhs``
three of them separated by ``/`` (``drhs``: BM rows per step, a BK x BN output tile).
``--mosaic-tiles``: ``BM,BN,BK,MAX_CONCURRENT_STEPS,GRID_BLOCK_N`` likewise.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul import grouped_matmul, mosaic_gpu, triton
from scripts.benchlib import device_description, print_table, time_ms


def parse_tiles(spec: str, module):
    """``module.Tiles`` from ``"a,b,c,d,e"`` (all kernels) or three of them joined by ``/``."""
    kernels = [module.KernelTiles(*map(int, part.split(","))) for part in spec.split("/")]
    if len(kernels) == 1:
        kernels *= 3
    if len(kernels) != 3:
        raise SystemExit(f"tiles {spec!r}: one setting or three (fwd/dlhs/drhs)")
    return module.Tiles(*kernels)


def variants(triton_specs, mosaic_specs, interpret=False):
    """``[(label, grouped_matmul kwargs)]``: ragged_dot, each Triton tile setting (None: its
    default) and each Hopper tile setting."""
    out = [("xla (ragged_dot)", dict(implementation="xla"))]
    for spec in triton_specs or [None]:
        tiles = None if spec is None else parse_tiles(spec, triton)
        out.append((f"triton {spec or 'default'}",
                    dict(implementation="triton", tiles=tiles, interpret=interpret)))
    for spec in mosaic_specs or [None]:
        tiles = None if spec is None else parse_tiles(spec, mosaic_gpu)
        out.append((f"mosaic_gpu {spec or 'default'}",
                    dict(implementation="mosaic_gpu", tiles=tiles)))
    return out


def short_error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}" if str(e) else type(e).__name__


def random_group_sizes(m: int, groups: int, seed: int = 0):
    """Sizes summing to m, multinomial around ``m / groups`` (a balanced router's load)."""
    return jnp.asarray(np.random.default_rng(seed).multinomial(m, [1 / groups] * groups),
                       jnp.int32)


def fwd_bwd(**kwargs):
    """``(lhs, rhs, sizes, dout) -> (out, d_lhs, d_rhs)``, jitted."""

    def run(lhs, rhs, sizes, dout):
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, **kwargs), lhs, rhs)
        return (out, *vjp(dout.astype(out.dtype)))

    return jax.jit(run)


def max_errors(got, want) -> str:
    """Max abs error of each output over the largest reference magnitude."""
    errs = []
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        errs.append(f"{np.abs(g - w).max():.3g}/{np.abs(w).max():.3g}")
    return " ".join(errs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=32768)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=2304)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--tiles", nargs="*", default=[], help="Triton tile settings")
    p.add_argument("--mosaic-tiles", nargs="*", default=[], help="Hopper kernels' tile settings")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="Triton in interpret mode (CPU smoke)")
    a = p.parse_args()
    dt = jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (a.m, a.k), jnp.float32).astype(dt)
    rhs = (jax.random.normal(keys[1], (a.groups, a.k, a.n), jnp.float32) / a.k**0.5).astype(dt)
    dout = jax.random.normal(keys[2], (a.m, a.n), jnp.float32).astype(dt)
    sizes = random_group_sizes(a.m, a.groups)
    f32 = lambda x: x.astype(jnp.float32)
    want = fwd_bwd(implementation="xla", preferred_element_type=jnp.float32)(
        f32(lhs), f32(rhs), sizes, f32(dout))

    flops = 2.0 * a.m * a.k * a.n
    dense_w = rhs[0]
    dense_fwd = jax.jit(lambda x, w: x @ w)

    @jax.jit
    def dense_both(x, w, d):
        out, vjp = jax.vjp(jnp.matmul, x, w)
        return (out, *vjp(d))

    dense = (time_ms(dense_fwd, lhs, dense_w, iters=a.iters),
             time_ms(dense_both, lhs, dense_w, dout, iters=a.iters))
    rows = [["dense matmul, same FLOPs", "", f"{dense[0]:.3f}", f"{flops / dense[0] / 1e9:.0f}",
             "1.00x", f"{dense[1]:.3f}", f"{3 * flops / dense[1] / 1e9:.0f}", "1.00x"]]
    print(device_description())
    print(f"m {a.m}, k {a.k}, n {a.n}, {a.groups} groups (sizes {np.asarray(sizes).tolist()}), "
          f"bfloat16; errors: max |got - ragged_dot float32| / max |ref| of out, d_lhs, d_rhs")
    for label, kwargs in variants(a.tiles, a.mosaic_tiles, a.interpret):
        try:
            both = fwd_bwd(**kwargs)
            err = max_errors(both(lhs, rhs, sizes, dout), want)
            fwd = jax.jit(lambda x, w, s, kw=kwargs: grouped_matmul(x, w, s, **kw))
            ms_fwd = time_ms(fwd, lhs, rhs, sizes, iters=a.iters)
            ms_both = time_ms(both, lhs, rhs, sizes, dout, iters=a.iters)
        except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
            rows.append([label, short_error(e), "", "", "", "", "", ""])
            print(f"{label}: {short_error(e)}", flush=True)
            continue
        rows.append([label, err, f"{ms_fwd:.3f}", f"{flops / ms_fwd / 1e9:.0f}",
                     f"{ms_fwd / dense[0]:.2f}x", f"{ms_both:.3f}",
                     f"{3 * flops / ms_both / 1e9:.0f}", f"{ms_both / dense[1]:.2f}x"])
        print(f"{label}: fwd {ms_fwd:.3f} ms, fwd+bwd {ms_both:.3f} ms, errors {err}", flush=True)
    print_table(["implementation", "max err (out d_lhs d_rhs)", "fwd ms", "fwd TFLOP/s",
                 "fwd vs dense", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd vs dense"], rows)


if __name__ == "__main__":
    main()
