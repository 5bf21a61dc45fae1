"""The specification of the Mamba-2 SSD (state-space duality) layer, in plain JAX.

For every batch row, head ``h`` (group ``g = h // (heads // n_groups)``), head_dim index ``p`` and
state index ``n``::

    dt_t   = softplus(dt_t + dt_bias[h])       (or dt_t + dt_bias[h] without softplus)
    H_t    = exp(dt_t * A[h]) * H_{t-1} + dt_t * x_t[h] (outer) B_t[g]      H: (head_dim, d_state)
    y_t    = H_t . C_t[g] + D[h] * x_t[h]
    out_t  = y_t * silu(z_t)                   (only when z is given)

``ssd`` runs this as a sequential ``lax.scan`` in float32: obviously right, the thing every
kernel is tested against (``implementation="xla"``). ``ssd_chunked`` is the same function in the
chunked "state-space duality" form of the Mamba-2 paper written with plain einsums (quadratic
attention-like products inside chunks, a scan over chunk states); it is the fast plain-JAX path
and the baseline of ``scripts/bench_ssd.py``. Both take gradients by JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._ssm_math import discretize_dt, scan_steps

f32 = jnp.float32


def _per_head(v, heads):
    """Group-shared ``(..., n_groups, d_state)`` -> per-head ``(..., heads, d_state)``."""
    return jnp.repeat(v, heads // v.shape[-2], axis=-2)


def step(state, x, dt, A, B, C, D=None, z=None):
    """One recurrence step on float32 values; ``dt`` is already discretized.

    Shapes: ``state (..., heads, head_dim, d_state)``, ``x, z (..., heads, head_dim)``,
    ``dt (..., heads)``, ``B, C (..., n_groups, d_state)``. Returns ``(y, new_state)``.
    """
    heads = x.shape[-2]
    B, C = _per_head(B, heads), _per_head(C, heads)
    decay = jnp.exp(dt * A)[..., None, None]
    state = decay * state + (dt[..., None] * x)[..., None] * B[..., None, :]
    y = jnp.einsum("...hpn,...hn->...hp", state, C)
    if D is not None:
        y = y + D[:, None] * x
    if z is not None:
        y = y * jax.nn.silu(z)
    return y, state


def _f32(v):
    return None if v is None else v.astype(f32)


def _initial_state(initial_state, x, d_state):
    batch, _, heads, head_dim = x.shape
    if initial_state is None:
        # zeros_like keeps x's shard_map varying-axes type, which the scan carry must match.
        return jnp.zeros_like(x, f32, shape=(batch, heads, head_dim, d_state))
    return initial_state.astype(f32)


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
):
    """Sequential float32 SSD; same arguments and results as ``api.ssd`` (no chunking)."""
    dt = discretize_dt(dt, dt_bias, dt_softplus)
    A, D = _f32(A), _f32(D)
    h0 = _initial_state(initial_state, x, B.shape[-1])
    y, h_final = scan_steps(step, h0, x, dt, A, B, C, D, z)
    y = y.astype(x.dtype)
    return (y, h_final) if return_final_state else y


def ssd_chunked(
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
):
    """Chunked SSD in plain JAX (einsums in the input dtype, float32 accumulation).

    Materialises ``(batch, chunks, heads, chunk, chunk)`` decay and score tensors, as the
    Mamba-2 paper's minimal implementation does; memory is linear in length for a fixed chunk.
    """
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
    mask = jnp.tril(jnp.ones((Q, Q), bool))
    diff = s[:, :, :, None, :] - s[:, :, None, :, :]  # (b, c, t, u, h)
    L = jnp.exp(jnp.where(mask[None, None, :, :, None], diff, -jnp.inf))
    cdt = x.dtype
    xdt = (xc.astype(f32) * dtc[..., None]).astype(cdt)
    CB = jnp.einsum("bctgn,bcugn->bcgtu", Cc, Bc, preferred_element_type=f32)
    CB = jnp.repeat(CB, rep, axis=2)  # (b, c, h, t, u)
    M = (jnp.moveaxis(L, -1, 2) * CB).astype(cdt)
    y = jnp.einsum("bchtu,bcuhp->bcthp", M, xdt, preferred_element_type=f32)

    # Each chunk's own contribution to the state leaving it, then a scan over chunks.
    decay_out = jnp.exp(s_total[:, :, None, :] - s)  # (b, c, Q, h)
    Bh = jnp.repeat(Bc, rep, axis=3)
    Ch = jnp.repeat(Cc, rep, axis=3)
    states = jnp.einsum(
        "bcuhp,bcuhn->bchpn", (xdt.astype(f32) * decay_out[..., None]).astype(cdt), Bh,
        preferred_element_type=f32,
    )
    h0 = _initial_state(initial_state, x, d_state)

    def carry(h, inputs):
        st, tot = inputs
        return jnp.exp(tot)[..., None, None] * h + st, h

    h_final, h_in = jax.lax.scan(
        carry, h0, (jnp.moveaxis(states, 1, 0), jnp.moveaxis(s_total, 1, 0))
    )
    h_in = jnp.moveaxis(h_in, 0, 1)  # (b, c, h, p, n): state entering each chunk
    y = y + jnp.exp(s)[..., None] * jnp.einsum(
        "bcthn,bchpn->bcthp", Ch, h_in.astype(cdt), preferred_element_type=f32
    )
    y = y.reshape(batch, n_chunks * Q, heads, head_dim)[:, :length]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(x.dtype)
    return (y, h_final) if return_final_state else y
