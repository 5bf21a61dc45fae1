"""The ``"xla"`` implementation of SSD: the chunked "state-space duality" form of the Mamba-2 paper
in plain JAX (einsums in the input dtype, float32 accumulation; gradients by JAX autodiff).

Inside a chunk of ``chunk_size`` steps the recurrence is an attention-like product, materialised as
``(batch, chunks, heads, chunk, chunk)`` decay and score tensors as the paper's minimal
implementation does; a ``lax.scan`` carries the state across chunks. Memory is linear in length
for a fixed chunk; it is exact (the sequential ``reference.ssd`` is its test oracle) and far
faster than a sequential scan, so it is the fallback of ``"auto"`` and the baseline of
``scripts/bench_ssd.py``. Packed-document resets mask the decays exactly as ``common`` says.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._ssm_math import discretize_dt
from pallas_kernels.ssd.reference import initial_state_f32

f32 = jnp.float32


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=256,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
    reset=None,
):
    """Chunked SSD in plain JAX; same arguments and results as ``api.ssd``."""
    batch, length, heads, head_dim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    Q = chunk_size
    n_chunks = -(-length // Q)
    pad = n_chunks * Q - length
    dt = discretize_dt(dt, dt_bias, dt_softplus)
    padt = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    # Padded steps: dt = 0 (decay 1, no input) and x = B = C = 0.
    xc = padt(x).reshape(batch, n_chunks, Q, heads, head_dim)
    dtc = padt(dt).reshape(batch, n_chunks, Q, heads)
    rep = heads // n_groups
    Bc = padt(B).reshape(batch, n_chunks, Q, n_groups, d_state)
    Cc = padt(C).reshape(batch, n_chunks, Q, n_groups, d_state)
    a = dtc * A.astype(f32)  # (b, c, Q, h)
    s = jnp.cumsum(a, axis=2)
    s_total = s[:, :, -1]  # (b, c, h)
    mask = jnp.tril(jnp.ones((Q, Q), bool))[None, None, :, :, None]
    # Decay masks (common.py): k counts the resets in the chunk up to each step.
    keep_in = keep_out = keep_total = True
    if reset is not None:
        k = jnp.cumsum(padt(reset.astype(jnp.int32)).reshape(batch, n_chunks, Q), axis=2)
        mask = mask & (k[:, :, :, None] == k[:, :, None, :])[..., None]
        keep_in = (k == 0)[..., None]  # (b, c, Q, 1)
        keep_out = (k == k[:, :, -1:])[..., None]
        keep_total = (k[:, :, -1] == 0)[..., None]  # (b, c, 1)
    diff = s[:, :, :, None, :] - s[:, :, None, :, :]  # (b, c, t, u, h)
    L = jnp.exp(jnp.where(mask, diff, -jnp.inf))
    cdt = x.dtype
    xdt = (xc.astype(f32) * dtc[..., None]).astype(cdt)
    CB = jnp.einsum("bctgn,bcugn->bcgtu", Cc, Bc, preferred_element_type=f32)
    CB = jnp.repeat(CB, rep, axis=2)  # (b, c, h, t, u)
    M = (jnp.moveaxis(L, -1, 2) * CB).astype(cdt)
    y = jnp.einsum("bchtu,bcuhp->bcthp", M, xdt, preferred_element_type=f32)

    # Each chunk's own contribution to the state leaving it, then a scan over chunks.
    decay_out = jnp.where(keep_out, jnp.exp(s_total[:, :, None, :] - s), 0.0)  # (b, c, Q, h)
    Bh = jnp.repeat(Bc, rep, axis=3)
    Ch = jnp.repeat(Cc, rep, axis=3)
    states = jnp.einsum(
        "bcuhp,bcuhn->bchpn", (xdt.astype(f32) * decay_out[..., None]).astype(cdt), Bh,
        preferred_element_type=f32,
    )
    h0 = initial_state_f32(initial_state, x, d_state)

    def carry(h, inputs):
        st, tot = inputs
        return jnp.exp(tot)[..., None, None] * h + st, h

    h_final, h_in = jax.lax.scan(
        carry, h0, (jnp.moveaxis(states, 1, 0), jnp.moveaxis(jnp.where(keep_total, s_total,
                                                                         -jnp.inf), 1, 0))
    )
    h_in = jnp.moveaxis(h_in, 0, 1)  # (b, c, h, p, n): state entering each chunk
    y = y + jnp.where(keep_in, jnp.exp(s), 0.0)[..., None] * jnp.einsum(
        "bcthn,bchpn->bcthp", Ch, h_in.astype(cdt), preferred_element_type=f32
    )
    y = y.reshape(batch, n_chunks * Q, heads, head_dim)[:, :length]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(x.dtype)
    return (y, h_final) if return_final_state else y
