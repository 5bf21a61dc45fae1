"""What every SSD lowering shares: the static configuration and the per-chunk tile math.

The tile functions are plain jnp on arrays that a kernel has already loaded, so the Triton and the
TPU kernels run exactly the same arithmetic (and the same choice of which products go to the
matrix units). Notation for one tile of ``T = block_t`` steps of one head (``P = head_dim``,
``N = d_state``); ``Chunk`` below is that tile::

    a_t    = dt_t * A                      log-decay of step t (A < 0)
    s_t    = a_1 + ... + a_t               cumulative log-decay inside the chunk, s_T = total
    L[t,u] = exp(s_t - s_u) if u <= t      decay from step u to step t
    y      = (L * C B^T) (dt x)            intra-chunk part          (T,T)@(T,P)
           + exp(s) * (C H^T)              contribution of the state entering the chunk
           + D x
    H'     = exp(s_T) H + (exp(s_T - s) dt x)^T B                    (P,T)@(T,N)

Steps past the end of the sequence are given ``dt = 0`` and ``x = B = C = 0``: decay 1 and no
input, so they carry the state unchanged and contribute nothing.

Packed documents (``reset``: 1.0 where a step starts a document, else 0.0) are masked exactly:
with ``k_t`` the count of resets in the chunk up to step t, ``L[t,u]`` counts only when
``k_t == k_u`` (no reset in ``(u, t]``), the entering state reaches step t only when ``k_t == 0``
and step u reaches the chunk's end only when ``k_u == k_T``. The masks are constants, so no
gradient flows through a decay across a reset.

The cumulative sums inside a tile are the lowering's ``cumsum``: Triton's scan (``jnp.cumsum``)
where it has one, else ``masked_cumsum`` (a ``(T,T)`` masked row sum, portable to Mosaic TPU,
which lowers no scan). On an H100 the scan made the four SSD kernels of a Mamba-2 130M layer 34%
faster with packed documents and 17% without (BENCHMARKS.md, session 9): the masked sums held
registers that the products needed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from pallas_kernels import _ssm_math

f32 = jnp.float32


class Call(NamedTuple):
    """The static shape of one call: what a lowering's ``supports`` and ``default_tiles`` see."""

    x_shape: tuple[int, ...]  # (batch, length, heads, head_dim)
    B_shape: tuple[int, ...]  # (batch, length, n_groups, d_state)
    chunk_size: int
    reset: bool = False  # packed-document resets given

    @property
    def head_dim(self) -> int:
        return self.x_shape[3]

    @property
    def d_state(self) -> int:
        return self.B_shape[3]


@dataclasses.dataclass(frozen=True)
class SSDConfig:
    """Static (hashable) description of one kernel call; the custom_vjp's nondiff argument.

    ``chunk_size`` steps separate two saved float32 states (the only per-chunk residual of the
    forward). ``block_t`` steps form one tile of the matrix products (``chunk_size`` is a multiple
    of it); ``block_p`` head_dim columns form one Triton program (the TPU kernels take a whole
    head).
    """

    implementation: str
    chunk_size: int
    block_t: int
    block_p: int
    dt_softplus: bool
    num_warps: int | None
    interpret: bool
    scan_block_p: int | None = None  # Triton's sequential state passes (``triton.Tiles``)
    scan_stages: int = 1  # their software-pipeline depth (``triton.Tiles``)
    grads_warps: int | None = None  # the input-side gradient kernel's warps (``triton.Tiles``)
    bc_warps: int = 0  # > 0: dB/dC per (group, tile) in a kernel of that many warps (Triton)
    bc_stages: int = 1  # that kernel's software-pipeline depth
    bc_splits: int = 1  # programs per (group, tile), each over its share of the group's heads
    fuse_state_side: bool = False  # with bc_warps and no gate: the state side in the grads kernel


def _dot(a, b, contract, dtype):
    """``a . b`` contracting ``contract`` dims, operands cast to ``dtype``, float32 result."""
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), (contract, ((), ())), preferred_element_type=f32
    )


def mm(a, b, dtype):
    return _dot(a, b, ((1,), (0,)), dtype)


def mm_nt(a, b, dtype):
    """``a @ b.T``."""
    return _dot(a, b, ((1,), (1,)), dtype)


def mm_tn(a, b, dtype):
    """``a.T @ b``."""
    return _dot(a, b, ((0,), (0,)), dtype)


class Chunk:
    """The quantities of one chunk that both the forward and the backward need.

    ``x (T,P)``, ``B, C (T,N)`` as loaded (input dtype); ``dt (T,)`` float32, already discretized
    and zero past the end; ``A`` a float32 scalar; ``reset (T,)`` float32 0/1 or None; ``cumsum``
    the lowering's inclusive cumulative sum of a ``(T,)`` vector (module docstring). Products
    run with operands in ``dtype`` (the input dtype: bfloat16 on the tensor cores) and float32
    results. The ``(T,T)`` tiles are
    computed on first use, so a kernel that needs neither ``L`` nor ``C B^T`` never builds them.
    """

    def __init__(self, x, dt, A, B, C, dtype, reset=None, cumsum=None):
        self.x, self.dt, self.B, self.C, self.dtype = x, dt, B, C, dtype
        self.cumsum = cumsum or masked_cumsum
        self.xdt = x.astype(f32) * dt[:, None]  # (T,P)
        d = _decays(dt, A, reset, self.cumsum)
        self.s, self.k = d.s, d.k
        self.decay_in, self.decay_out, self.decay_total = d.into, d.out, d.total

    @functools.cached_property
    def L(self):
        """``(T,T)`` decays from step u to step t, zero above the diagonal."""
        T = self.dt.shape[0]
        row = jax.lax.broadcasted_iota(jnp.int32, (T, T), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (T, T), 1)
        keep = row >= col
        if self.k is not None:
            keep = keep & (self.k[:, None] == self.k[None, :])
        # Mask the exponent, not the exponential: above the diagonal s_t - s_u > 0 can overflow.
        return jnp.exp(jnp.where(keep, self.s[:, None] - self.s[None, :], -jnp.inf))

    @functools.cached_property
    def CB(self):
        return mm_nt(self.C, self.B, self.dtype)  # (T,T)

    def dM(self, dy):
        """``(T,T)``: the gradient of ``L * C B^T`` from the output gradient ``dy (T,P)``,
        masked to ``u <= t``."""
        return self.L * mm_nt(dy, self.xdt, self.dtype)

    def y_off(self, H):
        """Contribution of the entering state ``H (P,N)`` to the outputs, ``(T,P)``."""
        return self.decay_in[:, None] * mm_nt(self.C, H, self.dtype)

    def y_ssm(self, H):
        return mm(self.L * self.CB, self.xdt, self.dtype) + self.y_off(H)

    def next_state(self, H):
        """The state leaving the chunk, float32 ``(P,N)``."""
        return self.decay_total * H + mm_tn(self.xdt * self.decay_out[:, None], self.B,
                                            self.dtype)


class _Decays(NamedTuple):
    s: jax.Array  # (T,) inclusive cumulative log-decay
    k: jax.Array | None  # (T,) resets up to each step (None without resets)
    into: jax.Array  # (T,) the entering state's decay to step t
    out: jax.Array  # (T,) step t's decay to the end of the chunk
    total: jax.Array  # () the entering state's decay across the chunk


Cumsum = Callable[[jax.Array], jax.Array]


def _decays(dt, A, reset, cumsum: Cumsum) -> _Decays:
    """The chunk's decays, masked at resets (module docstring). The chunk's total reset count
    is a sum, not ``k[-1]``: Triton lowers no slices."""
    s, s_total = cumsum(dt * A), jnp.sum(dt * A)
    into, out, total = jnp.exp(s), jnp.exp(s_total - s), jnp.exp(s_total)
    if reset is None:
        return _Decays(s, None, into, out, total)
    k, k_total = cumsum(reset), jnp.sum(reset)
    return _Decays(s, k, jnp.where(k == 0, into, 0.0), jnp.where(k == k_total, out, 0.0),
                   jnp.where(k_total == 0, total, 0.0))


def next_state(x, dt, A, B, H, dtype, reset=None, cumsum=None):
    """The state leaving a chunk without the chunk's outputs (the forward's state pass)."""
    d = _decays(dt, A, reset, cumsum or masked_cumsum)
    return d.total * H + mm_tn(x.astype(f32) * (dt * d.out)[:, None], B, dtype)


def prev_state_grad(dy, dt, A, C, dH, dtype, reset=None, cumsum=None):
    """Gradient of the state entering a chunk from ``dH`` (leaving it) and the chunk's output
    gradient ``dy (T,P)`` (after the gate): the backward's sequential pass, one product."""
    d = _decays(dt, A, reset, cumsum or masked_cumsum)
    return d.total * dH + mm_tn(dy * d.into[:, None], C, dtype)


def chunk_output(c: Chunk, H, D, z):
    """Forward outputs of one chunk (float32): ``y`` (skip and gate applied)."""
    y = c.y_ssm(H)
    if D is not None:
        y = y + D * c.x.astype(f32)
    if z is not None:
        y = _ssm_math.gate_and_grad(y, z.astype(f32))[0]
    return y


def chunk_backward(c: Chunk, H, dH, dout, A, D, z):
    """Gradients of one chunk.

    ``H`` is the state entering the chunk, ``dH`` the gradient of the state leaving it and
    ``dout (T,P)`` the float32 gradient of the chunk's outputs. Returns a dict of float32
    values: ``dx (T,P)``, ``ddt (T,)`` (w.r.t. the discretized dt), ``dB, dC (T,N)`` (this head's
    share), ``dz (T,P)`` or None, the per-chunk sums ``dA``, ``dD`` (scalars) and ``dH`` for the
    state entering the chunk. The two halves below are what a kernel may run apart.
    """
    g = state_side_grads(c, H, dH, dout, D, z)
    g |= input_side_grads(c, dH, g["dy"], g["ds"], A, D, g["ds_total"])
    g["dH"] = c.decay_total * dH + mm_tn(g["dy"] * c.decay_in[:, None], c.C, c.dtype)
    return g


def state_side_grads(c: Chunk, H, dH, dout, D, z, with_dC=True):
    """The half of ``chunk_backward`` that reads the entering state ``H`` (and no ``(P,N)`` state
    beside it for longer than one reduction): ``dC (T,N)`` (None without ``with_dC``), the gated
    output gradient ``dy`` and ``dz`` (None without ``z``), ``ds (T,)``: this half's gradient
    w.r.t. the cumulative log-decays, and ``ds_total``, its gradient w.r.t. the chunk's total
    ``s_T``. (A kernel may add ``ds_total`` to the last step's ``ds`` instead: every step's
    decay reaches ``s_T`` as it reaches the last step's ``s_t``.)"""
    ds_total = c.decay_total * jnp.sum(dH * H)  # first: dH is then dead (registers)
    dz = None
    if z is not None:
        y = c.y_ssm(H)
        if D is not None:
            y = y + D * c.x.astype(f32)
        _, dy_factor, dz_factor = _ssm_math.gate_and_grad(y, z.astype(f32))
        dz = dout * dz_factor
        dy = dout * dy_factor
    else:
        dy = dout
    dC = mm(c.dM(dy), c.B, c.dtype) + dC_state(c, dy, H) if with_dC else None
    ds = jnp.sum(dy * c.y_off(H), axis=1)
    return dict(dC=dC, dy=dy, dz=dz, ds=ds, ds_total=ds_total)


# dB = dM^T C + dB_state, dC = dM B + dC_state: ``dM``, the gradient of the group's shared
# ``C B^T``, enters linearly, so a kernel may sum it over the group's heads before the two
# products; the state terms are one head's each.


def dB_state(c: Chunk, dH):
    """One head's term of ``dB (T,N)`` through ``dH``, the gradient of the state leaving."""
    return c.decay_out[:, None] * mm(c.xdt, dH, c.dtype)


def dC_state(c: Chunk, dy, H):
    """One head's term of ``dC (T,N)`` through ``H``, the state entering the chunk."""
    return c.decay_in[:, None] * mm(dy, H, c.dtype)


def input_side_grads(c: Chunk, dH, dy, ds_state, A, D, ds_total_state=0.0, with_dB=True):
    """The half of ``chunk_backward`` that needs no entering state: ``dx``, ``ddt``, ``dB`` (None
    without ``with_dB``) and the sums ``dA``, ``dD`` from the gated output gradient ``dy`` and
    ``state_side_grads``' ``ds`` and ``ds_total``."""
    x = c.x.astype(f32)
    M = c.L * c.CB  # (T,T), zero above the diagonal
    BdH = mm_nt(c.B, dH, c.dtype)  # (T,P): B_t . dH^T
    dxdt = mm_tn(M, dy, c.dtype) + c.decay_out[:, None] * BdH
    dx = dxdt * c.dt[:, None]
    ddt = jnp.sum(dxdt * x, axis=1)
    dD = None
    if D is not None:
        dx = dx + D * dy
        dD = jnp.sum(dy * x)
    dM = c.dM(dy)
    dB = mm_tn(dM, c.C, c.dtype) + dB_state(c, dH) if with_dB else None
    # Gradient w.r.t. the cumulative log-decays s_t, then w.r.t. each a_u = sum over t >= u.
    G = dM * c.CB  # d/d(s_t - s_u) of the intra-chunk term
    w = c.decay_out * jnp.sum(c.xdt * BdH, axis=1)  # d/d(s_T - s_u) of the state input
    ds = jnp.sum(G, axis=1) - jnp.sum(G, axis=0) + ds_state - w
    # Reverse inclusive cumsum of ds (the total less the exclusive cumsum), plus the gradient
    # w.r.t. s_T, which every a_u reaches.
    da = jnp.sum(ds) - (c.cumsum(ds) - ds) + jnp.sum(w) + ds_total_state
    ddt = ddt + A * da
    dA = jnp.sum(c.dt * da)
    return dict(dx=dx, ddt=ddt, dB=dB, dA=dA, dD=dD)


def masked_cumsum(v):
    """``sum_{u <= t} v_u``, float32 by a masked row sum (portable: no scan, no matmul)."""
    T = v.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (T, T), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (T, T), 1)
    return jnp.sum(jnp.where(col <= row, v[None, :], 0.0), axis=1)
