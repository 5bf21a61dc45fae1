"""``ssd`` and ``ssd_step``: argument validation, choice of implementation, and the custom VJP.

The Pallas lowerings (``triton``, ``tpu``) are imported lazily: one whose module fails to import
is skipped by ``"auto"`` and reported by a ``ValueError`` when named.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels._api import (
    checkpointed_scan,
    is_int,
    load_lowering,
    named_lowering,
    shape_of,
    target_platform,
)
from pallas_kernels.ssd import reference
from pallas_kernels.ssd.common import SSDConfig

IMPLEMENTATIONS = ("auto", "xla", "xla_chunked", "triton", "tpu")
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Tile defaults: block_t steps per matrix-product tile, block_p head_dim columns per program.
_DEFAULT_BLOCK_T = {"triton": 64, "tpu": 128}
_DEFAULT_BLOCK_P = {"triton": 64, "tpu": None}  # None: all of head_dim


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
    implementation: str = "auto",
    interpret: bool = False,
    block_t: int | None = None,
    block_p: int | None = None,
    num_warps: int | None = None,
):
    """The Mamba-2 SSD layer (see ``reference`` for the recurrence).

    Args:
      x: ``(batch, length, heads, head_dim)``, bfloat16, float16 or float32.
      dt: ``(batch, length, heads)`` step sizes (before ``dt_bias`` / softplus).
      A: ``(heads,)`` log-decay rates (negative in Mamba-2), any float dtype.
      B, C: ``(batch, length, n_groups, d_state)`` in x's dtype; ``heads`` must be a multiple of
        ``n_groups`` and head ``h`` reads group ``h // (heads // n_groups)``.
      chunk_size: steps between the saved states (Pallas lowerings; a multiple of ``block_t``)
        or per einsum chunk (``"xla_chunked"``). The length need not be a multiple of it.
      D: ``(heads,)`` skip: ``y += D[h] * x``.
      z: like ``x``; gates the output as ``y * silu(z)``.
      dt_bias: ``(heads,)`` added to ``dt``; ``dt_softplus`` then applies softplus.
      initial_state: ``(batch, heads, head_dim, d_state)`` float32 state before step 0.
      return_final_state: also return the float32 state after the last step.
      implementation: ``"auto"``, ``"xla"`` (the sequential float32 reference),
        ``"xla_chunked"`` (plain-JAX chunked form), ``"triton"`` or ``"tpu"``. ``"auto"`` picks
        the Pallas lowering of the current backend when it supports the call, else
        ``"xla_chunked"``.
      interpret: run the chosen Pallas kernel in interpret mode (how CI tests them on CPU).
      block_t, block_p, num_warps: tile sizes of the Pallas lowerings (None: tuned defaults).

    Returns:
      ``y`` like ``x`` (and the final state when ``return_final_state``). The kernels feed the
      matrix units operands in x's dtype (float32 runs as tf32 on NVIDIA GPUs: ~5e-4 relative
      error against the float32 reference, measured on an H100; bfloat16 ~5e-3).

    Raises:
      ValueError: naming the violated constraint.
    """
    heads, head_dim, d_state = _check(x, dt, A, B, C, D, z, dt_bias, initial_state)
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(dt_softplus, bool):
        raise ValueError(f"dt_softplus must be a bool, got {dt_softplus!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    for name, v in (("block_t", block_t), ("block_p", block_p), ("num_warps", num_warps)):
        if v is not None and (not is_int(v) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")

    opts = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
                return_final_state=return_final_state)
    name = _choose(implementation, x.shape, B.shape, chunk_size, block_t, block_p, bool(interpret))
    if name == "xla":
        return reference.ssd(x, dt, A, B, C, **opts)
    if name == "xla_chunked":
        return reference.ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **opts)
    cfg = SSDConfig(
        implementation=name,
        chunk_size=int(chunk_size),
        block_t=_block(block_t, _DEFAULT_BLOCK_T[name], chunk_size),
        block_p=_block(block_p, _DEFAULT_BLOCK_P[name], head_dim),
        dt_softplus=dt_softplus,
        num_warps=num_warps,
        interpret=bool(interpret),
    )
    y, h_final = _kernel_ssd(cfg, x, dt, A, B, C, D, z, dt_bias, initial_state)
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


def _block(given, default, extent):
    if given is not None:
        return given
    return extent if default is None else min(default, extent)


# ----------------------------------------------------------------------------- dispatch


_PACKAGE = "pallas_kernels.ssd"
_load_lowering = functools.partial(load_lowering, _PACKAGE)


def _choose(implementation, x_shape, B_shape, chunk_size, block_t, block_p, interpret) -> str:
    if implementation in ("xla", "xla_chunked"):
        return implementation

    def unsupported(name):
        bt = _block(block_t, _DEFAULT_BLOCK_T[name], chunk_size)
        bp = _block(block_p, _DEFAULT_BLOCK_P[name], x_shape[3])
        return lambda module: module.supports(x_shape, B_shape, chunk_size, bt, bp)

    if implementation == "auto":
        name = {"gpu": "triton", "tpu": "tpu"}.get(target_platform())
        module = _load_lowering(name)[0] if name is not None else None
        return name if module is not None and unsupported(name)(module) is None else "xla_chunked"
    named_lowering(_PACKAGE, implementation, interpret, unsupported(implementation))
    return implementation


# ----------------------------------------------------------------------------- custom VJP


_kernel_ssd = checkpointed_scan("pallas_kernels.ssd")
