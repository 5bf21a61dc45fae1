"""Mamba-1 / Mamba-2 mixers against sequential plain-JAX references written here from the math.

The references loop over time one step at a time (explicit document checks for the convolution,
an explicit state reset at each boundary) and read the mixers' own parameter trees, so they also
pin the parameter layouts that the HF mapping tables rely on. Inputs and every parameter are
fresh random values (never the structured initial ones). Errors are ``|a - b| / |b|`` over whole
arrays; tolerances (float32): outputs 1e-5, gradients 1e-4 against the references (the chunked
SSD sums in another order); decode and packed-row equalities 1e-5; Pallas interpret vs ``"xla"``
1e-4 (outputs and gradients).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm import sharding
from meshlm.config import MeshConfig
from meshlm.layers.mamba import Mamba2Mixer, MambaMixer

pytestmark = pytest.mark.usefixtures("fast_compile")

E = 16  # d_model
MAMBA1 = dict(d_state=4, d_conv=4, expand=2, use_bias=True)
MAMBA2 = dict(d_state=8, d_conv=3, expand=2, head_dim=8, n_groups=2, chunk_size=4, use_bias=True)
SEGMENTS = [[1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 0, 0],
            [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5]]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make(cls, seed, **fields):
    """A mixer, its randomised float32 params and an input ``(2, 12, E)``."""
    kx, ki, kp = jax.random.split(jax.random.key(seed), 3)
    mixer = cls(**fields, kernel_init=nn.initializers.normal(0.3),
                out_kernel_init=nn.initializers.normal(0.3))
    x = jax.random.normal(kx, (2, len(SEGMENTS[0]), E))
    params = nn.unbox(mixer.init(ki, x))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(kp, len(leaves))
    leaves = [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return mixer, jax.tree.unflatten(tree, leaves), x


# ----------------------------------------------------------------------------- references


def same_document(seg, s, t):
    """(batch,) bool: steps s <= t lie in one document (no id change in (s, t])."""
    return jnp.all(seg[:, s:t + 1] == seg[:, t:t + 1], axis=1)


def conv_ref(v, kernel, bias, seg):
    """Causal depthwise conv, one output step at a time; taps of other documents read nothing."""
    K, L = kernel.shape[0], v.shape[1]
    outs = []
    for t in range(L):
        acc = jnp.broadcast_to(bias, v[:, t].shape)
        for k in range(K):
            s = t - (K - 1 - k)
            if s >= 0:
                keep = same_document(seg, s, t).reshape((-1,) + (1,) * (v.ndim - 2))
                acc = acc + jnp.where(keep, kernel[k] * v[:, s], 0.0)
        outs.append(acc)
    return jnp.stack(outs, axis=1)


def boundary(seg, t):
    return jnp.zeros(seg.shape[0], bool) if t == 0 else seg[:, t] != seg[:, t - 1]


def mamba1_ref(p, x, seg):
    """Mamba-1 mixer, sequential; ``seg`` (batch, length) ids."""
    N = p["A_log"].shape[1]
    xz = jnp.einsum("ble,eki->blki", x, p["in_proj"]["kernel"]) + p["in_proj"]["bias"]
    u, z = xz[:, :, 0], xz[:, :, 1]
    u = jax.nn.silu(conv_ref(u, p["conv1d"]["kernel"], p["conv1d"]["bias"], seg))
    dbc = u @ p["x_proj"]["kernel"]
    R = dbc.shape[-1] - 2 * N
    dt = jax.nn.softplus(dbc[..., :R] @ p["dt_proj"]["kernel"] + p["dt_proj"]["bias"])
    B, C = dbc[..., R:R + N], dbc[..., R + N:]
    A = -jnp.exp(p["A_log"])
    h = jnp.zeros(u.shape[:1] + A.shape)
    ys = []
    for t in range(x.shape[1]):
        h = jnp.where(boundary(seg, t)[:, None, None], 0.0, h)
        h = jnp.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None]
        y = jnp.sum(h * C[:, t, None], axis=-1) + p["D"] * u[:, t]
        ys.append(y * jax.nn.silu(z[:, t]))
    y = jnp.stack(ys, axis=1)
    return y @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


def mamba2_ref(p, x, seg, *, norm_groups):
    """Mamba-2 mixer, sequential; the gated norm over ``norm_groups`` groups of channels."""
    H = p["A_log"].shape[0]
    zx = jnp.einsum("ble,eki->blki", x, p["zx_proj"]["kernel"]) + p["zx_proj"]["bias"]
    z, xs = zx[:, :, 0], zx[:, :, 1]
    bc = jnp.einsum("ble,ekgn->blkgn", x, p["bc_proj"]["kernel"]) + p["bc_proj"]["bias"]
    dt = x @ p["dt_proj"]["kernel"] + p["dt_proj"]["bias"]
    xs = jax.nn.silu(conv_ref(xs, p["conv_x"]["kernel"], p["conv_x"]["bias"], seg))
    bc = jax.nn.silu(conv_ref(bc, p["conv_bc"]["kernel"], p["conv_bc"]["bias"], seg))
    batch, L, I = xs.shape
    P = I // H
    xh = xs.reshape(batch, L, H, P)
    G, N = bc.shape[3], bc.shape[4]
    group = jnp.arange(H) // (H // G)
    B, C = bc[:, :, 0][:, :, group], bc[:, :, 1][:, :, group]  # (batch, L, H, N)
    dt = jax.nn.softplus(dt + p["dt_bias"])
    A = -jnp.exp(p["A_log"])
    h = jnp.zeros((batch, H, P, N))
    ys = []
    for t in range(L):
        h = jnp.where(boundary(seg, t)[:, None, None, None], 0.0, h)
        decay = jnp.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * xh[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(jnp.einsum("bhpn,bhn->bhp", h, C[:, t]) + p["D"][:, None] * xh[:, t])
    y = jnp.stack(ys, axis=1).reshape(batch, L, I) * jax.nn.silu(z)
    g = y.reshape(batch, L, norm_groups, I // norm_groups)
    g = g / jnp.sqrt(jnp.mean(g * g, axis=-1, keepdims=True) + 1e-5)
    y = g.reshape(batch, L, I) * p["norm"]["scale"]
    return y @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


# ----------------------------------------------------------------------------- helpers


def value_and_grads(fn, params, x, weights):
    """``fn(params, x)`` and the gradients (params, x) of a weighted sum of its outputs."""
    loss = lambda p, v: jnp.sum(fn(p, v) * weights)
    return fn(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


def assert_close(got, want, tol, what):
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = jax.tree.leaves(want)
    for (path, a), b in zip(flat_got, flat_want, strict=True):
        err = rel(a, b)
        assert err < tol, f"{what} {jax.tree_util.keystr(path)}: relative error {err:.2e} >= {tol}"


CASES = {
    "mamba1": (MambaMixer, MAMBA1, mamba1_ref),
    "mamba2": (Mamba2Mixer, MAMBA2, functools.partial(mamba2_ref, norm_groups=2)),
    "mamba2_whole_norm": (Mamba2Mixer, dict(MAMBA2, norm_per_group=False),
                          functools.partial(mamba2_ref, norm_groups=1)),
}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case,packed", [
    ("mamba1", False), ("mamba1", True), ("mamba2", False), ("mamba2", True),
    ("mamba2_whole_norm", True),
])
def test_against_sequential_reference(case, packed):
    """Forward and gradients w.r.t. the input and every parameter."""
    cls, fields, ref = CASES[case]
    mixer, params, x = make(cls, 1, **fields)
    seg = jnp.asarray(SEGMENTS) if packed else None
    ref_seg = seg if packed else jnp.ones(x.shape[:2], jnp.int32)
    weights = jax.random.normal(jax.random.key(2), x.shape)
    got = jax.jit(lambda p, v: value_and_grads(
        lambda p, v: mixer.apply({"params": p}, v, seg), p, v, weights))(params, x)
    want = value_and_grads(lambda p, v: ref(p, v, ref_seg), params, x, weights)
    assert rel(got[0], want[0]) < 1e-5
    assert_close(got[1], want[1], 1e-4, "gradient")


@pytest.mark.parametrize("cls,fields", [(MambaMixer, MAMBA1), (Mamba2Mixer, MAMBA2)],
                         ids=["mamba1", "mamba2"])
@pytest.mark.parametrize("pieces", [[1] * 12, [5, 1, 1, 3, 1, 1]], ids=["tokens", "prompt"])
def test_decode_matches_full_forward(cls, fields, pieces):
    """Feeding the sequence in pieces (tokens, or a prompt then tokens and a second prompt)
    through the decode cache gives the full forward's outputs."""
    mixer, params, x = make(cls, 3, **fields)
    full = mixer.apply({"params": params}, x)
    assert _decode_in_pieces(mixer, params, x, pieces, None, full) < 1e-5


@pytest.mark.parametrize("cls,fields", [(MambaMixer, MAMBA1), (Mamba2Mixer, MAMBA2)],
                         ids=["mamba1", "mamba2"])
def test_decode_packed_prompt(cls, fields):
    """A packed prompt, then tokens that continue its last document or start new ones."""
    mixer, params, x = make(cls, 4, **fields)
    seg = jnp.asarray(SEGMENTS)
    full = mixer.apply({"params": params}, x, seg)
    assert _decode_in_pieces(mixer, params, x, [4, 3, 1, 1, 1, 1, 1], seg, full) < 1e-5


def _decode_in_pieces(mixer, params, x, pieces, seg, full):
    decoder = mixer.clone(decode=True)
    cache = decoder.init(jax.random.key(0), x[:, :1])["cache"]
    assert all(np.all(np.asarray(c) == 0) for c in jax.tree.leaves(nn.unbox(cache)))

    @jax.jit
    def step(cache, piece, piece_seg):
        y, mutated = decoder.apply({"params": params, "cache": cache}, piece, piece_seg,
                                   mutable=["cache"])
        return y, mutated["cache"]

    outs, start = [], 0
    for n in pieces:
        piece_seg = None if seg is None else seg[:, start:start + n]
        y, cache = step(cache, x[:, start:start + n], piece_seg)
        outs.append(y)
        start += n
    assert start == x.shape[1]
    return rel(jnp.concatenate(outs, axis=1), full)


@pytest.mark.parametrize("cls,fields", [(MambaMixer, MAMBA1), (Mamba2Mixer, MAMBA2)],
                         ids=["mamba1", "mamba2"])
def test_packed_row_equals_separate_documents(cls, fields):
    mixer, params, x = make(cls, 5, **fields)
    seg = jnp.asarray(SEGMENTS)
    packed = mixer.apply({"params": params}, x, seg)
    apply = jax.jit(lambda v: mixer.apply({"params": params}, v))
    for row in range(x.shape[0]):
        ids = np.asarray(SEGMENTS[row])
        starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = apply(x[row:row + 1, a:b])
            assert rel(packed[row:row + 1, a:b], alone) < 1e-5, (row, a, b)


@pytest.mark.parametrize("cls,fields", [
    (MambaMixer, dict(MAMBA1, d_state=16)),
    (Mamba2Mixer, dict(MAMBA2, d_state=16, head_dim=16, n_groups=1, chunk_size=16)),
], ids=["mamba1", "mamba2"])
def test_pallas_interpret_matches_xla(cls, fields):
    """The Triton lowering (interpret mode) inside the mixer, packed rows, output and gradients."""
    mixer, params, x = make(cls, 6, **fields)
    seg = jnp.asarray(SEGMENTS)
    weights = jax.random.normal(jax.random.key(7), x.shape)

    def run(implementation):
        m = mixer.clone(implementation=implementation, interpret=implementation == "triton")
        fn = lambda p, v: m.apply({"params": p}, v, seg)
        return jax.jit(lambda p, v: value_and_grads(fn, p, v, weights))(params, x)

    got, want = run("triton"), run("xla")
    assert rel(got[0], want[0]) < 1e-4
    assert_close(got[1], want[1], 1e-4, "gradient")


@pytest.mark.parametrize("cls,fields,sharded", [
    (MambaMixer, MAMBA1, ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")),
    (Mamba2Mixer, MAMBA2, ("zx_proj", "dt_proj", "conv_x", "A_log", "D", "dt_bias", "norm",
                           "out_proj")),
], ids=["mamba1", "mamba2"])
def test_tensor_parallel(cls, fields, sharded):
    """On 8 devices (data=4, tensor=2, the default rules) the ``inner``/``heads`` params split over
    ``tensor``, ``B``/``C`` params do not, and a packed forward and a prompt-then-token decode give
    the single-device outputs."""
    mixer, params, x = make(cls, 8, **fields)
    x = jnp.concatenate([x, x[::-1]])
    seg = jnp.asarray(SEGMENTS * 2)
    want = mixer.apply({"params": params}, x, seg)
    mesh_cfg = MeshConfig(data=4, tensor=2)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.axis_rules(mesh_cfg)
    decoder = mixer.clone(decode=True)
    with sharding.activate(mesh, rules):
        specs = nn.get_partition_spec(jax.eval_shape(lambda: mixer.init(jax.random.key(0), x)))
        shardings = sharding.logical_to_sharding(specs, mesh, rules)["params"]
        for name, spec in shardings.items():
            leaves = jax.tree.leaves(spec, is_leaf=lambda s: hasattr(s, "spec"))
            split = any("tensor" in leaf.spec for leaf in leaves)
            assert split == (name in sharded), (name, [leaf.spec for leaf in leaves])
        params = jax.device_put(params, shardings)
        got = jax.jit(lambda p, v, s: mixer.apply({"params": p}, v, s))(params, x, seg)
        cache = decoder.init(jax.random.key(0), x[:, :1])["cache"]
        step = jax.jit(lambda c, v, s: decoder.apply({"params": params, "cache": c}, v, s,
                                                     mutable=["cache"]))
        prompt, mutated = step(cache, x[:, :-1], seg[:, :-1])
        last, _ = step(mutated["cache"], x[:, -1:], seg[:, -1:])
    assert rel(got, want) < 1e-5
    assert rel(jnp.concatenate([prompt, last], axis=1), want) < 1e-5


@pytest.mark.parametrize("cls,fields,message", [
    (Mamba2Mixer, dict(head_dim=12), "divisible by head_dim"),
    (Mamba2Mixer, dict(head_dim=8, n_groups=3), "n_groups = 3 must divide heads"),
    (Mamba2Mixer, dict(head_dim=8, chunk_size=0), "chunk_size must be a positive int"),
    (MambaMixer, dict(d_state=0), "d_state must be a positive int"),
    (MambaMixer, dict(dt_rank=0), "dt_rank must be a positive int"),
])
def test_bad_configuration_is_a_clear_error(cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields).init(jax.random.key(0), jnp.ones((1, 4, E)))


@pytest.mark.parametrize("cls", [MambaMixer, Mamba2Mixer])
def test_bad_call_is_a_clear_error(cls):
    mixer = cls(d_state=4) if cls is MambaMixer else cls(d_state=4, head_dim=8)
    x = jnp.ones((1, 4, E))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, length, d_model\)"):
        mixer.init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(batch, length\)"):
        mixer.init(jax.random.key(0), x, jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        mixer.init(jax.random.key(0), x, jnp.ones((1, 4)))
