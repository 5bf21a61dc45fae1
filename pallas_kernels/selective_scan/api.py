"""``selective_scan`` and ``selective_scan_step``: validation, choice of lowering, custom VJP.

The lowerings (``triton``, ``tpu``) are imported lazily: one whose module fails to import is
skipped by ``"auto"`` and reported by a ``ValueError`` when named; the policy is
``_api.Dispatch``'s, the same for every op. There is no Mosaic-GPU lowering:
the scan is a per-element recurrence with no matrix product, so wgmma/TMA have nothing to
accelerate that the Triton kernel's coalesced loads do not already reach.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._api import Dispatch, Lowering, checkpointed_scan, load_lowering, shape_of
from pallas_kernels.selective_scan import reference
from pallas_kernels.selective_scan.common import Call

# Fastest first: "auto" takes the first that runs natively on the target and supports the call.
DISPATCH = Dispatch("pallas_kernels.selective_scan", (
    Lowering("triton", "gpu"),
    Lowering("tpu", "tpu"),
))
IMPLEMENTATIONS = DISPATCH.names


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
    dt_softplus: bool = False,
    initial_state=None,
    return_final_state: bool = False,
    reset=None,
    implementation: str = "auto",
    interpret: bool = False,
    tiles=None,
):
    """The Mamba-1 selective scan (S6) with the ``D`` skip and ``silu(z)`` gate fused.

    Per batch row, channel ``c`` and state index ``n`` (``g = c // (d_inner // n_groups)``)::

        dt_t = softplus(delta_t + dt_bias)   (without softplus unless dt_softplus)
        h_t  = exp(dt_t * A[c, n]) * h_{t-1} + dt_t * B_t[g, n] * u_t
        y_t  = (sum_n C_t[g, n] * h_t + D[c] * u_t) * silu(z_t)   (D and the gate when given)

    Args:
      u, delta: ``(batch, length, d_inner)`` floats (any length; no multiple of a block needed).
      A: ``(d_inner, d_state)`` float (computed in float32; negative for a decaying state).
      B, C: ``(batch, length, n_groups, d_state)`` floats; ``n_groups`` divides ``d_inner``.
      D, dt_bias: optional ``(d_inner,)`` floats.
      z: optional ``(batch, length, d_inner)`` gate.
      dt_softplus: pass ``delta + dt_bias`` through softplus.
      initial_state: optional ``(batch, d_inner, d_state)`` state ``h_{-1}`` (float32 is kept).
      return_final_state: also return the float32 state after the last step.
      reset: ``(batch, length)`` bool, True where step t starts a packed document: the state
        before step t is dropped (the initial state too at t = 0), exactly (no gradient across a
        reset); D, z and dt_bias apply as everywhere else.
      implementation: ``"auto"`` (the Pallas lowering of the target platform when it supports
        the call, else ``"xla"``), ``"xla"`` (the sequential float32 ``lax.scan`` reference),
        ``"triton"`` or ``"tpu"``.
      interpret: run a named Pallas lowering in interpret mode (how CI tests them on CPU); it
        never changes what ``"auto"`` picks.
      tiles: the named lowering's ``Tiles`` (``selective_scan.triton.Tiles(block_d, chunk,
        forward_chunk, segments=1, parallel=False, forward_block_d=None)``,
        ``selective_scan.tpu.Tiles(block_d, chunk)``); ``None`` takes its default for the target
        device.

    Returns:
      ``y`` in ``u``'s dtype, and the final state ``(batch, d_inner, d_state)`` float32 when
      ``return_final_state``. Gradients flow to every array argument. The Pallas backward stores
      one state per chunk and recomputes the others, so memory is linear in length.

    Raises:
      ValueError: naming the violated constraint.
    """
    dims = _check_scan_args(u, delta, A, B, C, D, z, dt_bias, initial_state)
    if not isinstance(dt_softplus, bool):
        raise ValueError(f"dt_softplus must be a bool, got {dt_softplus!r}")
    if not isinstance(return_final_state, bool):
        raise ValueError(f"return_final_state must be a bool, got {return_final_state!r}")
    if reset is not None and (getattr(reset, "shape", None) != u.shape[:2]
                              or getattr(reset, "dtype", None) != jnp.bool_):
        raise ValueError(f"reset must be a bool (batch, length) = {u.shape[:2]} array, got "
                         f"{getattr(reset, 'dtype', '')}{shape_of(reset)}")
    interpret = bool(interpret)
    name, tiles = DISPATCH.choose(implementation, dims, interpret=interpret, tiles=tiles)
    if name == "xla":
        return reference.selective_scan(
            u, delta, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            initial_state=initial_state, return_final_state=return_final_state, reset=reset,
        )  # fmt: skip
    cfg = load_lowering(DISPATCH.package, name)[0].config(dims, tiles, dt_softplus, interpret)
    # The kernels read the resets as float32 0/1 (one per step, shared by the channels).
    reset = None if reset is None else reset.astype(jnp.float32)
    y, h_final = _kernel_scan(cfg, u, delta, A, B, C, D, z, dt_bias, initial_state, reset)
    return (y, h_final) if return_final_state else y


def selective_scan_step(
    state, u, delta, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus: bool = False
):
    """One token of the scan (decoding): ``(y, new_state)`` from the state before the token.

    Shapes are those of ``selective_scan`` without the length axis: ``state (batch, d_inner,
    d_state)``, ``u, delta, z (batch, d_inner)``, ``B, C (batch, n_groups, d_state)``. ``y`` is in
    ``u``'s dtype, ``new_state`` float32. The step reads and writes the whole state once, a
    memory-bound elementwise pass that XLA fuses, so it needs no kernel.
    """
    if getattr(u, "ndim", None) != 2:
        raise ValueError(f"u must have rank 2 (batch, d_inner), got {shape_of(u)}")
    if getattr(B, "ndim", None) != 3:
        raise ValueError(f"B must have rank 3 (batch, n_groups, d_state), got {shape_of(B)}")
    if not isinstance(dt_softplus, bool):
        raise ValueError(f"dt_softplus must be a bool, got {dt_softplus!r}")
    expand = lambda x: None if x is None else x[:, None]
    _check_scan_args(
        expand(u), expand(delta), A, expand(B), expand(C), D, expand(z), dt_bias, state,
        state_required=True,
    )  # fmt: skip
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    dt = reference.discretize_dt(delta, dt_bias, dt_softplus)
    y, new_state = reference.step(
        f32(state), f32(u), dt, f32(A), f32(B), f32(C), f32(D), f32(z)
    )
    return y.astype(u.dtype), new_state


# ----------------------------------------------------------------------------- validation


def _check_scan_args(u, delta, A, B, C, D, z, dt_bias, initial_state, state_required=False):
    """Checks ranks, shapes and dtypes; returns the ``Call``."""
    if getattr(u, "ndim", None) != 3:
        raise ValueError(f"u must have rank 3 (batch, length, d_inner), got {shape_of(u)}")
    batch, length, d_inner = u.shape
    if min(u.shape) < 1:
        raise ValueError(f"u's dimensions must all be >= 1, got {u.shape}")
    if getattr(A, "ndim", None) != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must have shape (d_inner, d_state) = ({d_inner}, N), got {shape_of(A)}")
    d_state = A.shape[1]
    if d_state < 1:
        raise ValueError(f"d_state (A.shape[1]) must be >= 1, got {d_state}")
    if getattr(B, "ndim", None) != 4:
        raise ValueError(
            f"B must have rank 4 (batch, length, n_groups, d_state), got {shape_of(B)}"
        )
    n_groups = B.shape[2]
    if B.shape != (batch, length, n_groups, d_state) or n_groups < 1:
        raise ValueError(
            f"B must have shape (batch, length, n_groups, d_state) = ({batch}, {length}, G, "
            f"{d_state}), got {B.shape}"
        )
    if d_inner % n_groups:
        raise ValueError(f"d_inner ({d_inner}) must be divisible by n_groups ({n_groups})")
    expected = {
        "delta": (delta, (batch, length, d_inner)),
        "C": (C, B.shape),
        "z": (z, (batch, length, d_inner)),
        "D": (D, (d_inner,)),
        "dt_bias": (dt_bias, (d_inner,)),
        "initial_state": (initial_state, (batch, d_inner, d_state)),
    }
    arrays = {"u": u, "A": A, "B": B}
    for name, (x, shape) in expected.items():
        if x is None:
            if name == "initial_state" and state_required:
                raise ValueError("state is required")
            continue
        if shape_of(x) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {shape_of(x)}")
        arrays[name] = x
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got {x.dtype}")
    return Call(batch, length, d_inner, n_groups, d_state)


# ----------------------------------------------------------------------------- custom VJP


_kernel_scan = checkpointed_scan(DISPATCH.package)
