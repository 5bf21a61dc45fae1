"""Mamba-2 SSD as Pallas GPU kernels, Triton lowering.

Programs own one (batch row, head, block of ``block_p`` head_dim columns) and keep the state tile
``H (block_p, d_state)`` in float32 registers; the sequence is worked in tiles of ``block_t``
steps whose arithmetic is ``common.Chunk``: four products on the tensor cores (``C B^T``,
``(L * C B^T) (dt x)``, ``C H^T``, ``(dt x)^T B``), exact float32 cumulative decays, and the ``D``
skip and ``silu(z)`` gate fused before ``y`` is written once.

The state entering every tile is saved (``(batch, heads, n_tiles, head_dim, d_state)``, so
``chunk_size`` only has to be a multiple of ``block_t``): every other kernel then has one program
per tile, with no state to recompute and parallel over the whole length. The saved states and
their gradients are stored in the input dtype, half the bytes for bfloat16: every product that
reads them feeds the matrix units that dtype anyway (only the ``<dH, H>`` term of the decay
gradient sees the rounding); the carried state and the final state stay float32.

Forward, two kernels: a sequential pass that only advances the state (one product per tile) and
writes it before every tile, then the outputs of each tile. The saved states are the forward's
only residual: memory is linear in length and no per-step state is stored.

Backward, three kernels: a sequential reverse pass writes the gradient of the state leaving every
tile (one product per tile); then per tile ``common.state_side_grads`` (``dC`` and the
decay-gradient terms that read the saved state) and ``common.input_side_grads`` (``dx``, ``ddt``,
``dB``), so no program holds a state and its gradient at once (one kernel doing both spilled
~3.8 KB of registers per thread on an H100 and was 39% of a Mamba-2 train step).

Sums over programs are written as partials and reduced outside in float32 (deterministic, no
atomics): ``dB``/``dC`` per (head, column block) in the input dtype (they are the largest
writes of the backward, one ``(length, d_state)`` slab per head of a group, and the gradient is
returned in that dtype), ``ddt`` per column block and the per-head scalars ``dA``, ``dD``,
``ddt_bias`` per (batch row, tile, column block) in float32.

With ``Tiles.group_bc`` the per-head ``dB``/``dC`` partials go: a kernel per (batch row, group,
tile) walks the group's heads and sums the gradient ``dM (T,T)`` of their shared ``C B^T``
before the two products that turn it into ``dB`` and ``dC``, accumulating the heads' state terms
(``(T,P)@(P,N)`` products with the saved state and its gradient) in float32, and writes each
gradient once in its final layout (mamba_ssm's backward sums ``dM`` over a group's heads the
same way). The two per-head kernels then lose two products each.

Packed-document resets (float32 0/1 per (batch row, step)) are one more ``(T,)`` load per tile:
``common.Chunk`` masks the decays with them. Cumulative sums inside a tile are Triton scans
(``jnp.cumsum``), not ``common.masked_cumsum``'s ``(T,T)`` tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _ssm_math
from pallas_kernels._api import device_default
from pallas_kernels._pallas_util import Refs, operands, out_type
from pallas_kernels.ssd import common

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``block_t`` steps per matrix-product tile (a power of 2 >= 16 dividing ``chunk_size``),
    ``block_p`` head_dim columns per program (a power of 2 >= 16 dividing ``head_dim``), the
    warps per program, ``scan_block_p`` head_dim columns per program of the two sequential
    state passes (likewise; 0 means ``block_p``) and ``scan_stages``, their software-pipeline
    depth. The sequential passes have one program per (batch row, head, column block) walking
    the whole length: each tile's loads do not depend on the carried state, so with
    ``scan_stages > 1`` Triton issues the next tiles' loads while the current one computes
    instead of waiting a memory latency per tile. The per-tile kernels are parallel over the
    length already and keep ``block_p`` (each column block adds ``dB``/``dC`` partials).
    ``grads_warps`` are the warps of the largest of them, the input-side gradients
    (``ssd_bwd_grads``; 0 means ``num_warps``): ptxas fits it in 253 registers without spilling
    at 8 warps, 255 and a spill at 4, yet at 8 warps it ran 1.5x slower on an H200 (Mamba-2
    130M's layer; BENCHMARKS.md, session 13), so the default keeps 4. Without ``group_bc`` each
    head's programs write its ``dB``/``dC`` share, summed over the group's heads outside; with it
    those kernels leave them out and one more kernel, of ``bc_warps`` warps, runs per (group,
    tile) and walks the group's heads (module docstring), its loads software-pipelined over the
    heads ``bc_stages`` deep (each head's loads do not depend on the sums carried). At Mamba-2
    130M's layer (H100, ``scripts/kernel_resources.py``) it fits 255 registers without spilling
    at 8 warps (652 bytes of spill at 4) and takes 139 KB of shared memory at 2 stages. With
    ``group_bc`` and no gate, the state side is one product; ``fuse_state_side`` computes it in
    ``ssd_bwd_grads`` (which then reads the saved state too: 28-40 bytes of spill there) instead
    of a kernel of its own that re-reads the tile's inputs. ``bc_splits`` divides a group's heads
    over that many programs per tile (more programs: Mamba-2 130M at 8 x 2048 has 256 (row,
    tile) pairs for 132 SMs), whose float32 partials are then summed outside."""

    block_t: int
    block_p: int
    num_warps: int
    scan_block_p: int = 0
    scan_stages: int = 1
    grads_warps: int = 0
    group_bc: bool = False
    bc_warps: int = 8
    bc_stages: int = 2
    bc_splits: int = 1
    fuse_state_side: bool = False

    def __post_init__(self):
        if self.scan_block_p == 0:
            object.__setattr__(self, "scan_block_p", self.block_p)
        if self.grads_warps == 0:
            object.__setattr__(self, "grads_warps", self.num_warps)


# Defaults by compute capability ("" is every GPU), each tile capped at chunk_size / head_dim:
# 64x64 with 4 warps was fastest of the tiles timed on an H100; 4 pipeline stages halve the
# sequential passes on an H200. On Hopper, group_bc with the fused state side cut Mamba-2 130M's
# layer fwd+bwd 1.15x at 8 x 2048 and 1.25x at 2 x 8192 (H200, session 15); its ssd_bwd_bc takes
# 139 KB of shared memory, more than some other GPUs have (BENCHMARKS.md, bench_ssd.py).
_TILES = Tiles(block_t=64, block_p=64, num_warps=4, scan_stages=4)
DEFAULT_TILES = {"9.0": dataclasses.replace(_TILES, group_bc=True, fuse_state_side=True),
                 "": _TILES}


# The sequential passes' column block narrows (to 16 at least) until they have this many programs:
# on an H200, 2 rows x 24 heads (48 programs) ran 1.3x faster at 16 columns (192 programs), while
# 2 x 64 heads (128) ran fastest at the full 64 (BENCHMARKS.md, session 10).
_MIN_SCAN_PROGRAMS = 128


def default_tiles(call: common.Call) -> Tiles:
    default = device_default(DEFAULT_TILES)
    batch, _, heads, head_dim = call.x_shape
    scan_block_p = min(default.scan_block_p, head_dim)
    while scan_block_p > 16 and batch * heads * (head_dim // scan_block_p) < _MIN_SCAN_PROGRAMS:
        scan_block_p //= 2
    tiles = dataclasses.replace(default, block_t=min(default.block_t, call.chunk_size),
                                block_p=min(default.block_p, head_dim), scan_block_p=scan_block_p)
    if heads == call.B_shape[2]:  # one head per group (RetNet): no per-head partials to sum
        tiles = dataclasses.replace(tiles, group_bc=False, fuse_state_side=False, bc_splits=1)
    return tiles


def supports(call: common.Call, tiles: Tiles) -> str | None:
    """Why this lowering cannot run the call (None if it can)."""
    head_dim, d_state, chunk_size = call.head_dim, call.d_state, call.chunk_size
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    if not pow2(head_dim) or not pow2(d_state):
        return f"head_dim ({head_dim}) and d_state ({d_state}) must be powers of two >= 16"
    if not pow2(tiles.block_t) or chunk_size % tiles.block_t:
        return (f"tiles.block_t ({tiles.block_t}) must be a power of two >= 16 dividing "
                f"chunk_size ({chunk_size})")
    for name in ("block_p", "scan_block_p"):
        if not pow2(value := getattr(tiles, name)) or head_dim % value:
            return (f"tiles.{name} ({value}) must be a power of two >= 16 dividing "
                    f"head_dim ({head_dim})")
    if not tiles.group_bc and (tiles.fuse_state_side or tiles.bc_splits != 1):
        return "tiles.fuse_state_side and tiles.bc_splits apply with tiles.group_bc=True only"
    rep = call.x_shape[2] // call.B_shape[2]
    if tiles.group_bc and rep % tiles.bc_splits:
        return (f"tiles.bc_splits ({tiles.bc_splits}) must divide the heads per group ({rep})")
    return None


def config(call: common.Call, tiles: Tiles, dt_softplus: bool, interpret: bool):
    # A state is saved before every tile: the kernels' chunk is the tile.
    return common.SSDConfig(
        implementation="triton", chunk_size=tiles.block_t, block_t=tiles.block_t,
        block_p=tiles.block_p, dt_softplus=dt_softplus, num_warps=tiles.num_warps,
        interpret=interpret, scan_block_p=tiles.scan_block_p, scan_stages=tiles.scan_stages,
        grads_warps=tiles.grads_warps,
        bc_warps=tiles.bc_warps if tiles.group_bc else 0, bc_stages=tiles.bc_stages,
        bc_splits=tiles.bc_splits if tiles.group_bc else 1,
        fuse_state_side=tiles.fuse_state_side,
    )


def _tile(r, t0, T, length, bias, softplus, dtype, *, with_z, with_dout, with_C=True):
    """Load the ``T`` steps from ``t0`` (zeros past the end); returns a dict of values."""
    t = t0 + jax.lax.broadcasted_iota(jnp.int32, (T,), 0)
    valid = t < length

    def load(ref):
        mask = jnp.broadcast_to(valid.reshape((T,) + (1,) * (ref.ndim - 1)), (T, *ref.shape[1:]))
        return plgpu.load(ref.at[pl.ds(t0, T)], mask=mask, other=0.0)

    raw, dt = _discretize(load(r.dt), bias, softplus, valid)
    v = dict(valid=valid, raw=raw, dt=dt, reset=None)
    if getattr(r, "reset", None) is not None:
        v["reset"] = plgpu.load(r.reset.at[pl.ds(t0, T)], mask=valid, other=0.0)
    for name in ("x", "B"):  # the backward's state pass has neither
        if hasattr(r, name):
            v[name] = load(getattr(r, name)).astype(dtype)
    if with_C:
        v["C"] = load(r.C).astype(dtype)
    if with_z:
        v["z"] = load(r.z)
    if with_dout:
        v["dout"] = load(r.dout).astype(f32)
    return v


def _discretize(loaded, bias, softplus, valid):
    """``(raw, dt)``: the tile's dt plus the head's bias, and through softplus, zero past the
    end (float32)."""
    raw = loaded.astype(f32) if bias is None else loaded.astype(f32) + bias
    return raw, jnp.where(valid, _ssm_math.softplus(raw) if softplus else raw, 0.0)


def _store(ref, t0, valid, value):
    T = valid.shape[0]
    mask = jnp.broadcast_to(valid.reshape((T,) + (1,) * (value.ndim - 1)), value.shape)
    plgpu.store(ref.at[pl.ds(t0, T)], value.astype(ref.dtype), mask=mask)


def _head_scalars(r, h):
    A = r.A[h].astype(f32)
    D, bias = getattr(r, "D", None), getattr(r, "bias", None)
    return A, None if D is None else D[h].astype(f32), None if bias is None else bias[h].astype(f32)


def _state_kernel(*refs, length, T, n_tiles, softplus, dtype, flags):
    """Sequential pass: the state entering every tile (and the final state); one product a tile."""
    r = Refs(refs, flags)
    A, _, bias = _head_scalars(r, pl.program_id(1))
    H = jnp.zeros(r.h_final.shape, f32) if r.h0 is None else r.h0[...].astype(f32)

    def tile_body(k, H):
        r.ckpt[k] = H.astype(r.ckpt.dtype)
        v = _tile(r, k * T, T, length, bias, softplus, dtype, with_z=False, with_dout=False,
                  with_C=False)
        return common.next_state(v["x"], v["dt"], A, v["B"], H, dtype, v["reset"], jnp.cumsum)

    r.h_final[...] = jax.lax.fori_loop(0, n_tiles, tile_body, H)


def _tile_program(r, n_tiles):
    """``(head, tile)`` of a program of a per-tile grid ``(batch, head * n_tiles + tile, ...)``
    (``(group, tile)`` in the group's dB/dC kernel's)."""
    return pl.program_id(1) // n_tiles, pl.program_id(1) % n_tiles


def _out_kernel(*refs, length, T, n_tiles, softplus, dtype, flags):
    """Outputs of one tile (programs run in parallel over tiles) from its entering state."""
    r = Refs(refs, flags)
    h, k = _tile_program(r, n_tiles)
    A, D, bias = _head_scalars(r, h)
    v = _tile(r, k * T, T, length, bias, softplus, dtype, with_z=r.z is not None,
              with_dout=False)
    c = common.Chunk(v["x"], v["dt"], A, v["B"], v["C"], dtype, v["reset"], jnp.cumsum)
    _store(r.y, k * T, v["valid"], common.chunk_output(c, r.ckpt[...].astype(f32), D, v.get("z")))


def _dstate_kernel(*refs, length, T, n_tiles, softplus, dtype, flags):
    """Sequential reverse pass: the gradient of the state leaving every tile (and of h0)."""
    r = Refs(refs, flags)
    A, _, bias = _head_scalars(r, pl.program_id(1))
    dH = jnp.zeros(r.dck.shape[1:], f32) if r.dh_final is None else r.dh_final[...].astype(f32)

    def tile_body(kk, dH):
        k = n_tiles - 1 - kk
        r.dck[k] = dH.astype(r.dck.dtype)
        v = _tile(r, k * T, T, length, bias, softplus, dtype, with_z=r.z is not None,
                  with_dout=True)
        dy = v["dout"] if r.z is None else v["dout"] * _ssm_math.silu(v["z"].astype(f32))
        return common.prev_state_grad(dy, v["dt"], A, v["C"], dH, dtype, v["reset"], jnp.cumsum)

    dH = jax.lax.fori_loop(0, n_tiles, tile_body, dH)
    if r.dh0 is not None:
        r.dh0[...] = dH


def _state_grad_kernel(*refs, length, T, n_tiles, softplus, dtype, flags):
    """``common.state_side_grads`` of one tile: the only backward kernel holding the state."""
    r = Refs(refs, flags)
    h, k = _tile_program(r, n_tiles)
    A, D, bias = _head_scalars(r, h)
    t0 = k * T
    v = _tile(r, t0, T, length, bias, softplus, dtype, with_z=r.z is not None, with_dout=True)
    c = common.Chunk(v["x"], v["dt"], A, v["B"], v["C"], dtype, v["reset"], jnp.cumsum)
    g = common.state_side_grads(c, r.ckpt[...].astype(f32), r.dck[...].astype(f32), v["dout"], D,
                                v.get("z"), with_dC=r.dC is not None)
    valid = v["valid"]
    if r.dC is not None:
        _store(r.dC, t0, valid, g["dC"])
    _store(r.ds, t0, valid, g["ds"] + jnp.where(_last_step(t0, T, length), g["ds_total"], 0.0))
    if r.dz is not None:
        _store(r.dz, t0, valid, g["dz"])
        _store(r.dy, t0, valid, g["dy"])


def _last_step(t0, T, length):
    """``(T,)``: the tile's last step in the sequence, where ``ds_total`` rides (see
    ``common.state_side_grads``)."""
    return t0 + jax.lax.broadcasted_iota(jnp.int32, (T,), 0) == jnp.minimum(t0 + T, length) - 1


def _grad_kernel(*refs, length, T, n_tiles, softplus, dtype, flags):
    """``common.input_side_grads`` of one tile from the gradient of the state leaving it."""
    r = Refs(refs, flags)
    h, k = _tile_program(r, n_tiles)
    A, D, bias = _head_scalars(r, h)
    t0 = k * T
    v = _tile(r, t0, T, length, bias, softplus, dtype, with_z=False, with_dout=True)
    valid = v["valid"]
    dy = v["dout"] if r.dy is None else plgpu.load(r.dy.at[pl.ds(t0, T)],
                                                    mask=_rows(valid, r.dy), other=0.0)
    c = common.Chunk(v["x"], v["dt"], A, v["B"], v["C"], dtype, v["reset"], jnp.cumsum)
    dH = r.dck[...].astype(f32)
    if r.ckpt is None:
        ds = plgpu.load(r.ds.at[pl.ds(t0, T)], mask=valid, other=0.0)
    else:  # the state side here: without dC and the gate it is one product
        s = common.state_side_grads(c, r.ckpt[...].astype(f32), dH, dy, D, None, with_dC=False)
        ds = s["ds"] + jnp.where(_last_step(t0, T, length), s["ds_total"], 0.0)
    g = common.input_side_grads(c, dH, dy, ds, A, D, with_dB=r.dB is not None)
    ddt = g["ddt"] * _ssm_math.sigmoid(v["raw"]) if softplus else g["ddt"]
    ddt = jnp.where(valid, ddt, 0.0)
    _store(r.dx, t0, valid, g["dx"])
    _store(r.ddt, t0, valid, ddt)
    if r.dB is not None:
        _store(r.dB, t0, valid, g["dB"])
    dD = jnp.zeros((), f32) if D is None else g["dD"]
    lane = jax.lax.broadcasted_iota(jnp.int32, (4,), 0)
    r.sums[...] = jnp.where(lane == 0, g["dA"], jnp.where(lane == 1, dD,
                                                           jnp.where(lane == 2, jnp.sum(ddt), 0.0)))


def _bc_grad_kernel(*refs, length, T, n_tiles, hpp, softplus, dtype, flags):
    """``dB`` and ``dC`` of one (block of ``hpp`` heads of a group, tile): the heads walked in a
    loop."""
    r = Refs(refs, flags)
    g, k = _tile_program(r, n_tiles)
    t0 = k * T
    valid = t0 + jax.lax.broadcasted_iota(jnp.int32, (T,), 0) < length
    rows = lambda ref, *head: plgpu.load(ref.at[(pl.ds(t0, T), *head)],
                                         mask=_rows(valid, ref.at[(slice(None), *head)]),
                                         other=0.0)
    B, C = rows(r.B).astype(dtype), rows(r.C).astype(dtype)
    reset = None if r.reset is None else rows(r.reset)

    def head_body(h, acc):
        dM, dB, dC = acc
        A, _, bias = _head_scalars(r, g * hpp + h)
        dt = _discretize(rows(r.dt, h), bias, softplus, valid)[1]
        c = common.Chunk(rows(r.x, h).astype(dtype), dt, A, B, C, dtype, reset, jnp.cumsum)
        dy = rows(r.dout if r.dy is None else r.dy, h).astype(f32)
        return (dM + c.dM(dy), dB + common.dB_state(c, r.dck[h].astype(f32)),
                dC + common.dC_state(c, dy, r.ckpt[h].astype(f32)))

    zeros = jnp.zeros((T, B.shape[1]), f32)
    dM, dB, dC = jax.lax.fori_loop(0, hpp, head_body, (jnp.zeros((T, T), f32), zeros, zeros))
    _store(r.dB, t0, valid, common.mm_tn(dM, C, dtype) + dB)
    _store(r.dC, t0, valid, common.mm(dM, B, dtype) + dC)


def _rows(valid, ref):
    """``valid (T,)`` broadcast over a ``(T, ...)`` tile of ``ref``."""
    T = valid.shape[0]
    return jnp.broadcast_to(valid.reshape((T,) + (1,) * (ref.ndim - 1)), (T, *ref.shape[1:]))


def _specs(x_shape, B_shape, block_p, n_tiles):
    """BlockSpecs for grid (batch, head, column block) and for the per-tile grid
    (batch, head * n_tiles + tile, column block), in that order. ``states`` is every tile's
    state of a (batch row, head, column block), ``tile_state`` one tile's."""
    _, length, heads, _ = x_shape
    n_groups, d_state = B_shape[2], B_shape[3]
    rep = heads // n_groups

    def specs(hd):
        return dict(
            seq=pl.BlockSpec((None, length, None, block_p), lambda i, j, p: (i, 0, hd(j), p)),
            dt=pl.BlockSpec((None, length, None), lambda i, j, p: (i, 0, hd(j))),
            row=pl.BlockSpec((None, length), lambda i, j, p: (i, 0)),
            grp=pl.BlockSpec((None, length, None, d_state),
                             lambda i, j, p: (i, 0, hd(j) // rep, 0)),
            head=pl.BlockSpec((heads,), lambda i, j, p: (0,)),
            state=pl.BlockSpec((None, None, block_p, d_state), lambda i, j, p: (i, hd(j), p, 0)),
            states=pl.BlockSpec((None, None, n_tiles, block_p, d_state),
                                lambda i, j, p: (i, hd(j), 0, p, 0)),
            tile_state=pl.BlockSpec((None, None, None, block_p, d_state),
                                    lambda i, j, p: (i, hd(j), j % n_tiles, p, 0)),
        )

    return specs(lambda j: j), specs(lambda j: j // n_tiles)


def _call(kernel, cfg, grid, named_in, named_out, static, name, num_stages=1, num_warps=None):
    """One pallas_call from ``[(name, array or None, spec)]`` inputs and ``[(name, shape or None,
    spec)]`` outputs (``num_warps`` None: ``cfg``'s); returns a dict of the outputs by name."""
    in_flags, args, in_specs = operands(named_in)
    out_flags, out_shapes, out_specs = operands(named_out)
    outs = pl.pallas_call(
        functools.partial(kernel, flags=in_flags + out_flags, **static),
        out_shape=[out_type(s.shape, s.dtype, *args) for s in out_shapes],
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or cfg.num_warps,
                                             num_stages=num_stages),
        interpret=cfg.interpret,
        name=name,
    )(*args)
    return dict(zip([n for n, s, _ in named_out if s is not None], outs))


def _static(x, cfg):
    T = cfg.block_t
    return dict(length=x.shape[1], T=T, n_tiles=pl.cdiv(x.shape[1], T),
                softplus=cfg.dt_softplus, dtype=x.dtype)


def forward(x, dt, A, B, C, D, z, dt_bias, h0, reset, cfg: common.SSDConfig, *,
            save_checkpoints):
    """Returns ``(y, final_state, checkpoints or None)``; the final state float32, the
    checkpoints (the state entering every tile) in x's dtype.

    Two kernels: a sequential pass that only advances the state (one product per tile) and
    writes the state entering every tile, then the outputs with one program per tile.
    """
    batch, length, heads, head_dim = x.shape
    d_state = B.shape[3]
    st = _static(x, cfg)
    n_tiles = st["n_tiles"]
    n_pb = head_dim // cfg.block_p
    sp = _specs(x.shape, B.shape, cfg.scan_block_p, n_tiles)[0]  # the sequential pass's
    spt = _specs(x.shape, B.shape, cfg.block_p, n_tiles)[1]  # the per-tile kernels'
    states = _call(
        _state_kernel, cfg, (batch, heads, head_dim // cfg.scan_block_p),
        [("x", x, sp["seq"]), ("dt", dt, sp["dt"]), ("A", A, sp["head"]), ("B", B, sp["grp"]),
         ("bias", dt_bias, sp["head"]), ("h0", h0, sp["state"]), ("reset", reset, sp["row"])],
        [("h_final", jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), f32), sp["state"]),
         ("ckpt", jax.ShapeDtypeStruct((batch, heads, n_tiles, head_dim, d_state), x.dtype),
          sp["states"])],
        st, "ssd_fwd_states", cfg.scan_stages,
    )
    y = _call(
        _out_kernel, cfg, (batch, heads * n_tiles, n_pb),
        [("x", x, spt["seq"]), ("dt", dt, spt["dt"]), ("A", A, spt["head"]),
         ("B", B, spt["grp"]), ("C", C, spt["grp"]), ("D", D, spt["head"]),
         ("z", z, spt["seq"]), ("bias", dt_bias, spt["head"]),
         ("ckpt", states["ckpt"], spt["tile_state"]), ("reset", reset, spt["row"])],
        [("y", jax.ShapeDtypeStruct(x.shape, x.dtype), spt["seq"])],
        st, "ssd_fwd_outputs",
    )["y"]
    return y, states["h_final"], (states["ckpt"] if save_checkpoints else None)


def backward(dout, dh_final, x, dt, A, B, C, D, z, dt_bias, h0, reset, ckpt,
             cfg: common.SSDConfig):
    """Gradients ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0, None)``, None for absent inputs
    (none for ``reset``).

    A sequential reverse pass writes the gradient of the state leaving every tile (one product
    per tile); then two kernels with one program per tile: the state side (``dC``, the decay
    gradient terms that read the saved state; with ``z`` the gated output gradient) and the
    input side (``dx``, ``ddt``, ``dB``, the per-head sums), so neither holds two states.
    """
    batch, length, heads, head_dim = x.shape
    d_state = B.shape[3]
    st = _static(x, cfg)
    n_tiles = st["n_tiles"]
    n_pb = head_dim // cfg.block_p
    sp = _specs(x.shape, B.shape, cfg.scan_block_p, n_tiles)[0]
    spt = _specs(x.shape, B.shape, cfg.block_p, n_tiles)[1]
    f32_state = jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), f32)
    dstates = _call(
        _dstate_kernel, cfg, (batch, heads, head_dim // cfg.scan_block_p),
        [("dt", dt, sp["dt"]), ("A", A, sp["head"]), ("C", C, sp["grp"]), ("z", z, sp["seq"]),
         ("bias", dt_bias, sp["head"]), ("dout", dout, sp["seq"]),
         ("dh_final", dh_final, sp["state"]), ("reset", reset, sp["row"])],
        [("dck", jax.ShapeDtypeStruct(ckpt.shape, x.dtype), sp["states"]),
         ("dh0", None if h0 is None else f32_state, sp["state"])],
        st, "ssd_bwd_states", cfg.scan_stages,
    )
    # Per-(head, column block) partials over the whole length, summed outside.
    partial_t = lambda *n: pl.BlockSpec(
        (None, None, length, *n),
        lambda i, j, p: (i, j // n_tiles * n_pb + p, 0) + (0,) * len(n),
    )
    part = lambda *n, dtype=f32: jax.ShapeDtypeStruct((batch, heads * n_pb, length, *n), dtype)
    gated, per_head_bc = z is not None, not cfg.bc_warps
    bc_part = part(d_state, dtype=x.dtype) if per_head_bc else None
    own_state_side = not cfg.fuse_state_side or gated  # Tiles.fuse_state_side
    state_side = {} if not own_state_side else _call(
        _state_grad_kernel, cfg, (batch, heads * n_tiles, n_pb),
        [("x", x, spt["seq"]), ("dt", dt, spt["dt"]), ("A", A, spt["head"]),
         ("B", B, spt["grp"]), ("C", C, spt["grp"]), ("D", D, spt["head"]),
         ("z", z, spt["seq"]), ("bias", dt_bias, spt["head"]), ("dout", dout, spt["seq"]),
         ("ckpt", ckpt, spt["tile_state"]), ("dck", dstates["dck"], spt["tile_state"]),
         ("reset", reset, spt["row"])],
        [("dC", bc_part, partial_t(d_state)),
         ("ds", part(), partial_t()),
         ("dz", jax.ShapeDtypeStruct(x.shape, x.dtype) if gated else None, spt["seq"]),
         ("dy", jax.ShapeDtypeStruct(x.shape, f32) if gated else None, spt["seq"])],
        st, "ssd_bwd_state_side",
    )
    res = _call(
        _grad_kernel, cfg, (batch, heads * n_tiles, n_pb),
        [("x", x, spt["seq"]), ("dt", dt, spt["dt"]), ("A", A, spt["head"]),
         ("B", B, spt["grp"]), ("C", C, spt["grp"]), ("D", D, spt["head"]),
         ("bias", dt_bias, spt["head"]), ("dout", dout, spt["seq"]),
         ("dy", state_side.get("dy"), spt["seq"]), ("ds", state_side.get("ds"), partial_t()),
         ("ckpt", None if own_state_side else ckpt, spt["tile_state"]),
         ("dck", dstates["dck"], spt["tile_state"]), ("reset", reset, spt["row"])],
        [("dx", jax.ShapeDtypeStruct(x.shape, x.dtype), spt["seq"]),
         ("ddt", part(), partial_t()),
         ("dB", bc_part, partial_t(d_state)),
         ("sums", jax.ShapeDtypeStruct((batch, heads * n_tiles, n_pb, 4), f32),
          pl.BlockSpec((None, None, None, 4), lambda i, j, p: (i, j, p, 0)))],
        st, "ssd_bwd_grads", num_warps=cfg.grads_warps,
    )
    res |= dict(dz=state_side.get("dz"), dh0=dstates.get("dh0"))
    if per_head_bc:
        res |= dict(dB=_group_sum(res["dB"], B, heads, n_pb),
                    dC=_group_sum(state_side["dC"], B, heads, n_pb))
    else:
        res |= _group_bc_grads(x, dt, A, B, C, dt_bias, dout, state_side.get("dy"), reset, ckpt,
                               dstates["dck"], cfg, st)
    res["sums"] = res["sums"].reshape(batch, heads, n_tiles * n_pb, 4)
    return _reduce_partials(res, x, dt, A, D, dt_bias, h0, n_pb) + (None,)


def _group_bc_grads(x, dt, A, B, C, dt_bias, dout, dy, reset, ckpt, dck, cfg, st):
    """``{"dB", "dC"}`` from ``ssd_bwd_bc`` (``Tiles.group_bc``): grid (batch, block of heads *
    tile), the blocks ``bc_splits`` per group; with more than one, float32 partials per block,
    summed here."""
    batch, length, heads, head_dim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    n_tiles, splits = st["n_tiles"], cfg.bc_splits
    hpp = heads // n_groups // splits
    blk = lambda j: j // n_tiles  # the program's block of heads: group * splits + split
    head_rows = pl.BlockSpec((None, length, hpp, head_dim), lambda i, j: (i, 0, blk(j), 0))
    states = pl.BlockSpec((None, hpp, None, head_dim, d_state),
                          lambda i, j: (i, blk(j), j % n_tiles, 0, 0))
    grp = pl.BlockSpec((None, length, None, d_state), lambda i, j: (i, 0, blk(j) // splits, 0))
    heads_spec = pl.BlockSpec((heads,), lambda i, j: (0,))
    if splits == 1:
        out = [(n, jax.ShapeDtypeStruct(B.shape, v.dtype), grp) for n, v in (("dB", B), ("dC", C))]
    else:
        part = pl.BlockSpec((None, None, length, None, d_state),
                            lambda i, j: (i, blk(j) % splits, 0, blk(j) // splits, 0))
        shape = jax.ShapeDtypeStruct((batch, splits, length, n_groups, d_state), f32)
        out = [("dB", shape, part), ("dC", shape, part)]
    g = _call(
        _bc_grad_kernel, cfg, (batch, n_groups * splits * n_tiles),
        [("x", x, head_rows),
         ("dt", dt, pl.BlockSpec((None, length, hpp), lambda i, j: (i, 0, blk(j)))),
         ("A", A, heads_spec), ("B", B, grp), ("C", C, grp), ("bias", dt_bias, heads_spec),
         ("dout", dout, head_rows), ("dy", dy, head_rows), ("ckpt", ckpt, states),
         ("dck", dck, states), ("reset", reset, pl.BlockSpec((None, length), lambda i, j: (i, 0)))],
        out, st | dict(hpp=hpp), "ssd_bwd_bc", cfg.bc_stages, num_warps=cfg.bc_warps,
    )
    if splits == 1:
        return g
    return {"dB": g["dB"].sum(1).astype(B.dtype), "dC": g["dC"].sum(1).astype(C.dtype)}


def _group_sum(part, B, heads, n_pb):
    """Per-(head, column block) ``dB``/``dC`` partials ``(batch, heads * n_pb, length, N)`` summed
    in float32 into ``B``'s shape ``(batch, length, n_groups, N)`` and dtype."""
    batch, length, n_groups, d_state = B.shape
    part = part.reshape(batch, n_groups, heads // n_groups * n_pb, length, d_state)
    return jnp.transpose(part.sum(2, dtype=f32), (0, 2, 1, 3)).astype(B.dtype)


def _reduce_partials(res, x, dt, A, D, dt_bias, h0, n_pb):
    """Sum the kernels' float32 partials into gradients shaped and typed like the inputs."""
    batch, length, heads, _ = x.shape
    ddt = res["ddt"].reshape(batch, heads, n_pb, length).sum(2)
    sums = res["sums"].sum(axis=(0, 2))  # (batch, heads, programs, 4) -> (heads, 4)
    return (
        res["dx"],
        jnp.transpose(ddt, (0, 2, 1)).astype(dt.dtype),
        sums[:, 0].astype(A.dtype),
        res["dB"],
        res["dC"],
        None if D is None else sums[:, 1].astype(D.dtype),
        res.get("dz"),
        None if dt_bias is None else sums[:, 2].astype(dt_bias.dtype),
        None if h0 is None else res["dh0"].astype(h0.dtype),
    )
