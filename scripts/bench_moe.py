"""The MoE layer alone on the GPU: forward + backward time of the dropless grouped-matmul layer
(``layers.moe.MoeMlp``) with each grouped-matmul implementation (``model.grouped_matmul``:
``jax.lax.ragged_dot``, the Triton kernels per ``--tiles`` setting, JAX's Hopper kernels) beside
the naive dense einsum over all experts, the capacity-factor layer, and a dense SwiGLU MLP with
the same active FLOPs (``d_ff = top_k * expert d_ff``), in one run; the last column is each one's
time over the dense MLP's. Each dropless row is first checked once against the float32
ragged_dot layer: the max abs error over every gradient (of the outputs' sum, w.r.t. the inputs
and parameters) over the largest reference magnitude (bfloat16 rounding alone shows).

    PYTHONPATH=src:. python3 scripts/bench_moe.py [--tokens 16384] [--d-model 1024] ...
        [--tiles 128,64,128,8,3 ...]   (Triton tiles: scripts/bench_grouped_matmul.py's format)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax.core import meta

from meshlm.layers import Mlp
from meshlm.layers.moe import MoeMlp
from pallas_kernels.grouped_matmul import triton as gmm_triton
from scripts.bench_grouped_matmul import parse_tiles, short_error
from scripts.benchlib import device_description, print_table, time_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2304)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="a row of the capacity-factor layer too (0: none)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiles", nargs="*", default=[],
                   help="Triton grouped-matmul tile settings (default: its device default)")
    p.add_argument("--implementations", nargs="*", default=["xla", "triton", "mosaic_gpu"],
                   help="grouped-matmul implementations of the dropless rows")
    p.add_argument("--profile", action="store_true",
                   help="also each row's device time per call (a jax.profiler trace, which does "
                        "not count launch gaps) and its top kernels")
    a = p.parse_args()
    dt = jnp.bfloat16
    x = jax.random.normal(jax.random.key(0), (1, a.tokens, a.d_model), dt)
    moe = MoeMlp(n_experts=a.experts, top_k=a.top_k, d_ff=a.d_ff, dtype=dt)
    dense = Mlp(d_ff=a.top_k * a.d_ff, kind="swiglu", use_bias=False, dtype=dt)

    def naive(params, x):
        """Every expert on every token, weighted by the (mostly zero) top-k weights."""
        t = x.reshape(-1, a.d_model)
        scores = jax.nn.softmax(t.astype(jnp.float32) @ params["router"])
        kth = jax.lax.top_k(scores, a.top_k)[0][:, -1:]
        w = jnp.where(scores >= kth, scores, 0.0)
        w = (w / jnp.sum(w, -1, keepdims=True)).astype(dt)
        h = (jax.nn.silu(jnp.einsum("td,edf->tef", t, params["wi_gate"].astype(dt)))
             * jnp.einsum("td,edf->tef", t, params["wi_up"].astype(dt)))
        out = jnp.einsum("tef,efd->ted", h, params["wo"].astype(dt))
        return jnp.einsum("ted,te->td", out, w).reshape(x.shape)

    moe_params = meta.unbox(moe.init(jax.random.key(1), x)["params"])
    dense_params = meta.unbox(dense.init(jax.random.key(2), x)["params"])
    # (label, grouped-matmul implementation, Triton tiles or None)
    dropless = [(f"dropless, {impl}" + (f" {spec}" if spec else ""), impl,
                 parse_tiles(spec, gmm_triton) if spec else None)
                for impl in a.implementations
                for spec in ((a.tiles or [None]) if impl == "triton" else [None])]
    cases = {
        **{label: (lambda p, x, impl=impl: moe.clone(grouped_matmul=impl).apply({"params": p}, x),
                   moe_params) for label, impl, _ in dropless},
        "naive: all experts": (naive, moe_params),
        **({f"capacity factor {a.capacity_factor}": (
            lambda p, x: moe.clone(capacity_factor=a.capacity_factor).apply({"params": p}, x),
            moe_params)} if a.capacity_factor > 0 else {}),
        "dense MLP, same active FLOPs": (lambda p, x: dense.apply({"params": p}, x), dense_params),
    }
    active = 6 * a.tokens * a.top_k * 3 * a.d_model * a.d_ff  # fwd + bwd matmul FLOPs
    # The check's reference: the ragged_dot layer in float32 on the same (rounded) inputs.
    reference = moe.clone(grouped_matmul="xla", dtype=jnp.float32)
    want = grads_of(lambda p, x: reference.apply({"params": p}, x))(
        moe_params, x.astype(jnp.float32))
    tiles_of = {label: tiles for label, _, tiles in dropless}
    default_triton = gmm_triton.DEFAULT_TILES
    rows = []
    for name, (fn, params) in cases.items():
        # The layer takes the Triton kernels' device default: set it to this row's tiles.
        gmm_triton.DEFAULT_TILES = ({"": tiles_of[name]} if tiles_of.get(name)
                                    else default_triton)
        step = grads_of(fn)
        try:
            if name in tiles_of:
                print(f"{name}: max error {max_error(step(params, x), want)}", flush=True)
            ms = time_ms(step, params, x, iters=a.iters)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
            print(f"{name}: {short_error(e)}", flush=True)
            continue
        rows.append([name, f"{ms:.2f}", f"{active / ms / 1e9:.0f}", f"{a.tokens / ms / 1e3:.2f}"])
        if a.profile:
            rows[-1].append(f"{device_ms(step, params, x, name, a.iters):.2f}")
    dense_ms = float(rows[-1][1])
    for r in rows:
        r.append(f"{float(r[1]) / dense_ms:.2f}x")
        if a.profile:
            r.append(f"{float(r[4]) / float(rows[-1][4]):.2f}x")
    print(device_description())
    print(f"tokens {a.tokens}, d_model {a.d_model}, expert d_ff {a.d_ff}, {a.experts} experts, "
          f"top-{a.top_k}, bfloat16, forward + backward")
    print_table(["layer", "ms", "active TFLOP/s", "Mtokens/s"]
                + (["device ms"] if a.profile else []) + ["vs dense MLP"]
                + (["device vs dense"] if a.profile else []), rows)


def device_ms(step, params, x, name: str, calls: int) -> float:
    """Kernel time per call of ``step`` from a profiler trace; prints its top kernels."""
    from scripts.profile_trace import trace_device_time

    def run():
        for _ in range(calls):
            out = step(params, x)
        jax.block_until_ready(out)

    try:
        trace = trace_device_time(run, calls)
    except RuntimeError as e:  # no GPU events (a CPU run)
        print(f"--- {name}: {e}", flush=True)
        return float("nan")
    print(f"--- {name}\n{trace.report(12)}", flush=True)
    return trace.to_json()["busy_ms"]


def grads_of(fn):
    """The jitted gradient of ``sum(fn(params, x))`` w.r.t. params and x."""
    return jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x).astype(jnp.float32)), argnums=(0, 1)))


def max_error(got, want) -> str:
    """Max abs error over every gradient leaf, over the largest reference magnitude."""
    err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
              for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return f"{err:.3g} / {max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want)):.3g}"


if __name__ == "__main__":
    main()
