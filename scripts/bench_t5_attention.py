"""T5's attention with its relative position bias, as the model runs it (XLA: float32 scores plus
a materialised ``(batch, heads, q, k)`` bias), beside the flash-attention kernels at the same
shapes without the bias: the time a kernel computing the bias inside (from per-row positions and
the bucket table) could at best take. One row per attention kind of a T5 step (encoder self,
decoder self, cross), forward + backward (gradients w.r.t. q, k, v and the bias table), and
the per-step total over the layers; this decides whether in-kernel bias support pays. The row
"flash triton + relative bias" is the Triton kernel computing the bias inside
(``flash_attention(relative_bias=RelativeBias(...))``, what ``model.attention: auto`` runs on a
GPU; cross-attention has no position bias, so its row there is the kernel with segment ids).

    PYTHONPATH=src:. python3 scripts/bench_t5_attention.py [--batch 16 --heads 12 --d-kv 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax.core import meta

from meshlm.layers.relative_position import RelativePositionBias
from pallas_kernels.flash_attention import RelativeBias, flash_attention
from scripts.benchlib import device_description, print_table, time_ms

MASKED = -1e9


def t5_xla(q, k, v, table_params, module, q_pos, k_pos, q_seg, k_seg, causal):
    """The model's computation (models/t5.py: T5Attention with its bias; ``module`` None:
    cross-attention, which has no position bias)."""
    bias = 0.0 if module is None else module.apply(table_params, q_pos, k_pos)
    mask = q_seg[:, :, None] == k_seg[:, None, :]
    if causal:
        mask &= jnp.arange(q.shape[1])[:, None] >= jnp.arange(k.shape[1])[None, :]
    bias = bias + jnp.where(mask, 0.0, MASKED)[:, None]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(q.dtype), v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-kv", type=int, default=64)
    p.add_argument("--enc-len", type=int, default=512)
    p.add_argument("--dec-len", type=int, default=114)
    p.add_argument("--layers", type=int, default=12, help="layers per stack")
    p.add_argument("--impls", default="auto,cudnn", help="flash_attention implementations")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    dt = jnp.bfloat16
    kinds = {  # name: (q_len, kv_len, causal, bidirectional bias or None for cross-attention)
        "encoder self": (a.enc_len, a.enc_len, False, True),
        "decoder self": (a.dec_len, a.dec_len, True, False),
        "cross": (a.dec_len, a.enc_len, False, None),
    }
    rows, totals = [], {}
    for name, (lq, lk, causal, bidirectional) in kinds.items():
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (a.batch, lq, a.heads, a.d_kv), dt)
        k = jax.random.normal(keys[1], (a.batch, lk, a.heads, a.d_kv), dt)
        v = jax.random.normal(keys[2], (a.batch, lk, a.heads, a.d_kv), dt)
        # two packed documents per row, positions restarting in each (as span corruption packs)
        q_seg = 1 + (jnp.arange(lq) >= lq // 2).astype(jnp.int32)[None].repeat(a.batch, 0)
        k_seg = 1 + (jnp.arange(lk) >= lk // 2).astype(jnp.int32)[None].repeat(a.batch, 0)
        q_pos = jnp.arange(lq)[None] - (q_seg - 1) * (lq // 2)
        k_pos = jnp.arange(lk)[None] - (k_seg - 1) * (lk // 2)
        if bidirectional is None:  # cross-attention has no position bias
            module, table = None, None
        else:
            module = RelativePositionBias(a.heads, bidirectional=bidirectional)
            table = module.init(keys[3], q_pos, k_pos)
        cases = {"xla + bias (the model)": lambda q, k, v, t, module=module: t5_xla(
            q, k, v, t, module, q_pos, k_pos, q_seg, k_seg, causal)}

        def with_bias(q, k, v, t, module=module):
            relative = None if module is None else RelativeBias(
                meta.unbox(t)["params"]["embedding"], q_pos, k_pos, module.bidirectional,
                module.max_distance)
            return flash_attention(q, k, v, causal=causal, q_segment_ids=q_seg,
                                   kv_segment_ids=k_seg, relative_bias=relative, scale=1.0,
                                   implementation="triton")

        cases["flash triton + relative bias"] = with_bias
        for impl in a.impls.split(","):
            cases[f"flash {impl}, no bias"] = lambda q, k, v, t, impl=impl: flash_attention(
                q, k, v, causal=causal, q_segment_ids=q_seg, kv_segment_ids=k_seg,
                implementation=impl)
        for label, fn in cases.items():
            step = jax.jit(jax.grad(
                lambda q, k, v, t, fn=fn: jnp.sum(fn(q, k, v, t).astype(jnp.float32)),
                argnums=(0, 1, 2, 3) if table is not None else (0, 1, 2)))
            try:
                ms = time_ms(step, q, k, v, table, iters=a.iters)
                grads = step(q, k, v, table)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                rows.append([name, label, f"{type(e).__name__}: {str(e)[:80]}", "", ""])
                continue
            if label.startswith("xla"):
                want = grads
            # the same computation as the model's: its gradients agree up to bfloat16 rounding
            error = _max_rel_error(grads, want) if "relative bias" in label else ""
            per_step = ms * a.layers
            totals[label] = totals.get(label, 0.0) + per_step
            rows.append([name, label, f"{ms:.3f}", f"{per_step:.2f}", error])
    print(device_description())
    print(f"batch {a.batch}, heads {a.heads} x {a.d_kv}, encoder {a.enc_len}, decoder "
          f"{a.dec_len}, {a.layers} layers per stack, bfloat16, forward + backward")
    for label, total in totals.items():
        rows.append(["all three kinds", label, "", f"{total:.2f}", ""])
    print_table(["attention", "implementation", "ms per call", "ms per step",
                 "grads vs the model's (max rel.)"], rows)


def _max_rel_error(got, want) -> str:
    """Max over gradient leaves of max |got - want| / max |want|."""
    errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                  / jnp.max(jnp.abs(w.astype(jnp.float32))))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    return f"{max(errs):.2e}"


if __name__ == "__main__":
    main()
