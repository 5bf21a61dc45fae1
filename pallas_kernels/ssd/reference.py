"""The specification of the Mamba-2 SSD (state-space duality) layer, in plain JAX.

For every batch row, head ``h`` (group ``g = h // (heads // n_groups)``), head_dim index ``p`` and
state index ``n``::

    dt_t   = softplus(dt_t + dt_bias[h])       (or dt_t + dt_bias[h] without softplus)
    H_t    = exp(dt_t * A[h]) * H_{t-1} + dt_t * x_t[h] (outer) B_t[g]      H: (head_dim, d_state)
    y_t    = H_t . C_t[g] + D[h] * x_t[h]
    out_t  = y_t * silu(z_t)                   (only when z is given)

With ``reset`` (packed documents), ``H_{t-1}`` is dropped (taken as zero) at every step t that
starts a document.

``ssd`` runs this as a sequential ``lax.scan`` in float32: obviously right, the thing every
implementation is tested against, the chunked plain-JAX one (``xla.py``, ``implementation="xla"``)
included. It takes gradients by JAX autodiff.
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


def initial_state_f32(initial_state, x, d_state):
    """The float32 state before step 0 (zeros when None)."""
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
    reset=None,
):
    """Sequential float32 SSD; same arguments and results as ``api.ssd`` (no chunking)."""
    dt = discretize_dt(dt, dt_bias, dt_softplus)
    A, D = _f32(A), _f32(D)
    h0 = initial_state_f32(initial_state, x, B.shape[-1])
    y, h_final = scan_steps(step, h0, x, dt, A, B, C, D, z, reset)
    y = y.astype(x.dtype)
    return (y, h_final) if return_final_state else y
