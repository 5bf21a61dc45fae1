"""Elementwise math that the selective scan (Mamba-1) and SSD (Mamba-2) share.

Plain jnp, so the references and every kernel (Triton, Mosaic-TPU) apply the same step-size and
gating arithmetic; one definition keeps them from drifting apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softplus(x):
    """``log(1 + exp(x))``, linear above 20 where the two agree in float32 (as Mamba does)."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def silu(z):
    return z * sigmoid(z)


def gate_and_grad(y, z):
    """``y * silu(z)`` and the factors ``d(out)/dy = silu(z)``, ``d(out)/dz = y * silu'(z)``."""
    s = sigmoid(z)
    silu_z = z * s
    return y * silu_z, silu_z, y * s * (1.0 + z * (1.0 - s))


def discretize_dt(dt, bias, use_softplus):
    """The step size actually used, float32: ``dt (+ bias)``, through softplus when asked."""
    dt = dt.astype(jnp.float32)
    if bias is not None:
        dt = dt + bias.astype(jnp.float32)
    return softplus(dt) if use_softplus else dt


def scan_steps(step, h0, x, dt, A, B, C, D, z, reset=None):
    """Run a reference ``step(h, x_t, dt_t, A, B_t, C_t, D, z_t) -> (y_t, h)`` over time with
    ``lax.scan``; batch-major inputs (``dt`` already discretized). ``reset (batch, length)`` bool
    drops the state before the steps where it is set. Returns float32 ``(y, h_final)``."""
    time_major = lambda v: None if v is None else jnp.moveaxis(v.astype(jnp.float32), 1, 0)
    xs = (time_major(x), time_major(dt), time_major(B), time_major(C), time_major(z),
          time_major(reset))

    def body(h, inputs):
        x_t, dt_t, B_t, C_t, z_t, reset_t = inputs
        if reset_t is not None:
            h = jnp.where(reset_t.reshape(reset_t.shape + (1,) * (h.ndim - 1)) > 0, 0.0, h)
        y_t, h = step(h, x_t, dt_t, A, B_t, C_t, D, z_t)
        return h, y_t

    h_final, y = jax.lax.scan(body, h0, xs)
    return jnp.moveaxis(y, 0, 1), h_final
