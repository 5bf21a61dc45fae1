"""Context parallelism: attention over a length axis sharded on the ``sequence`` mesh axis.

Two methods: ring attention (below) and Ulysses (all-to-all to a head split and back; see
``context_parallel_attention``).

Each of the ``S`` devices keeps its queries while the K/V blocks (and their segment ids) travel
round the ring by ``ppermute``; at every step a device attends its queries to the block it holds
with ``flash_attention(..., return_lse=True)`` and folds the partial output into a running one by
log-sum-exp. The backward pass is a second ring that carries dK/dV with their blocks
(``ring_attention``).

Causal attention in the model's contiguous layout would leave device 0 one block of work and
device ``S-1`` all ``S``: so for causal attention the length is cut into ``2S`` chunks and device
``i`` holds chunks ``i`` and ``2S-1-i`` (zig-zag), regrouped from and back to the contiguous
layout by two ``ppermute`` each. Then every step but the first costs each device exactly half a
block product: a block from an earlier device is seen whole by all local queries through its
first chunk only, a block from a later device is seen whole by the local second chunk only, and
fully masked chunk pairs are never computed. A length that is a multiple of ``S`` but not of
``2S`` keeps the contiguous layout (correct, unbalanced: blocks from later devices are skipped).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meshlm.layers.per_shard import mesh_axes
from pallas_kernels.flash_attention import flash_attention, flash_attention_backward

Q_AXES = ("activation_batch", "activation_length", "activation_heads", None)
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", None)


def sequence_shards() -> int:
    """How many ways the current mesh and rules split ``activation_length`` (1: no context
    parallelism, or no mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.axis_names:
        return 1
    return math.prod(mesh.shape[a] for a in mesh_axes("activation_length", mesh))


def applies() -> bool:
    """Whether self-attention here runs context-parallel: the rules shard the length and
    the layer stack is not pipelined (a stage is a vmap sharded over the stage axis, inside which
    ``shard_map`` cannot run; there the partitioner gathers the length instead)."""
    mesh = jax.sharding.get_abstract_mesh()
    return sequence_shards() > 1 and not mesh_axes("activation_stage", mesh)


METHODS = ("ring", "ulysses")


def context_parallel_attention(q, k, v, segment_ids=None, *, causal: bool = True,
                               method: str = "ring", implementation: str = "auto",
                               interpret: bool = False):
    """Self-attention of ``q (B, L, H, D)`` over ``k, v (B, L, Hkv, D)`` whose length axis the
    current rules shard over the mesh (``sequence_shards() > 1``), inside ``shard_map``; batch
    and head axes stay split as the rules say. ``segment_ids (B, L)`` or None. Equals
    ``flash_attention(q, k, v, causal=causal, segment_ids=segment_ids)``.

    ``method="ring"``: ring attention (any head count). ``"ulysses"``: an all-to-all trades the
    length split for a head split, each device attends its heads over the whole length, and a
    second all-to-all trades back; it needs the local query and kv head counts divisible by the
    sequence shards, and moves 4 activations per layer instead of ring's ``S-1`` K/V blocks.
    ``implementation`` and ``interpret`` are ``flash_attention``'s, for each block.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mesh = jax.sharding.get_abstract_mesh()
    seq = mesh_axes("activation_length", mesh)
    if not seq:
        raise ValueError("context_parallel_attention needs a mesh whose rules shard "
                         "'activation_length' (mesh.sequence > 1)")
    shards = math.prod(mesh.shape[a] for a in seq)
    length = q.shape[1]
    if length % shards:
        raise ValueError(f"attention over {shards} sequence shards needs the length "
                         f"({length}) to be a multiple of {shards}")
    zigzag = causal and length % (2 * shards) == 0
    batch = mesh_axes("activation_batch", mesh)
    heads = mesh_axes("activation_heads", mesh)
    kv_heads = mesh_axes("activation_kv_heads", mesh)
    if set(heads) != set(kv_heads):
        raise ValueError(f"context parallelism needs query and kv heads split over the same mesh "
                         f"axes, got {heads} and {kv_heads} (mesh.rules)")
    manual = set(seq + batch + heads)
    b, s = batch or None, seq if len(seq) > 1 else seq[0]
    q_spec = P(b, s, heads or None, None)
    kv_spec = P(b, s, kv_heads or None, None)
    seg_spec = P(b, s)
    axis = seq if len(seq) > 1 else seq[0]

    if method == "ulysses":
        local_heads = (q.shape[2] // math.prod(mesh.shape[a] for a in heads),
                       k.shape[2] // math.prod(mesh.shape[a] for a in kv_heads))
        if local_heads[0] % shards or local_heads[1] % shards:
            raise ValueError(
                f"ulysses attention over {shards} sequence shards needs the per-device query "
                f"and kv head counts {local_heads} divisible by {shards}; use method='ring'")

    def local(q, k, v, seg=None):
        if method == "ulysses":
            return _ulysses(q, k, v, seg, axis, causal, implementation, interpret)
        if zigzag:
            q, k, v, seg = (None if x is None else to_zigzag(x, axis, shards)
                            for x in (q, k, v, seg))
        out = ring_attention(q, k, v, seg, seg, axis_name=axis, shards=shards, causal=causal,
                             zigzag=zigzag, implementation=implementation, interpret=interpret)
        return from_zigzag(out, axis, shards) if zigzag else out

    args, in_specs = (q, k, v), (q_spec, kv_spec, kv_spec)
    if segment_ids is not None:
        args, in_specs = args + (segment_ids,), in_specs + (seg_spec,)
    # check_vma=False: Pallas kernels (interpret mode included) give outputs without the
    # varying-axes type that lax.cond and loops check. q, k and v are split over every manual
    # axis (checked above), so no gradient needs a psum that the unchecked transpose would lose.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                         axis_names=manual, check_vma=False)(*args)


def _ulysses(q, k, v, seg, axis, causal, implementation, interpret):
    """Inside ``shard_map``: heads split, length whole, attend, and back."""
    def gather_length(x):  # (B, L/S, h, D) -> (B, L, h/S, D)
        return jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    if seg is not None:
        seg = jax.lax.all_gather(seg, axis, axis=1, tiled=True)
    out = flash_attention(*map(gather_length, (q, k, v)), causal=causal, segment_ids=seg,
                          implementation=implementation, interpret=interpret)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


# ----------------------------------------------------------------------------- the ring


def ring_attention(q, k, v, q_seg, kv_seg, *, axis_name, shards: int, causal: bool,
                   zigzag: bool = True, implementation: str = "auto", interpret: bool = False):
    """Inside ``shard_map``: this device's queries against every device's K/V block.

    With ``causal`` the blocks are in the zig-zag layout (``to_zigzag``) if ``zigzag``, else
    contiguous (device ``d`` holds the ``d``-th block); without, any layout. Returns the
    attention output like ``q``. ``implementation="cudnn"`` (which returns no log-sum-exp) runs
    as ``"auto"``: the fastest lowering that does.

    The backward pass is a second ring (a custom VJP): the K/V blocks travel again, each with
    the dK/dV it has gathered so far, and every device adds its queries' share of each block's
    gradient, by the backward kernel alone from the final output and log-sum-exp
    (``flash_attention_backward``); after ``S`` hops the gradients are home. So only the
    local blocks, the output and its log-sum-exp are kept (O(L/S) per device), never the
    ``S`` blocks that autodiff through the forward ring would keep.
    """
    if implementation == "cudnn":
        implementation = "auto"
    ring = _Ring(axis_name, shards, causal, zigzag, implementation, interpret)
    return _ring_vjp(ring, q, k, v, q_seg, kv_seg)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static description of one ring (hashable: the custom VJP's nondiff argument)."""

    axis_name: Any
    shards: int
    causal: bool
    zigzag: bool
    implementation: str
    interpret: bool

    def rotate(self, *xs):
        """Every device's arrays one device on round the ring (None stays None)."""
        perm = [(i, (i + 1) % self.shards) for i in range(self.shards)]
        return tuple(None if x is None else jax.lax.ppermute(x, self.axis_name, perm)
                     for x in xs)

    def block(self, step, q, k, v, q_seg, kv_seg):
        """``(out, lse)`` of the local queries against the block held at ``step`` (the block of
        device ``me - step``), masked as its place in the sequence says."""
        def attend(q, k, v, q_seg, kv_seg, causal):
            return flash_attention(q, k, v, causal=causal, q_segment_ids=q_seg,
                                   kv_segment_ids=kv_seg, return_lse=True,
                                   implementation=self.implementation, interpret=self.interpret)

        me = jax.lax.axis_index(self.axis_name)
        if not self.causal:
            return attend(q, k, v, q_seg, kv_seg, False)
        if step == 0:  # its own block: chunk order is position order, so plain causal
            return attend(q, k, v, q_seg, kv_seg, True)
        if not self.zigzag:  # an earlier device's block is seen whole, a later one's not at all
            return jax.lax.cond(step <= me, functools.partial(attend, causal=False), _unseen,
                                q, k, v, q_seg, kv_seg)
        half = q.shape[1] // 2
        return jax.lax.cond(step <= me, functools.partial(_earlier_block, attend, half),
                            functools.partial(_later_block, attend, half),
                            q, k, v, q_seg, kv_seg)


    def block_grads(self, step, q, k, v, q_seg, kv_seg, out, lse, d_out):
        """``(dq, dk, dv)``: the local queries' share of the gradient of the block held at
        ``step``, masked as in ``block``, from the final ``out`` and ``lse``."""
        def grads(q, k, v, q_seg, kv_seg, out, lse, d_out, causal):
            return flash_attention_backward(
                q, k, v, out, lse, d_out, causal=causal, q_segment_ids=q_seg,
                kv_segment_ids=kv_seg, implementation=self.implementation,
                interpret=self.interpret)

        me = jax.lax.axis_index(self.axis_name)
        args = (q, k, v, q_seg, kv_seg, out, lse, d_out)
        if not self.causal:
            return grads(*args, False)
        if step == 0:
            return grads(*args, True)
        if not self.zigzag:
            return jax.lax.cond(step <= me, functools.partial(grads, causal=False), _no_grads,
                                *args)
        half = q.shape[1] // 2
        return jax.lax.cond(step <= me, functools.partial(_earlier_grads, grads, half),
                            functools.partial(_later_grads, grads, half), *args)


def _ring_forward(ring, q, k, v, q_seg, kv_seg):
    out = lse = None
    for step in range(ring.shards):
        if step:
            k, v, kv_seg = ring.rotate(k, v, kv_seg)
        part = ring.block(step, q, k, v, q_seg, kv_seg)
        out, lse = part if out is None else _merge(out, lse, *part)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_vjp(ring, q, k, v, q_seg, kv_seg):
    return _ring_forward(ring, q, k, v, q_seg, kv_seg)[0]


def _ring_vjp_fwd(ring, q, k, v, q_seg, kv_seg):
    out, lse = _ring_forward(ring, q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _ring_vjp_bwd(ring, residuals, d_out):
    """Each block's gradient comes from the final output and log-sum-exp (``P_b = exp(S_b -
    lse)``, ``delta = rowsum(dO O)``): the backward kernel alone per block, no block forward
    recomputed and no log-sum-exp cotangent (which would cost a second backward call)."""
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out = d_out.astype(out.dtype)
    dq = dk = dv = None
    for step in range(ring.shards):
        if step:
            k, v, kv_seg, dk, dv = ring.rotate(k, v, kv_seg, dk, dv)
        grads = [g.astype(jnp.float32) for g in
                 ring.block_grads(step, q, k, v, q_seg, kv_seg, out, lse, d_out)]
        dq, dk, dv = grads if dq is None else (dq + grads[0], dk + grads[1], dv + grads[2])
    dk, dv = ring.rotate(dk, dv)  # the S-th hop brings each block's gradient home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_vjp.defvjp(_ring_vjp_fwd, _ring_vjp_bwd)


def _unseen(q, k, v, q_seg, kv_seg):
    """A later device's block in the contiguous layout: no local query sees any of it."""
    lse = jnp.full_like(jnp.swapaxes(q[..., 0], 1, 2), -jnp.inf, dtype=jnp.float32)
    return jnp.zeros_like(q), lse


def _earlier_block(attend, half, q, k, v, q_seg, kv_seg):
    """The block of an earlier device: every local query sees its first chunk, none its second."""
    kv_seg = None if kv_seg is None else kv_seg[:, :half]
    return attend(q, k[:, :half], v[:, :half], q_seg, kv_seg, False)


def _later_block(attend, half, q, k, v, q_seg, kv_seg):
    """The block of a later device: the local second chunk sees all of it, the first nothing."""
    q_seg = None if q_seg is None else q_seg[:, half:]
    out, lse = attend(q[:, half:], k, v, q_seg, kv_seg, False)
    out = jnp.concatenate([jnp.zeros_like(out), out], axis=1)
    return out, jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=2)


def _no_grads(q, k, v, *_):
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)


def _earlier_grads(grads, half, q, k, v, q_seg, kv_seg, out, lse, d_out):
    """``_earlier_block``'s gradient: the block's first chunk gets all of it."""
    kv_seg = None if kv_seg is None else kv_seg[:, :half]
    dq, dk, dv = grads(q, k[:, :half], v[:, :half], q_seg, kv_seg, out, lse, d_out, False)
    return dq, jnp.concatenate([dk, jnp.zeros_like(dk)], 1), jnp.concatenate(
        [dv, jnp.zeros_like(dv)], 1)


def _later_grads(grads, half, q, k, v, q_seg, kv_seg, out, lse, d_out):
    """``_later_block``'s gradient: only the local second chunk's queries contribute."""
    q_seg = None if q_seg is None else q_seg[:, half:]
    dq, dk, dv = grads(q[:, half:], k, v, q_seg, kv_seg, out[:, half:], lse[..., half:],
                       d_out[:, half:], False)
    return jnp.concatenate([jnp.zeros_like(dq), dq], 1), dk, dv


def _merge(out_a, lse_a, out_b, lse_b):
    """Two attention outputs over disjoint key sets -> the output over their union (float32).

    ``lse (B, H, L)`` is ``-inf`` for a query that saw no key; such rows stay zero with zero
    gradients (every division and log is guarded on both branches of its ``where``)."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = w_a + w_b
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)

    def weigh(o, w):  # (B, H, L) weights onto (B, L, H, D) outputs
        return o.astype(jnp.float32) * jnp.swapaxes(w / safe, 1, 2)[..., None]

    return weigh(out_a, w_a) + weigh(out_b, w_b), lse


# ----------------------------------------------------------------------------- zig-zag layout


def _contiguous(shards):
    return [(2 * d, 2 * d + 1) for d in range(shards)]


def _zigzag(shards):
    return [(d, 2 * shards - 1 - d) for d in range(shards)]


def to_zigzag(x, axis_name, shards: int):
    """Inside ``shard_map``: device ``d`` holding chunks ``2d, 2d+1`` of the length axis (axis 1)
    -> holding chunks ``d, 2S-1-d``."""
    return _regroup(x, axis_name, _contiguous(shards), _zigzag(shards))


def from_zigzag(x, axis_name, shards: int):
    """The inverse of ``to_zigzag``."""
    return _regroup(x, axis_name, _zigzag(shards), _contiguous(shards))


def _regroup(x, axis_name, src, dst):
    """Move the two chunks of axis 1 that device ``d`` holds (``src[d]``, in order) so that it
    holds ``dst[d]``, by two ``ppermute``: one per slot, grouped by the side (sending or
    receiving) on which each transfer's slot is the same on every device."""
    where_src = {c: (d, s) for d, pair in enumerate(src) for s, c in enumerate(pair)}
    where_dst = {c: (d, s) for d, pair in enumerate(dst) for s, c in enumerate(pair)}
    by_src = [[(*where_src[c], *where_dst[c]) for c in (pair[s] for pair in src)]
              for s in range(2)]
    by_dst = [[(*where_src[c], *where_dst[c]) for c in (pair[s] for pair in dst)]
              for s in range(2)]
    # Transfers (src_dev, src_slot, dst_dev, dst_slot); each group must send one chunk from and
    # deliver one chunk to every device.
    def one_to_one(g):
        return len({t[0] for t in g}) == len({t[2] for t in g}) == len(g)

    groups = by_src if all(map(one_to_one, by_src)) else by_dst
    assert all(map(one_to_one, groups)), (src, dst)
    me = jax.lax.axis_index(axis_name)
    half = x.shape[1] // 2
    chunks = (x[:, :half], x[:, half:])
    received = []
    for group in groups:
        send_slot = [0] * len(src)
        recv_slot = [0] * len(src)
        for s_dev, s_slot, d_dev, d_slot in group:
            send_slot[s_dev], recv_slot[d_dev] = s_slot, d_slot
        sent = jnp.where(jnp.asarray(send_slot)[me] == 0, chunks[0], chunks[1])
        got = jax.lax.ppermute(sent, axis_name, [(t[0], t[2]) for t in group])
        received.append((jnp.asarray(recv_slot)[me], got))
    (slot_a, a), (_, b) = received
    first = jnp.where(slot_a == 0, a, b)
    second = jnp.where(slot_a == 0, b, a)
    return jnp.concatenate([first, second], axis=1)
