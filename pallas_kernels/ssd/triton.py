"""Mamba-2 SSD as Pallas GPU kernels, Triton lowering.

Grid: one program per (batch row, head, block of ``block_p`` head_dim columns). A program keeps
its state tile ``H (block_p, d_state)`` in float32 registers and walks the sequence in tiles of
``block_t`` steps; inside a tile the work is the chunked SSD of ``common.Chunk``: four products on
the tensor cores (``C B^T``, ``(L * C B^T) (dt x)``, ``C H^T``, ``(dt x)^T B``), exact float32
cumulative decays, and the ``D`` skip and ``silu(z)`` gate fused before ``y`` is written once.

Memory stays linear in length without per-step states: the forward saves ``H`` only every
``chunk_size`` steps (``(batch, heads, n_chunks, head_dim, d_state)`` float32, what the Mamba-2
kernels keep too). The backward walks the tiles in reverse; for each it recomputes the state
entering the tile from the chunk's checkpoint (replaying at most ``chunk_size / block_t - 1``
state updates, one small product each), then applies ``common.chunk_backward`` with the state
gradient ``dH`` carried in registers.

Sums over programs are written as float32 partials and reduced outside (deterministic, no
atomics): ``dB``/``dC`` per (head, column block), ``ddt`` per column block, and the per-head
scalars ``dA``, ``dD``, ``ddt_bias`` per (batch row, column block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ssd import common

f32 = jnp.float32


def supports(x_shape, B_shape, chunk_size, block_t, block_p) -> str | None:
    """Why this lowering cannot run the call (None if it can)."""
    head_dim, d_state = x_shape[3], B_shape[3]
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    if not pow2(head_dim) or not pow2(d_state):
        return f"head_dim ({head_dim}) and d_state ({d_state}) must be powers of two >= 16"
    if not pow2(block_t) or chunk_size % block_t:
        return f"block_t ({block_t}) must be a power of two >= 16 dividing chunk_size ({chunk_size})"
    if not pow2(block_p) or head_dim % block_p:
        return f"block_p ({block_p}) must be a power of two >= 16 dividing head_dim ({head_dim})"
    return None


def _tile(r, t0, T, length, bias, softplus, dtype, *, with_z, with_dout, with_C=True):
    """Load the ``T`` steps from ``t0`` (zeros past the end); returns a dict of values."""
    t = t0 + jax.lax.broadcasted_iota(jnp.int32, (T,), 0)
    valid = t < length

    def load(ref):
        mask = jnp.broadcast_to(valid.reshape((T,) + (1,) * (ref.ndim - 1)), (T, *ref.shape[1:]))
        return plgpu.load(ref.at[pl.ds(t0, T)], mask=mask, other=0.0)

    raw = load(r.dt).astype(f32)
    if bias is not None:
        raw = raw + bias
    dt = jnp.where(valid, common.softplus(raw) if softplus else raw, 0.0)
    v = dict(valid=valid, raw=raw, dt=dt, x=load(r.x).astype(dtype), B=load(r.B).astype(dtype))
    if with_C:
        v["C"] = load(r.C).astype(dtype)
    if with_z:
        v["z"] = load(r.z)
    if with_dout:
        v["dout"] = load(r.dout).astype(f32)
    return v


def _store(ref, t0, valid, value):
    T = valid.shape[0]
    mask = jnp.broadcast_to(valid.reshape((T,) + (1,) * (value.ndim - 1)), value.shape)
    plgpu.store(ref.at[pl.ds(t0, T)], value.astype(ref.dtype), mask=mask)


def _head_scalars(r):
    h = pl.program_id(1)
    A = r.A[h].astype(f32)
    D = None if r.D is None else r.D[h].astype(f32)
    bias = None if r.bias is None else r.bias[h].astype(f32)
    return A, D, bias


def _fwd_kernel(*refs, length, T, n_sub, n_tiles, n_chunks, softplus, dtype, flags):
    r = common.Refs(refs, flags)
    A, D, bias = _head_scalars(r)
    H = jnp.zeros(r.h_final.shape, f32) if r.h0 is None else r.h0[...].astype(f32)

    def tile_body(i, H):
        t0 = i * T
        v = _tile(r, t0, T, length, bias, softplus, dtype, with_z=r.z is not None, with_dout=False)
        c = common.Chunk(v["x"], v["dt"], A, v["B"], v["C"], dtype)
        _store(r.y, t0, v["valid"], common.chunk_output(c, H, D, v.get("z")))
        return c.next_state(H)

    def chunk_body(k, H):
        if r.ckpt is not None:
            r.ckpt[k] = H
        return jax.lax.fori_loop(k * n_sub, jnp.minimum((k + 1) * n_sub, n_tiles), tile_body, H)

    r.h_final[...] = jax.lax.fori_loop(0, n_chunks, chunk_body, H)


def _bwd_kernel(*refs, length, T, n_sub, n_tiles, softplus, dtype, flags):
    r = common.Refs(refs, flags)
    A, D, bias = _head_scalars(r)
    dH = jnp.zeros(r.ckpt.shape[1:], f32) if r.dh_final is None else r.dh_final[...].astype(f32)
    zero = jnp.zeros((), f32)

    def replay(j, H):
        v = _tile(r, j * T, T, length, bias, softplus, dtype, with_z=False, with_dout=False,
                  with_C=False)
        return common.next_state(v["x"], v["dt"], A, v["B"], H, dtype)

    def tile_body(it, carry):
        dH, dA, dD, dbias = carry
        i = n_tiles - 1 - it
        k = i // n_sub
        H = jax.lax.fori_loop(k * n_sub, i, replay, r.ckpt[k].astype(f32))
        t0 = i * T
        v = _tile(r, t0, T, length, bias, softplus, dtype, with_z=r.z is not None, with_dout=True)
        c = common.Chunk(v["x"], v["dt"], A, v["B"], v["C"], dtype)
        g = common.chunk_backward(c, H, dH, v["dout"], A, D, v.get("z"))
        ddt = g["ddt"] * common.sigmoid(v["raw"]) if softplus else g["ddt"]
        ddt = jnp.where(v["valid"], ddt, 0.0)
        valid = v["valid"]
        _store(r.dx, t0, valid, g["dx"])
        _store(r.ddt, t0, valid, ddt)
        _store(r.dB, t0, valid, g["dB"])
        _store(r.dC, t0, valid, g["dC"])
        if r.dz is not None:
            _store(r.dz, t0, valid, g["dz"])
        dD = dD if D is None else dD + g["dD"]
        return g["dH"], dA + g["dA"], dD, dbias + jnp.sum(ddt)

    dH, dA, dD, dbias = jax.lax.fori_loop(0, n_tiles, tile_body, (dH, zero, zero, zero))
    lane = jax.lax.broadcasted_iota(jnp.int32, (4,), 0)
    r.sums[...] = jnp.where(lane == 0, dA, jnp.where(lane == 1, dD, jnp.where(lane == 2, dbias, 0.0)))
    if r.dh0 is not None:
        r.dh0[...] = dH


def _specs(x_shape, B_shape, block_p):
    """BlockSpecs for grid (batch, head, column block)."""
    _, length, heads, _ = x_shape
    n_groups, d_state = B_shape[2], B_shape[3]
    rep = heads // n_groups
    return dict(
        seq=pl.BlockSpec((None, length, None, block_p), lambda i, j, k: (i, 0, j, k)),
        dt=pl.BlockSpec((None, length, None), lambda i, j, k: (i, 0, j)),
        grp=pl.BlockSpec((None, length, None, d_state), lambda i, j, k: (i, 0, j // rep, 0)),
        head=pl.BlockSpec((heads,), lambda i, j, k: (0,)),
        state=pl.BlockSpec((None, None, block_p, d_state), lambda i, j, k: (i, j, k, 0)),
    )


def forward(x, dt, A, B, C, D, z, dt_bias, h0, cfg: common.SSDConfig, *, save_checkpoints):
    """Returns ``(y, final_state, checkpoints or None)``; states float32."""
    batch, length, heads, head_dim = x.shape
    d_state = B.shape[3]
    T, block_p = cfg.block_t, cfg.block_p
    n_chunks = pl.cdiv(length, cfg.chunk_size)
    sp = _specs(x.shape, B.shape, block_p)
    in_flags, args, in_specs = common.operands([
        ("x", x, sp["seq"]), ("dt", dt, sp["dt"]), ("A", A, sp["head"]), ("B", B, sp["grp"]),
        ("C", C, sp["grp"]), ("D", D, sp["head"]), ("z", z, sp["seq"]),
        ("bias", dt_bias, sp["head"]), ("h0", h0, sp["state"]),
    ])
    ckpt_shape = (batch, heads, n_chunks, head_dim, d_state)
    out = [
        ("y", jax.ShapeDtypeStruct(x.shape, x.dtype), sp["seq"]),
        ("h_final", jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), f32), sp["state"]),
    ]
    if save_checkpoints:
        out.append((
            "ckpt",
            jax.ShapeDtypeStruct(ckpt_shape, f32),
            pl.BlockSpec((None, None, n_chunks, block_p, d_state), lambda i, j, k: (i, j, 0, k, 0)),
        ))
    kernel = functools.partial(
        _fwd_kernel, length=length, T=T, n_sub=cfg.chunk_size // T, n_tiles=pl.cdiv(length, T),
        n_chunks=n_chunks, softplus=cfg.dt_softplus, dtype=x.dtype,
        flags=in_flags + (("y", True), ("h_final", True), ("ckpt", save_checkpoints)),
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=[s for _, s, _ in out],
        grid=(batch, heads, head_dim // block_p),
        in_specs=in_specs,
        out_specs=[s for _, _, s in out],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name="ssd_fwd",
    )(*args)
    return outs[0], outs[1], (outs[2] if save_checkpoints else None)


def backward(dout, dh_final, x, dt, A, B, C, D, z, dt_bias, h0, ckpt, cfg: common.SSDConfig):
    """Gradients ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0)``, None for absent inputs."""
    batch, length, heads, head_dim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    T, block_p = cfg.block_t, cfg.block_p
    n_pb = head_dim // block_p
    n_chunks = ckpt.shape[2]
    sp = _specs(x.shape, B.shape, block_p)
    in_flags, args, in_specs = common.operands([
        ("x", x, sp["seq"]), ("dt", dt, sp["dt"]), ("A", A, sp["head"]), ("B", B, sp["grp"]),
        ("C", C, sp["grp"]), ("D", D, sp["head"]), ("z", z, sp["seq"]),
        ("bias", dt_bias, sp["head"]), ("dout", dout, sp["seq"]),
        ("dh_final", dh_final, sp["state"]),
        ("ckpt", ckpt,
         pl.BlockSpec((None, None, n_chunks, block_p, d_state), lambda i, j, k: (i, j, 0, k, 0))),
    ])
    partial_t = lambda *n: pl.BlockSpec(
        (None, None, length, *n), lambda i, j, k: (i, j * n_pb + k, 0) + (0,) * len(n)
    )
    out = [
        ("dx", True, jax.ShapeDtypeStruct(x.shape, x.dtype), sp["seq"]),
        ("ddt", True, jax.ShapeDtypeStruct((batch, heads * n_pb, length), f32), partial_t()),
        ("dB", True, jax.ShapeDtypeStruct((batch, heads * n_pb, length, d_state), f32),
         partial_t(d_state)),
        ("dC", True, jax.ShapeDtypeStruct((batch, heads * n_pb, length, d_state), f32),
         partial_t(d_state)),
        ("dz", z is not None, jax.ShapeDtypeStruct(x.shape, getattr(z, "dtype", f32)), sp["seq"]),
        ("sums", True, jax.ShapeDtypeStruct((batch, heads, n_pb, 4), f32),
         pl.BlockSpec((None, None, None, 4), lambda i, j, k: (i, j, k, 0))),
        ("dh0", h0 is not None, jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), f32),
         sp["state"]),
    ]
    present = [(s, spec) for _, p, s, spec in out if p]
    kernel = functools.partial(
        _bwd_kernel, length=length, T=T, n_sub=cfg.chunk_size // T, n_tiles=pl.cdiv(length, T),
        softplus=cfg.dt_softplus, dtype=x.dtype,
        flags=in_flags + tuple((name, p) for name, p, _, _ in out),
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=[s for s, _ in present],
        grid=(batch, heads, n_pb),
        in_specs=in_specs,
        out_specs=[spec for _, spec in present],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name="ssd_bwd",
    )(*args)
    res = dict(zip([name for name, p, _, _ in out if p], outs))
    return reduce_partials(res, x, dt, A, B, D, dt_bias, h0, n_groups, n_pb)


def reduce_partials(res, x, dt, A, B, D, dt_bias, h0, n_groups, n_pb):
    """Sum the kernels' float32 partials into gradients shaped and typed like the inputs."""
    batch, length, heads, _ = x.shape
    d_state = B.shape[3]

    def group_sum(part):
        # (batch, heads * n_pb, length, N) -> (batch, length, n_groups, N)
        part = part.reshape(batch, n_groups, heads // n_groups * n_pb, length, d_state).sum(2)
        return jnp.transpose(part, (0, 2, 1, 3)).astype(B.dtype)

    ddt = res["ddt"].reshape(batch, heads, n_pb, length).sum(2)
    sums = res["sums"].sum(axis=(0, 2))  # (heads, 4)
    return (
        res["dx"],
        jnp.transpose(ddt, (0, 2, 1)).astype(dt.dtype),
        sums[:, 0].astype(A.dtype),
        group_sum(res["dB"]),
        group_sum(res["dC"]),
        None if D is None else sums[:, 1].astype(D.dtype),
        res.get("dz"),
        None if dt_bias is None else sums[:, 2].astype(dt_bias.dtype),
        None if h0 is None else res["dh0"].astype(h0.dtype),
    )
