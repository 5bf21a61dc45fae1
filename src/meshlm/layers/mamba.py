"""Mamba-1 and Mamba-2 mixers (the sequence-mixing half of a Mamba block) on the project's kernels.

``MambaMixer`` (Gu & Dao 2023; HF ``MambaMixer``) runs ``pallas_kernels.selective_scan``;
``Mamba2Mixer`` (Dao & Gu 2024; HF ``Mamba2Mixer``) runs ``pallas_kernels.ssd``. Both map
``x (batch, length, d_model) -> (batch, length, d_model)`` and share one calling convention:

- ``mixer.apply(variables, x, segment_ids=None)``. ``segment_ids (batch, length)`` int marks packed
  documents: the id changes at every document boundary (0 = padding, itself a document). The
  convolution and the SSM state restart at each boundary, so a packed row computes what separate
  rows would. Ids are compared with the previous step only, so each document must be one
  contiguous run (as packing makes them).
- ``decode`` (a module field, as ``Attention``'s): the layer keeps its recurrent state in the
  ``"cache"`` collection: ``conv_state*`` (the last ``d_conv - 1`` convolution inputs),
  ``ssm_state`` (float32) and ``segment_id`` (the id of the last step seen). ``init`` with
  ``decode=True`` creates zero caches for the input's batch (the input's length does not matter)
  and leaves them zero; ``apply(..., mutable=["cache"])`` continues from the cache: several steps
  (a prompt) run the full scan from the cached state, one step uses ``*_step`` (O(1) per token),
  and both store the final states. Without ``segment_ids`` a decoding call continues the cached
  document; with them, a first id different from the cached one starts a new document. The
  caller bounds nothing: the state has a fixed size whatever the number of tokens.

``selective_scan`` and ``ssd`` take the document starts themselves (``reset=``: the state before
a document's first step is dropped exactly inside the kernel, and no gradient crosses it), with
``D``, the ``silu(z)`` gate (Mamba-1), ``dt_bias`` and softplus fused either way.

Logical axes: parameters ``embed, inner, heads, head_dim, state, conv``; activations
``activation_batch, activation_length, activation_inner, activation_heads``. Tensor parallelism
shards everything of size ``d_inner`` or ``heads``; ``B``/``C`` and ``dt_rank`` stay replicated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.layers import per_shard
from meshlm.layers.attention import HeadDense
from meshlm.layers.conv import CausalConv1d, uniform_init
from pallas_kernels.gated_rms_norm import gated_rms_norm
from pallas_kernels.selective_scan import selective_scan, selective_scan_step
from pallas_kernels.ssd import ssd, ssd_step

Initializer = Callable[..., jax.Array]
f32 = jnp.float32

BATCH_LENGTH = ("activation_batch", "activation_length")
# Position of a step whose document began before this call (every convolution tap valid).
_FAR = 2**30


# ----------------------------------------------------------------------------- shared pieces


class _Documents(NamedTuple):
    """Where packed documents start: ``reset (batch, length)`` bool, the step starts a document;
    ``pos (batch, length)`` int, steps since its document started (``>= _FAR`` when it started
    before this call). Both None without segment ids."""

    reset: jax.Array | None
    pos: jax.Array | None


def _documents(segment_ids, previous) -> _Documents:
    """Boundaries of ``segment_ids``; ``previous (batch,)`` is the id before step 0 (a decode
    cache's), None when the sequence starts at step 0 (a fresh zero state needs no reset)."""
    if segment_ids is None:
        return _Documents(None, None)
    seg = segment_ids.astype(jnp.int32)
    before = seg[:, :1] if previous is None else previous[:, None]
    reset = seg != jnp.concatenate([before, seg[:, :-1]], axis=1)
    t = jnp.arange(seg.shape[1], dtype=jnp.int32)
    start = jax.lax.cummax(jnp.where(reset, t, -_FAR), axis=1)
    return _Documents(reset, t - start)


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """Inverse softplus of ``dt ~ LogUniform(dt_min, dt_max)`` (clipped below at ``floor``), so the
    initial step sizes span that range (the Mamba reference initialisation)."""

    def init(key, shape, dtype=f32):
        u = jax.random.uniform(key, shape, f32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _check_call(module, x, segment_ids, positive_fields):
    """Validate the module's sizes and the call's arrays; returns ``(batch, length, d_model)``."""
    for name in positive_fields:
        value = getattr(module, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(module).__name__}.{name} must be a positive int, got {value!r}")
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, length, d_model), got {x.shape}")
    if segment_ids is not None:
        if segment_ids.shape != x.shape[:2]:
            raise ValueError(f"segment_ids must have shape (batch, length) = {x.shape[:2]}, "
                             f"got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
    return x.shape


def _decode_cache(module, specs):
    """The ``"cache"`` variables (name -> ``(shape, dtype, logical axes)``) when this call
    continues from them, else None: without ``decode``, and on the call that creates them
    (``init``), which runs as a plain forward and leaves them zero, as ``Attention`` does."""
    if not module.decode:
        return None
    exists = module.has_variable("cache", "ssm_state")
    cache = {
        name: module.variable("cache", name, nn.with_logical_partitioning(jnp.zeros, axes),
                              shape, dtype)
        for name, (shape, dtype, axes) in specs.items()
    }
    return cache if exists else None


def _cached(cache, name):
    """A cache variable's value, or None when not continuing from a cache."""
    return None if cache is None else cache[name].value


def _conv_implementation(module) -> dict:
    """The mixer's ``implementation`` / ``interpret`` for its ``CausalConv1d`` (SiLU fused): the
    conv kernel's when the mixer names one the conv has, else ``"auto"``."""
    impl = module.implementation if module.implementation in ("xla", "triton") else "auto"
    return {"implementation": impl, "interpret": module.interpret}


def _log_uniform_a_init(low: float, high: float):
    """``A_log = log(U(low, high))``: per-head decay rates spread over ``[low, high]``, as
    mamba_ssm's Mamba2 initialises them."""

    def init(key, shape, dtype=f32):
        return jnp.log(jax.random.uniform(key, shape, f32, low, high)).astype(dtype)

    return init


def _dense(features, axes, init, module, name, use_bias):
    """``nn.Dense`` whose kernel carries ``axes`` (and bias ``axes[-1:]``)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=module.dtype, param_dtype=module.param_dtype,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), name=name,
    )


# ----------------------------------------------------------------------------- Mamba-1


class _DtProjection(nn.Module):
    """``dt_rank -> d_inner`` projection returning ``(x @ kernel, bias)`` apart, so the scan
    kernel adds the bias inside its softplus; HF ``dt_proj`` (init: kernel ``U(+-rank**-0.5)``,
    bias the inverse softplus of a log-uniform step size)."""

    features: int
    bias_init: Initializer
    dtype: Any = f32
    param_dtype: Any = f32

    @nn.compact
    def __call__(self, x):
        rank = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(
            uniform_init(rank**-0.5), (None, "inner")), (rank, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, ("inner",)),
                          (self.features,), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return x @ kernel, bias


def _mamba1_a_log_init(key, shape, dtype=f32):
    """``A = -[1, 2, ..., d_state]`` for every channel (S4D-real, the Mamba initialisation)."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=f32)), shape).astype(dtype)


class MambaMixer(nn.Module):
    """The Mamba-1 mixer: ``out_proj(selective_scan(silu(conv(x_in)), dt, A, B, C, D, z))``.

    ``in_proj`` maps ``d_model`` to ``x_in`` and the gate ``z`` (``d_inner = expand * d_model``
    each); a causal depthwise conv of width ``d_conv`` (+ SiLU) mixes ``x_in`` locally;
    ``x_proj`` maps it to ``(dt_rank, B, C)`` with ``dt_rank = ceil(d_model / 16)`` by default and
    ``dt_proj`` widens ``dt`` to ``d_inner``; ``A = -exp(A_log)`` and the scan applies
    ``softplus(dt + dt_proj.bias)``, the ``D`` skip and the ``silu(z)`` gate.

    Params (HF ``MambaForCausalLM`` ``backbone.layers.{i}.mixer.<name>`` -> ours; ``I = d_inner``,
    ``R = dt_rank``, ``N = d_state``, ``K = d_conv``, ``E = d_model``):

    ==========================  ===============================  ==============================
    HF (torch layout)           meshlm param (logical axes)      mapping
    ==========================  ===============================  ==============================
    in_proj.weight (2I, E)      in_proj/kernel (E, 2, I)         ``w.reshape(2, I, E)``
                                (embed, -, inner)                ``.transpose(2, 0, 1)``; [0]=x,
                                                                 [1]=z; bias ``(2, I)`` likewise
    conv1d.weight (I, 1, K)     conv1d/kernel (K, I)             ``w[:, 0, :].T``
                                (conv, inner)
    conv1d.bias (I)             conv1d/bias (I) (inner)          as is
    x_proj.weight (R+2N, I)     x_proj/kernel (I, R+2N)          ``w.T`` (columns: dt, B, C)
                                (inner, -)
    dt_proj.weight (I, R)       dt_proj/kernel (R, I) (-, inner) ``w.T``
    dt_proj.bias (I)            dt_proj/bias (I) (inner)         as is
    A_log (I, N)                A_log (I, N) (inner, state)      as is
    D (I)                       D (I) (inner)                    as is
    out_proj.weight (E, I)      out_proj/kernel (I, E)           ``w.T``; bias as is
                                (inner, embed)
    ==========================  ===============================  ==============================

    Cache (``decode``): ``conv_state (batch, K - 1, I)`` in ``dtype``, ``ssm_state (batch, I, N)``
    float32, ``segment_id (batch,)`` int32.
    """

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    use_bias: bool = False  # in_proj / out_proj biases (HF ``use_bias``)
    use_conv_bias: bool = True
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    implementation: str = "auto"  # selective_scan's: "auto", "xla", "triton", "tpu"
    interpret: bool = False
    decode: bool = False
    dtype: Any = f32
    param_dtype: Any = f32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    out_kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, segment_ids=None):
        """``x (batch, length, d_model)``, ``segment_ids (batch, length)`` int or None."""
        fields = ("d_state", "d_conv", "expand") + (() if self.dt_rank is None else ("dt_rank",))
        batch, length, d_model = _check_call(self, x, segment_ids, fields)
        d_inner, N, K = self.expand * d_model, self.d_state, self.d_conv
        dt_rank = math.ceil(d_model / 16) if self.dt_rank is None else self.dt_rank
        act_inner = BATCH_LENGTH + ("activation_inner",)

        u, z = (nn.with_logical_constraint(v, act_inner) for v in HeadDense(
            (2, d_inner), contract=1, kernel_axes=("embed", None, "inner"),
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, unstack=True, name="in_proj")(x))

        cache = _decode_cache(self, {
            "conv_state": ((batch, K - 1, d_inner), self.dtype,
                           ("activation_batch", "conv", "activation_inner")),
            "ssm_state": ((batch, d_inner, N), f32,
                          ("activation_batch", "activation_inner", "state")),
            "segment_id": ((batch,), jnp.int32, ("activation_batch",)),
        })
        docs = _documents(segment_ids, _cached(cache, "segment_id"))
        u, conv_state = CausalConv1d(K, ("inner",), use_bias=self.use_conv_bias,
                                     activation="silu", **_conv_implementation(self),
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     name="conv1d")(u, _cached(cache, "conv_state"), docs.pos)
        u = nn.with_logical_constraint(u, act_inner)

        dbc = _dense(dt_rank + 2 * N, ("inner", None), self.kernel_init, self, "x_proj", False)(u)
        dt, B, C = jnp.split(dbc, [dt_rank, dt_rank + N], axis=-1)
        bias_init = _dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)
        dt, dt_bias = _DtProjection(d_inner, bias_init, self.dtype, self.param_dtype,
                                    name="dt_proj")(dt)
        A_log = self.param("A_log", nn.with_logical_partitioning(_mamba1_a_log_init,
                                                                 ("inner", "state")),
                           (d_inner, N), self.param_dtype)
        D = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("inner",)),
                       (d_inner,), self.param_dtype)
        A = -jnp.exp(A_log.astype(f32))
        B, C = B[:, :, None], C[:, :, None]  # one group
        if cache is None:
            y = self._kernel(u, dt, A, B, C, D, z, dt_bias, None, docs.reset)
        else:
            h0 = cache["ssm_state"].value
            if length == 1:
                if docs.reset is not None:
                    h0 = jnp.where(docs.reset[:, 0, None, None], 0.0, h0)
                y, h = selective_scan_step(
                    h0, u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D, z=z[:, 0], dt_bias=dt_bias,
                    dt_softplus=True)
                y = y[:, None]
            else:
                y, h = self._kernel(u, dt, A, B, C, D, z, dt_bias, h0, docs.reset)
            cache["ssm_state"].value, cache["conv_state"].value = h, conv_state
            if segment_ids is not None:
                cache["segment_id"].value = segment_ids[:, -1].astype(jnp.int32)

        y = nn.with_logical_constraint(y, act_inner)
        return _dense(d_model, ("inner", "embed"), self.out_kernel_init, self, "out_proj",
                      self.use_bias)(y)

    def _kernel(self, u, dt, A, B, C, D, z, dt_bias, h0, reset):
        """``selective_scan`` (``dt_bias`` + softplus, ``D`` and the gate fused; ``reset`` the
        document starts or None) on each device's channels and rows (``per_shard``);
        ``(y, final state)`` when ``h0`` is given."""
        final = h0 is not None

        def scan(u, dt, A, B, C, D, z, dt_bias, h0, reset):
            return selective_scan(u, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                  initial_state=h0, return_final_state=final, reset=reset,
                                  implementation=self.implementation, interpret=self.interpret)

        if not per_shard.runs_a_kernel(self.implementation):
            return scan(u, dt, A, B, C, D, z, dt_bias, h0, reset)
        rows, channels = ("activation_batch", None, "activation_inner"), ("activation_inner",)
        state = ("activation_batch", "activation_inner", None)
        group = ("activation_batch", None, None, None)
        return per_shard.per_shard(scan, [
            (u, rows), (dt, rows), (A, channels + (None,)), (B, group), (C, group), (D, channels),
            (z, rows), (dt_bias, channels), (h0, state), (reset, ("activation_batch", None))],
            (rows, state) if final else rows)


# ----------------------------------------------------------------------------- Mamba-2


class GatedRMSNorm(nn.Module):
    """``scale * rmsnorm(y * silu(z))`` over groups of ``features // groups`` channels, float32
    statistics (Mamba-2's gated norm, ``norm_before_gate=False``). ``scale`` carries ``inner``.

    Not ``nn.RMSNorm``: the gate enters before the statistics, and grouping would give the scale
    a 2-D ``(groups, features // groups)`` shape that no longer matches the checkpoints' vector.
    ``pallas_kernels.gated_rms_norm`` computes it (one pass each way on a GPU, where XLA makes
    several); the kernel runs per device (``per_shard``) when each device holds whole groups,
    else the plain-JAX form lets XLA reduce across the channel shards.
    """

    groups: int = 1
    epsilon: float = 1e-5
    dtype: Any = f32
    param_dtype: Any = f32
    implementation: str = "auto"  # gated_rms_norm's: "auto", "xla", "triton"
    interpret: bool = False

    @nn.compact
    def __call__(self, y, z):
        features = y.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("inner",)),
                           (features,), self.param_dtype)
        impl, groups = self.implementation, self.groups

        def norm(y, z, scale, impl=impl):  # on a device's channels: its share of the groups
            return gated_rms_norm(y, z, scale, groups=groups * y.shape[-1] // features,
                                  epsilon=self.epsilon, dtype=self.dtype, implementation=impl,
                                  interpret=self.interpret)

        if not per_shard.runs_a_kernel(impl):
            return norm(y, z, scale)
        mesh = jax.sharding.get_abstract_mesh()
        channel_axes = per_shard.mesh_axes("activation_inner", mesh) if mesh.axis_names else ()
        shards = math.prod(mesh.shape[a] for a in channel_axes)
        if groups % shards:  # a group's statistics need several devices' channels
            return norm(y, z, scale, "xla")
        rows = BATCH_LENGTH + ("activation_inner",)
        return per_shard.per_shard(norm, [(y, rows), (z, rows), (scale, ("activation_inner",))],
                                   rows)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer: ``out_proj(norm(ssd(x, dt, A, B, C, D), z))``.

    Projections of the input give the gate ``z`` and ``x`` (``d_inner = expand * d_model`` each,
    ``heads = d_inner / head_dim``), ``B`` and ``C`` (``n_groups`` groups of ``d_state``, head
    ``h`` reading group ``h // (heads / n_groups)``) and one ``dt`` per head; a causal depthwise
    conv (+ SiLU) runs over ``x``, ``B`` and ``C``; ``A = -exp(A_log)`` per head; the SSD applies
    ``softplus(dt + dt_bias)`` and the ``D`` skip; ``GatedRMSNorm`` gates by ``silu(z)``.

    The projections and the conv are separate kernels (HF concatenates them) so that ``z``,
    ``x`` and everything per head shard over ``inner``/``heads`` while ``B``/``C`` stay
    replicated. ``norm_per_group=True`` normalises each of the ``n_groups`` groups of channels on
    its own, as the reference ``mamba_ssm`` Mamba2 does; HF's ``MambaRMSNormGated`` normalises all
    of ``d_inner`` at once (``False``). The two agree when ``n_groups == 1``.

    Params (HF ``Mamba2ForCausalLM`` ``backbone.layers.{i}.mixer.<name>``; ``I = d_inner``,
    ``G = n_groups``, ``N = d_state``, ``H = heads``, ``K = d_conv``, ``E = d_model``; HF's
    in_proj rows are ``[z (I), x (I), B (G*N), C (G*N), dt (H)]`` and its conv1d channels
    ``[x (I), B (G*N), C (G*N)]``):

    =========================  =================================  ============================
    HF (torch layout)          meshlm param (logical axes)        mapping
    =========================  =================================  ============================
    in_proj.weight             zx_proj/kernel (E, 2, I)           ``w[:2I].reshape(2, I, E)``
    (2I + 2GN + H, E)          (embed, -, inner)                  ``.transpose(2, 0, 1)``
                               bc_proj/kernel (E, 2, G, N)        ``w[2I:2I+2GN].reshape(2, G,``
                               (embed, -, -, state)               ``N, E).transpose(3, 0, 1, 2)``
                               dt_proj/kernel (E, H)              ``w[2I+2GN:].T``
                               (embed, heads)                     (biases, if any, likewise)
    conv1d.weight              conv_x/kernel (K, I)               ``w[:I, 0].T``
    (I + 2GN, 1, K)            (conv, inner)
                               conv_bc/kernel (K, 2, G, N)        ``w[I:, 0].T.reshape(K, 2,``
                               (conv, -, -, state)                ``G, N)``
    conv1d.bias (I + 2GN)      conv_x/bias (I), conv_bc/bias      ``b[:I]``,
                               (2, G, N)                          ``b[I:].reshape(2, G, N)``
    dt_bias, A_log, D (H)      dt_bias, A_log, D (H) (heads)      as is
    norm.weight (I)            norm/scale (I) (inner)             as is
    out_proj.weight (E, I)     out_proj/kernel (I, E)             ``w.T``
                               (inner, embed)
    =========================  =================================  ============================

    Cache (``decode``): ``conv_state_x (batch, K - 1, I)``, ``conv_state_bc (batch, K - 1, 2, G,
    N)`` in ``dtype``, ``ssm_state (batch, H, head_dim, N)`` float32, ``segment_id (batch,)``.
    """

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    norm_per_group: bool = True
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    implementation: str = "auto"  # ssd's: "auto", "xla", "triton", "tpu"
    interpret: bool = False
    decode: bool = False
    dtype: Any = f32
    param_dtype: Any = f32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    out_kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, segment_ids=None):
        """``x (batch, length, d_model)``, ``segment_ids (batch, length)`` int or None."""
        fields = ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size")
        batch, length, d_model = _check_call(self, x, segment_ids, fields)
        d_inner, N, K = self.expand * d_model, self.d_state, self.d_conv
        G, P = self.n_groups, self.head_dim
        if d_inner % P:
            raise ValueError(f"Mamba2Mixer: d_inner = expand * d_model = {d_inner} must be "
                             f"divisible by head_dim = {P}")
        H = d_inner // P
        if H % G:
            raise ValueError(f"Mamba2Mixer: n_groups = {G} must divide heads = d_inner / head_dim "
                             f"= {H}")
        lo, hi = self.a_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"Mamba2Mixer.a_init_range must satisfy 0 < low <= high, got {lo, hi}")
        act_inner = BATCH_LENGTH + ("activation_inner",)
        act_heads = BATCH_LENGTH + ("activation_heads", None)

        def project(features, axes, name, unstack=False):
            return HeadDense(features, contract=1, kernel_axes=("embed", *axes),
                             use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=self.kernel_init, unstack=unstack, name=name)(x)

        z, xs = (nn.with_logical_constraint(v, act_inner)
                 for v in project((2, d_inner), (None, "inner"), "zx_proj", unstack=True))
        bc = project((2, G, N), (None, None, "state"), "bc_proj")
        dt = project((H,), ("heads",), "dt_proj")

        cache = _decode_cache(self, {
            "conv_state_x": ((batch, K - 1, d_inner), self.dtype,
                             ("activation_batch", "conv", "activation_inner")),
            "conv_state_bc": ((batch, K - 1, 2, G, N), self.dtype,
                              ("activation_batch", "conv", None, None, "state")),
            "ssm_state": ((batch, H, P, N), f32,
                          ("activation_batch", "activation_heads", "head_dim", "state")),
            "segment_id": ((batch,), jnp.int32, ("activation_batch",)),
        })
        docs = _documents(segment_ids, _cached(cache, "segment_id"))

        def conv(v, channel_axes, name, state_name):
            return CausalConv1d(K, channel_axes, use_bias=self.use_conv_bias, activation="silu",
                                **_conv_implementation(self), dtype=self.dtype,
                                param_dtype=self.param_dtype, name=name)(
                v, _cached(cache, state_name), docs.pos)

        xs, conv_x_state = conv(xs, ("inner",), "conv_x", "conv_state_x")
        bc, conv_bc_state = conv(bc, (None, None, "state"), "conv_bc", "conv_state_bc")
        xh = nn.with_logical_constraint(xs.reshape(batch, length, H, P), act_heads)
        B, C = bc[:, :, 0], bc[:, :, 1]

        def head_param(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("heads",)), (H,),
                              self.param_dtype)

        A_log = head_param("A_log", _log_uniform_a_init(lo, hi))
        D = head_param("D", nn.initializers.ones)
        dt_bias = head_param("dt_bias", _dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor))
        A = -jnp.exp(A_log.astype(f32))

        if cache is None:
            y = self._kernel(xh, dt, A, B, C, D, dt_bias, None, docs.reset)
        else:
            h0 = cache["ssm_state"].value
            if length == 1:
                if docs.reset is not None:
                    h0 = jnp.where(docs.reset[:, 0, None, None, None], 0.0, h0)
                y, h = ssd_step(h0, xh[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D,
                                dt_bias=dt_bias, dt_softplus=True)
                y = y[:, None]
            else:
                y, h = self._kernel(xh, dt, A, B, C, D, dt_bias, h0, docs.reset)
            cache["ssm_state"].value = h
            cache["conv_state_x"].value, cache["conv_state_bc"].value = conv_x_state, conv_bc_state
            if segment_ids is not None:
                cache["segment_id"].value = segment_ids[:, -1].astype(jnp.int32)

        y = nn.with_logical_constraint(y, act_heads).reshape(batch, length, d_inner)
        norm_impl = self.implementation if self.implementation in ("xla", "triton") else "auto"
        y = GatedRMSNorm(G if self.norm_per_group else 1, self.norm_eps, self.dtype,
                         self.param_dtype, norm_impl, self.interpret, name="norm")(y, z)
        y = nn.with_logical_constraint(y, act_inner)
        return _dense(d_model, ("inner", "embed"), self.out_kernel_init, self, "out_proj",
                      self.use_bias)(y)

    def _kernel(self, x, dt, A, B, C, D, dt_bias, h0, reset):
        """``ssd`` (``dt_bias`` + softplus fused; ``reset`` the document starts or None) on each
        device's heads and rows (``per_shard``); ``(y, final state)`` when ``h0`` is given. A
        device with a slice of the heads takes the B/C groups those heads read (every group is on
        every device: groups are not sharded)."""
        final = h0 is not None

        def scan(x, dt, A, B, C, D, dt_bias, h0, reset):
            return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True,
                       chunk_size=self.chunk_size, initial_state=h0, return_final_state=final,
                       reset=reset, implementation=self.implementation,
                       interpret=self.interpret)

        if not per_shard.runs_a_kernel(self.implementation):
            return scan(x, dt, A, B, C, D, dt_bias, h0, reset)
        mesh = jax.sharding.get_abstract_mesh()
        head_axes = per_shard.mesh_axes("activation_heads", mesh) if mesh.axis_names else ()
        shards, G = math.prod(mesh.shape[a] for a in head_axes), B.shape[2]
        local = scan
        if shards > 1 and G > 1:
            if G % shards and shards % G:
                raise ValueError(f"n_groups={G} and the {shards} head shards must divide one "
                                 "another (each device's heads read whole groups)")

            def local(x, dt, A, B, C, *rest):
                start = jax.lax.axis_index(head_axes) * G // shards
                B, C = (jax.lax.dynamic_slice_in_dim(v, start, max(G // shards, 1), axis=2)
                        for v in (B, C))
                return scan(x, dt, A, B, C, *rest)

        heads = ("activation_batch", None, "activation_heads")
        group = ("activation_batch", None, None, None)
        per_head, state = ("activation_heads",), ("activation_batch", "activation_heads", None, None)
        return per_shard.per_shard(local, [
            (x, heads + (None,)), (dt, heads), (A, per_head), (B, group), (C, group),
            (D, per_head), (dt_bias, per_head), (h0, state), (reset, ("activation_batch", None))],
            (heads + (None,), state) if final else heads + (None,))
