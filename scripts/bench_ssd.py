"""Benchmark the Mamba-2 SSD kernels against the plain-JAX chunked SSD, timed in the same run.

Shapes are Mamba-2-1.3B-like: 64 heads of head_dim 64, d_state 128, one group, bfloat16, with
D, dt_bias and softplus (as the Mamba-2 layer calls it), ~16k tokens per call (batch * length).

    PYTHONPATH=src:. python3 scripts/bench_ssd.py [--lengths 2048 8192] [--tokens 16384]
        [--variants default 32x64x4 ...] [--no-check] [--documents 512] [--unfused] [--kernels]

First a correctness check on the device (float32 sequential reference, odd length, groups, gate,
initial state, packed documents; outputs and every gradient; each tile variant in float32), then
for each length: ms forward and forward+backward (a VJP with its forward's outputs) of every
Pallas lowering of this backend and every tile variant (``default``: the device's default tiles;
or ``block_t x block_p x num_warps ...``), beside the chunked plain-JAX SSD, and the speed-up.
``--documents N`` packs documents of N steps on average (``reset=`` at random starts, as a packed
training batch passes them); ``--unfused`` calls without D, dt_bias and softplus (dt discretized
outside); ``--kernels`` prints each kernel's device time per forward+backward call (a trace).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from pallas_kernels.ssd import reference, ssd, triton  # noqa: E402

HEADS, HEAD_DIM, D_STATE, GROUPS, CHUNK = 64, 64, 128, 1, 256


def _inputs(key, batch, length, heads, head_dim, groups, d_state, dtype, *, gate=False,
            state=False, documents=0, unfused=False):
    k = jax.random.split(key, 10)
    n = lambda i, shape, dt=jnp.float32: jax.random.normal(k[i], shape, jnp.float32).astype(dt)
    args = dict(
        x=n(0, (batch, length, heads, head_dim), dtype),
        dt=0.5 * n(1, (batch, length, heads)) - 1.0,
        A=-jnp.exp(0.5 * n(2, (heads,))),
        B=n(3, (batch, length, groups, d_state), dtype),
        C=n(4, (batch, length, groups, d_state), dtype),
        D=n(5, (heads,)),
        dt_bias=0.3 * n(6, (heads,)),
    )
    if gate:
        args["z"] = n(7, (batch, length, heads, head_dim), dtype)
    if state:
        args["initial_state"] = n(8, (batch, heads, head_dim, d_state))
    if documents:
        args["reset"] = jax.random.uniform(k[9], (batch, length)) < 1.0 / documents
    if unfused:
        args["dt"] = jax.nn.softplus(args["dt"] + args.pop("dt_bias"))
        del args["D"]
    return args


def _fn(impl, names, **opts):
    """``f(*arrays) -> (y, final_state)`` for one implementation (``"xla"``: the chunked plain-JAX
    form; ``"reference"``: the sequential float32 scan); softplus with ``dt_bias`` (fused)."""

    def f(*vals):
        kw = dict(zip(names, vals))
        pos = [kw.pop(n) for n in ("x", "dt", "A", "B", "C")]
        fused = "dt_bias" in kw
        if impl == "reference":
            return reference.ssd(*pos, **kw, dt_softplus=fused, return_final_state=True)
        return ssd(*pos, **kw, chunk_size=CHUNK, dt_softplus=fused, return_final_state=True,
                   implementation=impl, **opts)

    return f


def _fwd_and_vjp(f):
    fwd = jax.jit(lambda *a: f(*a)[0])

    @jax.jit
    def fwd_bwd(dy, *a):
        n = sum(not jnp.issubdtype(v.dtype, jnp.bool_) for v in a)  # resets come last
        (y, h), vjp = jax.vjp(lambda *d: f(*d, *a[n:]), *a[:n])
        return y, vjp((dy, jnp.zeros_like(h)))  # y too: a train step's forward writes it

    return fwd, fwd_bwd


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(impl, dtype, tol, length=1001, **opts):
    """Outputs and all gradients against the float32 sequential reference; True if within tol."""
    args = _inputs(jax.random.PRNGKey(int(time.time())), 2, length, 8, HEAD_DIM, 2, D_STATE, dtype,
                   gate=True, state=True, documents=200)
    names = list(args)
    vals = [args[n] for n in names]
    dy = jax.random.normal(jax.random.PRNGKey(7), args["x"].shape).astype(dtype)
    errs = {}
    outs = {}
    for name in (impl, "reference"):
        f = _fn(name, names, **(opts if name == impl else {}))
        outs[name] = (jax.jit(f)(*vals), _fwd_and_vjp(f)[1](dy, *vals)[1])
    (y, h), grads = outs[impl]
    (y_ref, h_ref), grads_ref = outs["reference"]
    errs["y"], errs["state"] = _rel(y, y_ref), _rel(h, h_ref)
    for n, g, r in zip(names, grads, grads_ref):
        errs["d" + n] = _rel(g, r)
    worst = max(errs.values())
    status = "ok" if worst < tol else "FAIL"
    print(f"check {impl} {jnp.dtype(dtype).name}: max rel err {worst:.2e} (tol {tol}) {status}")
    print("   " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    return worst < tol


def _tiles(spec: str):
    """``"default"`` -> None; ``"64x64x4..."`` -> ``triton.Tiles`` of those fields in order."""
    if spec == "default":
        return None
    fields = dataclasses.fields(triton.Tiles)
    values = [int(v) for v in spec.split("x")]
    return triton.Tiles(*(bool(v) if isinstance(f.default, bool) else v
                          for f, v in zip(fields, values)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=HEADS, help="24: Mamba-2 130M's layer")
    p.add_argument("--variants", nargs="+", default=["default"],
                   help="Triton tiles: 'default' (the device's DEFAULT_TILES, capped to the "
                        "call) or the fields of ssd.triton.Tiles in order, switches as 0/1: "
                        "block_t x block_p x num_warps [x scan_block_p [x scan_stages "
                        "[x grads_warps [x group_bc [x bc_warps [x bc_stages [x bc_splits "
                        "[x fuse_state_side]]]]]]]]; "
                        "each non-default variant is also checked in float32")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--documents", type=int, default=0,
                   help="mean packed-document length (reset=); 0: one document per row")
    p.add_argument("--unfused", action="store_true", help="no D, dt_bias, softplus in the call")
    p.add_argument("--kernels", action="store_true",
                   help="per-kernel device ms of each Pallas row's forward+backward (a trace)")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="skip remaining variants once this much time has passed")
    a = p.parse_args(argv)
    start = time.time()
    backend = jax.default_backend()
    impls = {"gpu": ["triton"], "tpu": ["tpu"]}.get(backend, [])
    print(f"device: {benchlib.device_description()}", flush=True)
    variants = {s: _tiles(s) for s in a.variants}
    if not a.no_check:
        for impl in impls:
            check(impl, jnp.float32, 2e-2)  # tf32 products on the GPU
            check(impl, jnp.bfloat16, 5e-2)
            for name, tiles in list(variants.items()) if impl == "triton" else []:
                if tiles is not None:
                    print(f"variant {name}:", end=" ")
                    try:
                        check(impl, jnp.float32, 2e-2, tiles=tiles)
                    except Exception as e:  # noqa: BLE001 - e.g. over the shared memory: drop it
                        print(f"dropped: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        del variants[name]
    rows = []
    for length in a.lengths:
        batch = max(1, a.tokens // length)
        args = _inputs(jax.random.PRNGKey(length), batch, length, a.heads, HEAD_DIM, GROUPS,
                       D_STATE, jnp.bfloat16, documents=a.documents, unfused=a.unfused)
        names, vals = list(args), list(args.values())
        dy = jax.random.normal(jax.random.PRNGKey(1), args["x"].shape).astype(jnp.bfloat16)
        base_fwd, base_bwd = _fwd_and_vjp(_fn("xla", names))
        t_base_fwd = benchlib.time_ms(base_fwd, *vals, iters=a.iters)
        t_base_bwd = benchlib.time_ms(base_bwd, dy, *vals, iters=a.iters)
        y_base = base_fwd(*vals)
        rows.append([length, batch, f"plain-JAX chunked (Q={CHUNK})", t_base_fwd, t_base_bwd,
                     1.0, 1.0, "-"])
        print(rows[-1], flush=True)
        for impl in impls:
            for name, tiles in variants.items() if impl == "triton" else [("default", None)]:
                label = f"{impl} {name}"
                if time.time() - start > a.budget_s:
                    print(f"budget: skipping {label} at {length}", flush=True)
                    continue
                opts = dict(tiles=tiles)
                try:
                    fwd, fwd_bwd = _fwd_and_vjp(_fn(impl, names, **opts))
                    t_fwd = benchlib.time_ms(fwd, *vals, iters=a.iters)
                    t_bwd = benchlib.time_ms(fwd_bwd, dy, *vals, iters=a.iters)
                    err = _rel(fwd(*vals), y_base)
                except Exception as e:  # noqa: BLE001 - report the variant and go on
                    print(f"{label} at {length}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append([length, batch, label, t_fwd, t_bwd, t_base_fwd / t_fwd,
                             t_base_bwd / t_bwd, f"{err:.1e}"])
                print(rows[-1], flush=True)
                if a.kernels:
                    for name, ms in benchlib.kernel_ms(fwd_bwd, dy, *vals, iters=a.iters)[1]:
                        print(f"    {ms:8.3f} ms  {name}", flush=True)
    fused = "no D/dt_bias/softplus" if a.unfused else "D + dt_bias + softplus"
    docs = f"; documents of ~{a.documents} steps (reset=)" if a.documents else ""
    print(f"\n{benchlib.device_description()}; heads {a.heads}, head_dim {HEAD_DIM}, d_state "
          f"{D_STATE}, groups {GROUPS}, bf16, {fused}; chunk_size {CHUNK}{docs}")
    return benchlib.print_table(
        ["length", "batch", "implementation", "fwd ms", "fwd+bwd ms", "fwd speed-up",
         "fwd+bwd speed-up", "y rel. diff vs chunked"],
        rows,
    )


if __name__ == "__main__":
    main()
