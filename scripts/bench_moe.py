"""The MoE layer alone on the GPU: forward + backward time of the dropless grouped-matmul layer
(``layers.moe.MoeMlp``, ``jax.lax.ragged_dot``) beside the naive dense einsum over all experts,
the capacity-factor layer, and a dense SwiGLU MLP with the same active FLOPs (``d_ff = top_k *
expert d_ff``), in one run; the last column is each one's time over the dense MLP's.

    PYTHONPATH=src:. python3 scripts/bench_moe.py [--tokens 16384] [--d-model 1024] ...
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax.core import meta

from meshlm.layers import Mlp
from meshlm.layers.moe import MoeMlp
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
    cases = {
        "dropless (ragged_dot)": (lambda p, x: moe.apply({"params": p}, x), moe_params),
        "naive: all experts": (naive, moe_params),
        **({f"capacity factor {a.capacity_factor}": (
            lambda p, x: moe.clone(capacity_factor=a.capacity_factor).apply({"params": p}, x),
            moe_params)} if a.capacity_factor > 0 else {}),
        "dense MLP, same active FLOPs": (lambda p, x: dense.apply({"params": p}, x), dense_params),
    }
    active = 6 * a.tokens * a.top_k * 3 * a.d_model * a.d_ff  # fwd + bwd matmul FLOPs
    rows = []
    for name, (fn, params) in cases.items():
        step = jax.jit(jax.grad(lambda p, x, fn=fn: jnp.sum(fn(p, x).astype(jnp.float32)),
                                argnums=(0, 1)))
        ms = time_ms(step, params, x, iters=a.iters)
        rows.append([name, f"{ms:.2f}", f"{active / ms / 1e9:.0f}", f"{a.tokens / ms / 1e3:.2f}"])
    dense_ms = float(rows[-1][1])
    for r in rows:
        r.append(f"{float(r[1]) / dense_ms:.2f}x")
    print(device_description())
    print(f"tokens {a.tokens}, d_model {a.d_model}, expert d_ff {a.d_ff}, {a.experts} experts, "
          f"top-{a.top_k}, bfloat16, forward + backward")
    print_table(["layer", "ms", "active TFLOP/s", "Mtokens/s", "vs dense MLP"], rows)


if __name__ == "__main__":
    main()
