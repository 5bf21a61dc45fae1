"""``ssd`` and ``ssd_step``: argument validation, choice of implementation, and the custom VJP.

The Pallas lowerings (``triton``, ``tpu``) are imported lazily: one whose module fails to import
is skipped by ``"auto"`` and reported by a ``ValueError`` when named; the policy is
``_api.Dispatch``'s, the same for every op. ``"xla"`` is the chunked plain-JAX form (``xla.py``);
the sequential ``reference.ssd`` is the test oracle of every implementation.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._api import (
    Dispatch,
    Lowering,
    checkpointed_scan,
    is_int,
    load_lowering,
    shape_of,
)
from pallas_kernels.ssd import reference, xla
from pallas_kernels.ssd.common import Call

# Fastest first: "auto" takes the first that runs natively on the target and supports the call.
DISPATCH = Dispatch("pallas_kernels.ssd", (
    Lowering("triton", "gpu"),
    Lowering("tpu", "tpu"),
))
IMPLEMENTATIONS = DISPATCH.names
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int = 256,
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
    """The Mamba-2 SSD layer (see ``reference`` for the recurrence).

    Args:
      x: ``(batch, length, heads, head_dim)``, bfloat16, float16 or float32.
      dt: ``(batch, length, heads)`` step sizes (before ``dt_bias`` / softplus).
      A: ``(heads,)`` log-decay rates (negative in Mamba-2), any float dtype.
      B, C: ``(batch, length, n_groups, d_state)`` in x's dtype; ``heads`` must be a multiple of
        ``n_groups`` and head ``h`` reads group ``h // (heads // n_groups)``.
      chunk_size: steps per einsum chunk (``"xla"``) or between the saved states (``"tpu"``);
        a multiple of a Pallas lowering's ``block_t`` (``"triton"`` saves the state before every
        ``block_t`` tile). The length need not be a multiple of it.
      D: ``(heads,)`` skip: ``y += D[h] * x``.
      z: like ``x``; gates the output as ``y * silu(z)``.
      dt_bias: ``(heads,)`` added to ``dt``; ``dt_softplus`` then applies softplus.
      initial_state: ``(batch, heads, head_dim, d_state)`` float32 state before step 0.
      return_final_state: also return the float32 state after the last step.
      reset: ``(batch, length)`` bool, True where step t starts a packed document: the state
        before step t is dropped (the initial state too at t = 0), exactly (masked decays, no
        gradient across a reset); D, z and dt_bias apply as everywhere else.
      implementation: ``"auto"``, ``"xla"`` (the chunked plain-JAX form: exact, autodiff
        gradients), ``"triton"`` or ``"tpu"``. ``"auto"`` picks the Pallas lowering of the
        target platform when it supports the call, else ``"xla"``.
      interpret: run a named Pallas lowering in interpret mode (how CI tests them on CPU); it
        never changes what ``"auto"`` picks.
      tiles: the named lowering's ``Tiles`` (``ssd.triton.Tiles(block_t, block_p, num_warps,
        scan_block_p)``, ``ssd.tpu.Tiles(block_t)``); ``None`` takes its default for the target
        device.

    Returns:
      ``y`` like ``x`` (and the final state when ``return_final_state``). The kernels feed the
      matrix units operands in x's dtype (float32 runs as tf32 on NVIDIA GPUs: ~5e-4 relative
      error against the float32 reference, measured on an H100; bfloat16 ~5e-3).

    Raises:
      ValueError: naming the violated constraint.
    """
    _check(x, dt, A, B, C, D, z, dt_bias, initial_state)
    if reset is not None and (getattr(reset, "shape", None) != x.shape[:2]
                              or getattr(reset, "dtype", None) != jnp.bool_):
        raise ValueError(f"reset must be a bool (batch, length) = {x.shape[:2]} array, got "
                         f"{getattr(reset, 'dtype', '')}{shape_of(reset)}")
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(dt_softplus, bool):
        raise ValueError(f"dt_softplus must be a bool, got {dt_softplus!r}")
    interpret = bool(interpret)
    call = Call(x.shape, B.shape, int(chunk_size), reset is not None)
    name, tiles = DISPATCH.choose(implementation, call, interpret=interpret, tiles=tiles)
    if name == "xla":
        return xla.ssd(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                       dt_softplus=dt_softplus, initial_state=initial_state,
                       return_final_state=return_final_state, reset=reset)
    cfg = load_lowering(DISPATCH.package, name)[0].config(call, tiles, dt_softplus, interpret)
    # The kernels read the resets as float32 0/1 (one mask per step, shared by the heads).
    reset = None if reset is None else reset.astype(jnp.float32)
    y, h_final = _kernel_ssd(cfg, x, dt, A, B, C, D, z, dt_bias, initial_state, reset)
    return (y, h_final) if return_final_state else y


def ssd_step(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step of ``ssd``: ``(y, new_state)``.

    Shapes: ``state (batch, heads, head_dim, d_state)`` float32, ``x, z (batch, heads,
    head_dim)``, ``dt (batch, heads)``, ``B, C (batch, n_groups, d_state)``; ``y`` like ``x``.
    A single token is a few elementwise passes over the state, which XLA fuses; no kernel.
    """
    add_len = lambda v: None if v is None else v[:, None]
    _check(add_len(x), add_len(dt), A, add_len(B), add_len(C), D, add_len(z), dt_bias, state)
    dt = reference.discretize_dt(dt, dt_bias, dt_softplus)
    f32 = lambda v: None if v is None else v.astype(jnp.float32)
    y, new_state = reference.step(
        state.astype(jnp.float32), f32(x), dt, f32(A), f32(B), f32(C), f32(D), f32(z)
    )
    return y.astype(x.dtype), new_state


# ----------------------------------------------------------------------------- validation


def _check(x, dt, A, B, C, D, z, dt_bias, state):
    """Validate shapes and dtypes; returns ``(heads, head_dim, d_state)``."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got shape {shape_of(x)}")
    batch, length, heads, head_dim = x.shape
    if min(x.shape) < 1:
        raise ValueError(f"all dimensions of x must be >= 1, got {x.shape}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if getattr(dt, "shape", None) != (batch, length, heads):
        raise ValueError(f"dt must be (batch, length, heads) = {(batch, length, heads)}, got {shape_of(dt)}")
    if getattr(B, "ndim", None) != 4 or B.shape[:2] != (batch, length):
        raise ValueError(
            f"B must be (batch, length, n_groups, d_state) with batch, length = {(batch, length)}, "
            f"got {shape_of(B)}"
        )
    if getattr(C, "shape", None) != B.shape:
        raise ValueError(f"C must have B's shape {B.shape}, got {shape_of(C)}")
    n_groups, d_state = B.shape[2], B.shape[3]
    if n_groups < 1 or d_state < 1 or heads % n_groups:
        raise ValueError(f"heads ({heads}) must be a multiple of n_groups ({n_groups}), d_state >= 1")
    if B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"B and C must have x's dtype {x.dtype}, got {B.dtype}, {C.dtype}")
    for name, v in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if v is not None and getattr(v, "shape", None) != (heads,):
            raise ValueError(f"{name} must have shape (heads,) = ({heads},), got {shape_of(v)}")
    for name, v in (("dt", dt), ("A", A), ("D", D), ("dt_bias", dt_bias)):
        if v is not None and not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got {v.dtype}")
    if z is not None and (getattr(z, "shape", None) != x.shape or z.dtype != x.dtype):
        raise ValueError(f"z must match x ({x.dtype}{x.shape}), got {getattr(z, 'dtype', '')}{shape_of(z)}")
    want = (batch, heads, head_dim, d_state)
    if state is not None and (getattr(state, "shape", None) != want or state.dtype != jnp.float32):
        raise ValueError(
            f"the state must be float32 (batch, heads, head_dim, d_state) = {want}, got "
            f"{getattr(state, 'dtype', '')}{shape_of(state)}"
        )
    return heads, head_dim, d_state


# ----------------------------------------------------------------------------- custom VJP


_kernel_ssd = checkpointed_scan(DISPATCH.package)
