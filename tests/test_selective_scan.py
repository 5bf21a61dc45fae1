"""Selective scan (Mamba-1): Pallas kernels in interpret mode against the float32 reference.

Every check draws fresh random inputs (never zeros) and compares forward outputs, final states and
the gradient of every input by relative error ``||x - ref|| / ||ref||``. Tolerances: float32
inputs 1e-5 (outputs) / 1e-4 (gradients: different summation order over time and channels);
bfloat16 inputs 1e-2 (one bfloat16 rounding of each output and input gradient, 2**-8 relative).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernel_checks import rel_err, verified_triton_modules

from pallas_kernels import lowering_for
from pallas_kernels.selective_scan import (
    reference,
    selective_scan,
    selective_scan_step,
    tpu,
    triton,
)
from pallas_kernels.selective_scan.api import DISPATCH
from pallas_kernels.selective_scan.common import Call

pytestmark = pytest.mark.usefixtures("fast_compile")

_seeds = itertools.count(1000)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(batch, length, d_inner, n_groups, d_state, dtype, *, full=True):
    """Random inputs in Mamba's ranges; the optional ones only when ``full``."""
    k = jax.random.split(jax.random.key(next(_seeds)), 9)
    x = {
        "u": jax.random.normal(k[0], (batch, length, d_inner)),
        "delta": 0.5 * jax.random.normal(k[1], (batch, length, d_inner)),
        "A": -jnp.exp(0.5 * jax.random.normal(k[2], (d_inner, d_state))),
        "B": jax.random.normal(k[3], (batch, length, n_groups, d_state)),
        "C": jax.random.normal(k[4], (batch, length, n_groups, d_state)),
    }
    if full:
        x["D"] = jax.random.normal(k[5], (d_inner,))
        x["z"] = jax.random.normal(k[6], (batch, length, d_inner))
        x["dt_bias"] = 0.3 * jax.random.normal(k[7], (d_inner,))
        x["initial_state"] = jax.random.normal(k[8], (batch, d_inner, d_state))
    # A and the state stay float32 (as Mamba keeps them); activations take the test dtype.
    return {n: v if n in ("A", "initial_state") else v.astype(dtype) for n, v in x.items()}


def scan_loss(fn, inputs, weights, **kwargs):
    """A scalar touching every output element with a distinct weight (and the final state)."""
    names = tuple(inputs)

    def loss(*args):
        y, h = fn(**dict(zip(names, args)), return_final_state=True, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * weights[0]) + jnp.sum(h * weights[1])

    return jax.value_and_grad(loss, argnums=tuple(range(len(names))))


def check_against_reference(implementation, inputs, *, softplus, tol_out, tol_grad, **kwargs):
    """Forward (without checkpoints), final state and every gradient of one kernel configuration."""
    names = tuple(inputs)
    kw = jax.random.split(jax.random.key(next(_seeds)))
    y_ref, h_ref = reference.selective_scan(
        **inputs, dt_softplus=softplus, return_final_state=True
    )
    weights = (jax.random.normal(kw[0], y_ref.shape), jax.random.normal(kw[1], h_ref.shape))
    _, g_ref = scan_loss(reference.selective_scan, inputs, weights, dt_softplus=softplus)(
        *inputs.values()
    )

    fn = lambda **a: selective_scan(**a, implementation=implementation, interpret=True, **kwargs)

    @jax.jit  # one compilation for the forward and the backward
    def run(*args):
        y, h = fn(**dict(zip(names, args)), dt_softplus=softplus, return_final_state=True)
        return y, h, scan_loss(fn, inputs, weights, dt_softplus=softplus)(*args)[1]

    y, h, g = run(*inputs.values())
    assert y.dtype == inputs["u"].dtype and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < tol_out
    assert rel_err(h, h_ref) < tol_out
    for name, a, b in zip(names, g, g_ref):
        assert a.dtype == inputs[name].dtype and a.shape == inputs[name].shape, name
        assert rel_err(a, b) < tol_grad, (name, rel_err(a, b))


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    "dtype,full,n_groups,length,d_state",
    [(jnp.float32, True, 2, 8, 3), (jnp.bfloat16, False, 1, 7, 4)],
    ids=["f32-all-features-groups", "bf16-minimal"],
)
def test_triton_matches_reference(dtype, full, n_groups, length, d_state):
    # d_inner 16 with block_d 4 gives two channel blocks per group; chunk 3 does not divide the
    # length, so the partial last chunk and the checkpoints between chunks are exercised.
    inputs = make_inputs(2, length, 16, n_groups, d_state, dtype, full=full)
    tol = (1e-5, 1e-4) if dtype == jnp.float32 else (1e-2, 1e-2)
    check_against_reference("triton", inputs, softplus=full, tol_out=tol[0], tol_grad=tol[1],
                            tiles=triton.Tiles(block_d=4, chunk=3, forward_chunk=3))


@pytest.mark.parametrize(
    "segments,length,chunk", [(2, 11, 2), (4, 13, 3)], ids=["2-segments", "4-segments"]
)
def test_triton_segments_match_reference(segments, length, chunk):
    # The segment-parallel forward (then the sequential backward over its checkpoints) with an
    # initial state and every feature: lengths that neither the segments nor the chunks divide,
    # so a segment ends inside the sequence, the last is partial and (13 = 3 * 5 - 2 with 4
    # segments of 2 chunks) one chunk lies wholly past the end.
    inputs = make_inputs(2, length, 16, 2, 3, jnp.float32, full=True)
    check_against_reference("triton", inputs, softplus=True, tol_out=1e-5, tol_grad=1e-4,
                            tiles=triton.Tiles(4, chunk, chunk, segments=segments))


@pytest.mark.parametrize("dtype,full,length", [(jnp.float32, True, 37), (jnp.bfloat16, False, 16)],
                         ids=["f32-all-features", "bf16-minimal"])
def test_triton_parallel_matches_reference(dtype, full, length):
    # The forward without checkpoints, each 16-step chunk as one parallel scan (in interpret mode
    # lax.associative_scan), then the training pass (sequential, 3-step chunks): 37 steps end in
    # a partial third chunk; two B/C groups; with every feature an initial state enters the
    # first chunk.
    inputs = make_inputs(2, length, 16, 2, 3, dtype, full=full)
    tol = (1e-5, 1e-4) if dtype == jnp.float32 else (1e-2, 1e-2)
    check_against_reference("triton", inputs, softplus=full, tol_out=tol[0], tol_grad=tol[1],
                            tiles=triton.Tiles(4, 3, 16, parallel=True))


def test_triton_parallel_with_resets_matches_the_sequential_kernel():
    """Random document starts over 45 steps (three 16-step chunks, starts inside and at chunk
    edges), every feature: the parallel forward's output and final state equal the sequential
    kernel's (itself checked against documents run alone), float32 to 1e-5."""
    inputs = make_inputs(2, 45, 8, 1, 3, jnp.float32, full=True)
    rng = np.random.default_rng(next(_seeds))
    reset = jnp.asarray(rng.random((2, 45)) < 0.15).at[:, 16].set(True).at[:, 0].set(False)
    (y_seq, h_seq), (y_par, h_par) = [jax.jit(lambda a: selective_scan(  # noqa: B023
        **a, reset=reset, dt_softplus=True, return_final_state=True, implementation="triton",
        interpret=True, tiles=tiles))(inputs)
        for tiles in (triton.Tiles(4, 3, 3), triton.Tiles(4, 3, 16, parallel=True))]
    assert rel_err(y_seq, y_par) < 1e-5 and rel_err(h_seq, h_par) < 1e-5


def test_triton_parallel_lowers_to_verified_triton():
    """For an H100, the parallel forward (Triton's scan over ``(chunk, block_d, d_state)`` tiles;
    resets and every feature) passes the MLIR verifier; a training pass keeps the sequential
    kernels."""
    sds = jax.ShapeDtypeStruct
    b, length, d, n = 2, 100, 64, 16
    bf, seq = jnp.bfloat16, (b, length, d)
    args = dict(u=sds(seq, bf), delta=sds(seq, bf), A=sds((d, n), jnp.float32),
                B=sds((b, length, 1, n), bf), C=sds((b, length, 1, n), bf), D=sds((d,), bf),
                z=sds(seq, bf), dt_bias=sds((d,), bf))
    reset = sds((b, length), bool)

    fn = lambda a, reset: selective_scan(**a, reset=reset, dt_softplus=True,  # noqa: E731
                                         implementation="triton",
                                         tiles=triton.Tiles(8, 4, 16, parallel=True))

    def fwd_bwd(args, reset):
        y, vjp = jax.vjp(lambda a: fn(a, reset), args)
        return vjp(y)

    with verified_triton_modules() as checked, lowering_for("NVIDIA H100"):
        text = jax.jit(fn).trace(args, reset).lower(lowering_platforms=("cuda",)).as_text()
        train = jax.jit(fwd_bwd).trace(args, reset).lower(lowering_platforms=("cuda",)).as_text()
    assert checked[0] == 3
    assert "selective_scan_fwd_parallel" in text and "selective_scan_fwd_parallel" not in train
    assert "selective_scan_bwd" in train


def test_triton_segments_boundary_pass():
    # enter_states against a sequential composition of the per-segment affine maps.
    k = jax.random.split(jax.random.key(next(_seeds)), 4)
    h_local = jax.random.normal(k[0], (2, 3, 4, 5))
    dt_sum = jax.nn.softplus(jax.random.normal(k[1], (2, 3, 4)))
    A = -jnp.exp(jax.random.normal(k[2], (4, 5)))
    h0 = jax.random.normal(k[3], (2, 4, 5))
    enter, final = triton.enter_states(h_local, dt_sum, A, h0)
    h = h0
    for s in range(3):
        assert rel_err(enter[:, s], h) < 1e-6
        h = jnp.exp(dt_sum[:, s, :, None] * A) * h + h_local[:, s]
    assert rel_err(final, h) < 1e-6


@pytest.mark.parametrize(
    "dtype,full,n_groups,length,d_inner,tiles",
    [(jnp.float32, True, 2, 150, 256, tpu.Tiles(block_d=128, chunk=128)),
     (jnp.bfloat16, False, 1, 20, 64, None)],
    ids=["f32-all-features-groups", "bf16-minimal"],
)
def test_tpu_matches_reference(dtype, full, n_groups, length, d_inner, tiles):
    # The f32 case runs two 128-step chunks (the second partial) over one 128-lane block per
    # group; the bf16 case (default tiles) one chunk covering the whole (unaligned) length and all
    # 64 channels.
    inputs = make_inputs(1, length, d_inner, n_groups, 3, dtype, full=full)
    tol = (1e-5, 1e-4) if dtype == jnp.float32 else (1e-2, 1e-2)
    check_against_reference(
        "tpu", inputs, softplus=full, tol_out=tol[0], tol_grad=tol[1], tiles=tiles
    )


def test_triton_under_vmap_and_jit():
    inputs = make_inputs(1, 7, 8, 1, 4, jnp.float32)
    stacked = {n: jnp.stack([v, 0.5 * v]) for n, v in inputs.items()}
    fn = lambda **a: selective_scan(
        **a, dt_softplus=True, implementation="triton", interpret=True, tiles=triton.Tiles(8, 4, 4)
    )
    y = jax.jit(jax.vmap(lambda a: fn(**a)))(stacked)
    for i in range(2):
        one = {n: v[i] for n, v in stacked.items()}
        y_ref = reference.selective_scan(**one, dt_softplus=True)
        assert rel_err(y[i], y_ref) < 1e-5


def test_triton_inside_shard_map():
    """Batch split over 2 of the 8 fake CPU devices, forward and gradient.

    check_vma=False: jax 0.11's interpret mode drops the varying-axes type of refs carried
    through a fori_loop; compiled kernels do not take that path.
    """
    inputs = make_inputs(2, 6, 8, 1, 4, jnp.float32, full=False)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    batch = P("data")
    scan = jax.shard_map(
        lambda *a: selective_scan(*a, implementation="triton", interpret=True,
                                  tiles=triton.Tiles(8, 4, 4)),
        mesh=mesh, in_specs=(batch, batch, P(), batch, batch), out_specs=batch, check_vma=False,
    )  # fmt: skip
    args = tuple(inputs.values())
    loss = lambda f: jax.grad(lambda u, *a: jnp.sum(jnp.sin(f(u, *a))))
    assert rel_err(jax.jit(scan)(*args), reference.selective_scan(*args)) < 1e-5
    assert rel_err(jax.jit(loss(scan))(*args), loss(reference.selective_scan)(*args)) < 1e-4


@pytest.mark.parametrize("implementation", ["triton", "tpu"])
def test_kernels_type_check_inside_shard_map(implementation):
    """Under shard_map's varying-axes check (check_vma=True) the kernels' outputs name the mesh axes
    they vary over and the gradients of the replicated A, D, dt_bias are summed over the
    batch shards: the gradient of every input traces (running it would hit the interpret-mode
    limitation above; the numbers are checked there)."""
    inputs = make_inputs(2, 6, 8, 1, 4, jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    specs = tuple(P() if n in ("A", "D", "dt_bias") else P("data") for n in NAMES)
    scan = jax.shard_map(
        lambda *a: selective_scan(**dict(zip(NAMES, a)), implementation=implementation,
                                  interpret=True),
        mesh=mesh, in_specs=specs, out_specs=P("data"),
    )  # fmt: skip
    args = tuple(inputs[n] for n in NAMES)
    grads = jax.eval_shape(jax.grad(lambda *a: jnp.sum(scan(*a)), argnums=range(9)), *args)
    assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in args]


# ----------------------------------------------------------------------------- packed documents

# Row 0 holds documents of 3, 4 and 5 steps (its first continues the initial state), row 1 of
# 6, 2 and 4 with a reset at step 0 (the initial state is dropped). With 3-step chunks the starts
# at 3 and 6 open a chunk (the checkpoint is the previous document's state), 7 and 8 fall inside
# one. With 4 segments of one chunk, row 0's last and row 1's second hold no reset: the state
# entering them must pass through.
DOC_STARTS = ((3, 7), (0, 6, 8))
RESET_LENGTH = 12
RESET_IMPLS = {
    "xla": dict(implementation="xla"),  # the reference (its lax.scan), through the API
    "triton": dict(implementation="triton", interpret=True, tiles=triton.Tiles(4, 3, 3)),
    "triton-segments": dict(implementation="triton", interpret=True,
                            tiles=triton.Tiles(4, 3, 3, segments=4)),
    "tpu": dict(implementation="tpu", interpret=True, tiles=tpu.Tiles(8, RESET_LENGTH)),
}


def _per_document(u, delta, A, B, C, *, z=None, initial_state=None, **kw):
    """The oracle of ``reset``: every document of every row run alone through the reference (a
    row's first document from ``initial_state`` unless it starts at step 0), concatenated; the
    final state is the row's last document's."""
    ys, hs = [], []
    for b, starts in enumerate(DOC_STARTS):
        h = None if initial_state is None or starts[0] == 0 else initial_state[b:b + 1]
        bounds = sorted({0, *starts, RESET_LENGTH})
        row = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            piece = lambda v: None if v is None else v[b:b + 1, s:e]
            y, h = reference.selective_scan(
                piece(u), piece(delta), A, piece(B), piece(C), z=piece(z),
                initial_state=h if s == 0 else None, **kw)
            row.append(y)
        ys.append(jnp.concatenate(row, axis=1))
        hs.append(h)
    return jnp.concatenate(ys), jnp.concatenate(hs)


def _reset_grads(fn, inputs, weights, softplus):
    """Gradients of a random linear readout of ``fn``'s output and final state w.r.t. every input,
    and ``(y, final state)``."""

    def loss(*args):
        y, h = fn(**dict(zip(inputs, args)), dt_softplus=softplus, return_final_state=True)
        return jnp.sum(y * weights[0]) + jnp.sum(h * weights[1]), (y, h)

    return jax.jit(jax.grad(loss, argnums=range(len(inputs)), has_aux=True))(*inputs.values())


@functools.cache
def _reset_case(full):
    """Fresh inputs (one group: the TPU kernel's groups must be lane-aligned; Triton still sums
    two channel blocks), resets, readout weights and the oracle's results, once per session."""
    inputs = make_inputs(2, RESET_LENGTH, 8, 1, 3, jnp.float32, full=full)
    reset = np.zeros((2, RESET_LENGTH), bool)
    for b, starts in enumerate(DOC_STARTS):
        reset[b, list(starts)] = True
    kw = jax.random.split(jax.random.key(next(_seeds)))
    weights = (jax.random.normal(kw[0], (2, RESET_LENGTH, 8)), jax.random.normal(kw[1], (2, 8, 3)))
    oracle = _reset_grads(_per_document, inputs, weights, full)
    return inputs, jnp.asarray(reset), weights, oracle


@pytest.mark.parametrize("full", [True, False], ids=["full", "plain"])
@pytest.mark.parametrize("impl", list(RESET_IMPLS))
def test_reset_matches_documents_run_alone(impl, full):
    """``reset=``: output, final state and every gradient equal each document run alone through
    the reference (float32, 1e-4 relative). ``full``: with D, z, dt_bias + softplus and an
    initial state, which the reset at step 0 ignores (its gradient is exactly zero on that row);
    plain: none of them."""
    inputs, reset, weights, (g_ref, (y_ref, h_ref)) = _reset_case(full)
    fn = lambda **a: selective_scan(**a, reset=reset, **RESET_IMPLS[impl])
    g, (y, h) = _reset_grads(fn, inputs, weights, full)
    errors = {"y": rel_err(y, y_ref), "final_state": rel_err(h, h_ref)}
    errors |= {"d" + n: rel_err(a, b) for n, a, b in zip(inputs, g, g_ref)}
    bad = {k: v for k, v in errors.items() if not v < 1e-4}
    assert not bad, bad
    if full:
        dh0 = np.asarray(g[list(inputs).index("initial_state")])
        assert not np.any(dh0[1]), "reset at step 0 kept the state"
        assert np.any(dh0[0])


def test_reset_lowers_to_verified_triton_for_an_abstract_gpu():
    """With ``reset`` (and an initial state: a decoding prompt), "auto" for an H100 still takes
    the Triton kernels; forward and backward pass the MLIR verifier."""
    sds = jax.ShapeDtypeStruct
    b, length, d, n = 1, 100, 64, 16
    args = (sds((b, length, d), jnp.bfloat16), sds((b, length, d), jnp.bfloat16),
            sds((d, n), jnp.float32), sds((b, length, 1, n), jnp.bfloat16),
            sds((b, length, 1, n), jnp.bfloat16), sds((b, d, n), jnp.float32),
            sds((b, length), jnp.bool_))

    def fwd_bwd(u, delta, A, B, C, h0, reset):
        fn = lambda *a: selective_scan(*a, dt_softplus=True, initial_state=h0, reset=reset)
        y, vjp = jax.vjp(fn, u, delta, A, B, C)
        return vjp(jnp.ones(y.shape, y.dtype))

    with verified_triton_modules() as checked, lowering_for("NVIDIA H100"):
        text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2 and checked[0] == 2


@pytest.mark.parametrize(
    "reset,message",
    [(np.zeros((2, 4), bool), r"reset must be a bool \(batch, length\) = \(2, 5\) array, got bool\(2, 4\)"),
     (np.zeros((2, 5), np.float32), r"reset must be a bool .* got float32\(2, 5\)"),
     ([[True] * 5] * 2, "reset must be a bool")],
    ids=["shape", "dtype", "list"],
)
def test_bad_reset_raises(reset, message):
    with pytest.raises(ValueError, match=message):
        selective_scan(**_valid(), reset=reset)


# ----------------------------------------------------------------------------- API


@pytest.mark.parametrize("interpret", [False, True])
def test_auto_is_the_reference_on_cpu(interpret):
    """"auto" on a CPU target runs the reference; interpret=True does not change that."""
    inputs = make_inputs(2, 5, 8, 2, 3, jnp.float32)
    def scan(**a):
        return selective_scan(**a, return_final_state=True, interpret=interpret)

    assert "pallas_call" not in str(jax.make_jaxpr(scan)(**inputs))
    y, h = scan(**inputs)
    y_ref, h_ref = reference.selective_scan(**inputs, return_final_state=True)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(h, h_ref)


def test_xla_gradients_compose_with_jit_and_vmap():
    inputs = make_inputs(2, 6, 4, 1, 3, jnp.float32)
    f = lambda u, delta: jnp.sum(
        selective_scan(u[None], delta[None], inputs["A"], inputs["B"][:1], inputs["C"][:1])
    )
    g = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1))))(inputs["u"], inputs["delta"])
    for i in range(2):
        g_i = jax.grad(f, argnums=(0, 1))(inputs["u"][i], inputs["delta"][i])
        for a, b in zip(g, g_i):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


def test_step_equals_one_step_of_the_scan():
    inputs = make_inputs(2, 3, 8, 2, 4, jnp.float32)
    y_ref, h_ref = reference.selective_scan(**inputs, dt_softplus=True, return_final_state=True)
    state = inputs["initial_state"]
    step = jax.jit(lambda h, u, dt, B, C, z: selective_scan_step(
        h, u, dt, inputs["A"], B, C, D=inputs["D"], z=z, dt_bias=inputs["dt_bias"],
        dt_softplus=True,
    ))  # fmt: skip
    for t in range(3):
        y, state = step(state, *(inputs[n][:, t] for n in ("u", "delta", "B", "C", "z")))
        assert rel_err(y, y_ref[:, t]) < 1e-6
    assert state.dtype == jnp.float32 and rel_err(state, h_ref) < 1e-6


def _valid():
    return make_inputs(2, 5, 8, 2, 4, jnp.float32)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x: x.update(u=x["u"][0]), "u must have rank 3"),
        (lambda x: x.update(delta=x["delta"][:, :4]), "delta must have shape"),
        (lambda x: x.update(A=x["A"][:4]), "A must have shape"),
        (lambda x: x.update(B=x["B"][:, :, :1]), "B must have shape|C must have shape"),
        (lambda x: x.update(B=x["B"][:, :, :, :2], C=x["C"][:, :, :, :2]), "B must have shape"),
        (lambda x: x.update(D=x["D"][:3]), "D must have shape"),
        (lambda x: x.update(z=x["z"][:1]), "z must have shape"),
        (lambda x: x.update(dt_bias=x["dt_bias"][None]), "dt_bias must have shape"),
        (lambda x: x.update(initial_state=x["initial_state"][:1]), "initial_state must have"),
        (lambda x: x.update(u=x["u"].astype(jnp.int32)), "u must be a floating-point"),
    ],
)
def test_bad_shapes_raise(change, message):
    inputs = _valid()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def test_bad_groups_and_options_raise():
    inputs = make_inputs(1, 4, 6, 4, 2, jnp.float32, full=False)
    with pytest.raises(ValueError, match=r"d_inner \(6\) must be divisible by n_groups \(4\)"):
        selective_scan(**inputs)
    inputs = _valid()
    with pytest.raises(ValueError, match="implementation must be one of"):
        selective_scan(**inputs, implementation="cuda")
    with pytest.raises(ValueError, match="tiles.chunk must be a positive int"):
        selective_scan(**inputs, implementation="tpu", interpret=True, tiles=tpu.Tiles(8, 0))
    with pytest.raises(ValueError, match="tiles.block_d must be a power of 2"):
        selective_scan(**inputs, implementation="triton", interpret=True,
                       tiles=triton.Tiles(3, 4, 4))
    with pytest.raises(ValueError, match="tiles.forward_block_d must be a power of 2, got 3"):
        selective_scan(**inputs, implementation="triton", interpret=True,
                       tiles=triton.Tiles(4, 4, 4, forward_block_d=3))
    with pytest.raises(ValueError, match="tiles.segments must be a positive int, got 0"):
        selective_scan(**inputs, implementation="triton", interpret=True,
                       tiles=triton.Tiles(8, 4, 4, segments=0))
    with pytest.raises(ValueError, match=r"tiles.parallel needs segments == 1 and a forward_chunk "
                                         r"that is a power of 2 >= 16 .* forward_chunk 4"):
        selective_scan(**inputs, implementation="triton", interpret=True,
                       tiles=triton.Tiles(4, 4, 4, parallel=True))
    with pytest.raises(ValueError, match=r"tiles must be a .*triton\.Tiles, got .*tpu\.Tiles"):
        selective_scan(**inputs, implementation="triton", interpret=True, tiles=tpu.Tiles(8, 4))
    with pytest.raises(ValueError, match="name it with implementation="):
        selective_scan(**inputs, tiles=triton.Tiles(8, 4, 4))
    with pytest.raises(ValueError, match="needs a GPU backend"):
        selective_scan(**inputs, implementation="triton")
    with pytest.raises(ValueError, match=r"u must have rank 2"):
        selective_scan_step(inputs["initial_state"], inputs["u"], inputs["delta"],
                            inputs["A"], inputs["B"], inputs["C"])  # fmt: skip


def test_auto_lowers_to_triton_for_an_abstract_gpu():
    """From this CPU host, "auto" targeting an H100 picks the Triton kernels with the GPU's default
    tiles (forward and backward lower for CUDA; one row: the narrowest channel block), and off
    the abstract GPU it is the reference."""
    sds = jax.ShapeDtypeStruct
    b, length, d, n = 1, 100, 64, 16
    args = (sds((b, length, d), jnp.bfloat16), sds((b, length, d), jnp.bfloat16),
            sds((d, n), jnp.float32), sds((b, length, 1, n), jnp.bfloat16),
            sds((b, length, 1, n), jnp.bfloat16))

    def fwd_bwd(*a):
        y, vjp = jax.vjp(lambda *x: selective_scan(*x, dt_softplus=True), *a)
        return vjp(jnp.ones(y.shape, y.dtype))

    with lowering_for("NVIDIA H100"):
        text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        call = Call(b, length, d, 1, n)
        assert DISPATCH.choose("auto", call, interpret=False) == (
            "triton", triton.Tiles(block_d=8, chunk=4, forward_chunk=64, parallel=True,
                                   forward_block_d=16))
    assert text.count("__gpu$xla.gpu.triton") == 2  # forward, backward
    assert "__gpu$xla.gpu.triton" not in jax.jit(fwd_bwd).trace(*args).lower().as_text()


@pytest.mark.parametrize("d_inner, d_state, block_d, forward_block_d",
                         [(1536, 16, 8, 16), (1536, 256, 8, 8), (24, 16, 8, 8), (12, 16, 4, 4)])
def test_default_tiles_fit_the_call(d_inner, d_state, block_d, forward_block_d):
    """The device's channel blocks (8 to train, 16 for the forward without checkpoints), capped
    by d_state (about 8 state floats per thread) and cut to a divisor of the group's channels."""
    call = Call(2, 2048, d_inner, 1, d_state)
    with lowering_for("NVIDIA H100"):
        tiles = triton.default_tiles(call)
    assert (tiles.block_d, tiles.forward_block_d) == (block_d, forward_block_d)
    assert triton.supports(call, tiles) is None
