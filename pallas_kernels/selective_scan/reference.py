"""The specification of the Mamba-1 selective scan (S6): a sequential ``lax.scan`` in float32.

For every batch row, channel ``c`` (of ``d_inner``) and state index ``n`` (of ``d_state``)::

    dt_t   = softplus(delta_t + dt_bias)      (or delta_t + dt_bias without softplus)
    h_t    = exp(dt_t * A[c, n]) * h_{t-1} + dt_t * B_t[g, n] * u_t
    y_t    = sum_n C_t[g, n] * h_t + D[c] * u_t
    out_t  = y_t * silu(z_t)                     (only when z is given)

where ``g = c // (d_inner // n_groups)`` is the group whose ``B``/``C`` the channel reads. At a
``reset`` step (a packed document's start) ``h_{t-1}`` is replaced by zeros. Every
Pallas lowering is tested against these functions; ``implementation="xla"`` runs them directly
(gradients by JAX autodiff through the scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._ssm_math import discretize_dt, scan_steps


def _per_channel(x, d_inner):
    """Expand group-shared ``(..., n_groups, d_state)`` to per-channel ``(..., d_inner, d_state)``."""
    return jnp.repeat(x, d_inner // x.shape[-2], axis=-2)


def step(state, u, dt, A, B, C, D=None, z=None):
    """One recurrence step on float32 values; ``dt`` is already discretized.

    Shapes: ``state (..., d_inner, d_state)``, ``u, dt, z (..., d_inner)``,
    ``B, C (..., n_groups, d_state)``. Returns ``(out, new_state)``, ``out`` in float32.
    """
    d_inner = u.shape[-1]
    decay = jnp.exp(dt[..., None] * A)
    state = decay * state + (dt * u)[..., None] * _per_channel(B, d_inner)
    y = jnp.sum(state * _per_channel(C, d_inner), axis=-1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * jax.nn.silu(z)
    return y, state


def selective_scan(
    u,
    delta,
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
    """Sequential float32 selective scan; same arguments and results as ``api.selective_scan``."""
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    batch, _, d_inner = u.shape
    d_state = A.shape[-1]
    dt = discretize_dt(delta, dt_bias, dt_softplus)
    A, D = f32(A), f32(D)
    h0 = (
        jnp.zeros((batch, d_inner, d_state), jnp.float32)
        if initial_state is None
        else f32(initial_state)
    )
    y, h_final = scan_steps(step, h0, u, dt, A, B, C, D, z, reset)
    y = y.astype(u.dtype)
    return (y, h_final) if return_final_state else y
