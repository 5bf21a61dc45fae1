"""RetNet's multi-scale retention (Sun et al. 2023), with its training path on the SSD kernel.

Retention of head ``h`` with decay ``gamma_h = 1 - 2^(-5-h)`` is, for every position ``t``::

    y_t = sum_{s <= t} gamma_h^(t-s) (q_t . k_s) v_s          (parallel form: (Q K^T * D) V)
        = S_t q_t,   S_t = gamma_h S_{t-1} + v_t k_t^T          (recurrent form)

which is Mamba-2's SSD recurrence with a constant scalar decay per head: ``x = v``, ``B = k``,
``C = q``, ``dt = 1``, ``A = log(gamma)``, one B/C group per head. ``pallas_kernels.ssd.ssd``
therefore runs the chunkwise form (its Pallas kernels on GPU/TPU, its plain-JAX chunked form
elsewhere) and ``ssd_step`` the decoding step.

The paper's implementation also divides each row of the decay matrix by ``sqrt(sum_s D_ts)`` and
each row of ``(Q K^T * D)`` by its clamped absolute sum. Both are positive scalars per position
and head, and the per-head GroupNorm that follows is invariant to such a scale (up to its
``eps``), so they are omitted here; ``tests/test_retention.py`` checks this numerically.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from meshlm.layers import per_shard
from meshlm.layers.attention import ATTENTION_OUT, HeadDense
from meshlm.layers.embeddings import apply_rope
from pallas_kernels.ssd import ssd, ssd_step

Initializer = Callable[..., jax.Array]

FORMS = ("parallel", "chunkwise")
GROUP_NORMS = ("layernorm", "rmsnorm")
HEAD_AXES = ("activation_batch", "activation_length", "activation_heads", "head_dim")
# The decoding state S^T: (batch, heads, v head_dim, qk head_dim), the SSD state layout.
STATE_AXES = ("activation_batch", "activation_heads", "head_dim", "state")
f32 = jnp.float32


def log_decays(num_heads: int) -> np.ndarray:
    """``log(gamma_h) = log(1 - 2^(-5-h))`` for ``h = 0..num_heads-1``, float64 numpy.

    ``log1p`` keeps the slowest heads' tiny rates (``1 - 2^-30`` is 1.0 in float32).
    """
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads))))


def parallel_retention(q, k, v, log_gamma, segment_ids=None):
    """The specification: ``(Q K^T * D) V`` in float32, ``D[h,t,s] = gamma_h^(t-s)`` for
    ``s <= t`` in the same segment, else 0.

    ``q, k (batch, length, heads, dk)``, ``v (batch, length, heads, dv)``, ``log_gamma
    (heads,)``, ``segment_ids (batch, length)`` or None. Returns ``v``'s shape and dtype.
    O(length^2) memory: a reference and a short-sequence path.
    """
    length = q.shape[1]
    t = jnp.arange(length)
    lag = (t[:, None] - t[None, :]).astype(f32)  # (t, s)
    visible = (lag >= 0)[None, None]  # (1, 1, t, s)
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    log_d = jnp.asarray(log_gamma, f32)[:, None, None] * lag  # (h, t, s)
    decay = jnp.exp(jnp.where(visible, log_d, -jnp.inf))  # (b, h, t, s)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(f32), k.astype(f32))
    y = jnp.einsum("bhts,bshd->bthd", scores * decay, v.astype(f32))
    return y.astype(v.dtype)


def chunkwise_retention(q, k, v, log_gamma, segment_ids=None, *, initial_state=None,
                        return_final_state=False, chunk_size=256, implementation="auto",
                        interpret=False):
    """Retention by ``pallas_kernels.ssd.ssd`` (same arguments as ``parallel_retention``).

    ``initial_state``/the final state: float32 ``(batch, heads, dv, dk)`` (``S^T``).
    Document boundaries (``segment_ids[t] != segment_ids[t-1]``) reset the state: ``ssd``'s
    ``reset`` drops the state before step ``t`` exactly (masked decays inside the kernel).
    """
    batch, length, heads, _ = v.shape
    dt = jnp.ones((batch, length, heads), f32)
    reset = None
    if segment_ids is not None:
        reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))

    def scan(v, dt, log_gamma, k, q, initial_state, reset):
        return ssd(
            v, dt, log_gamma, k, q, chunk_size=chunk_size, dt_softplus=False,
            initial_state=initial_state, return_final_state=return_final_state, reset=reset,
            implementation=implementation, interpret=interpret,
        )

    log_gamma = jnp.asarray(log_gamma, f32)
    if not per_shard.runs_a_kernel(implementation):
        return scan(v, dt, log_gamma, k, q, initial_state, reset)
    heads = ("activation_batch", None, "activation_heads")  # (one B/C group per head)
    state = ("activation_batch", "activation_heads", None, None)
    out = (heads + (None,), state) if return_final_state else heads + (None,)
    return per_shard.per_shard(scan, [
        (v, heads + (None,)), (dt, heads), (log_gamma, ("activation_heads",)),
        (k, heads + (None,)), (q, heads + (None,)), (initial_state, state),
        (reset, ("activation_batch", None))], out)


class MultiScaleRetention(nn.Module):
    """RetNet's token mixer: ``out = W_O(swish(x W_G) * GroupNorm(Retention(x)))``.

    ``d_model = x.shape[-1]`` is split into ``num_heads`` query/key heads of ``dk = d_model /
    num_heads`` features and value/gate heads of ``dv = value_factor * dk``. Queries and keys are
    rotated by ``apply_rope`` at ``positions`` (RetNet's "theta shift"; rotate-half layout,
    frequencies ``rope_theta^(-2i/dk)``; torchscale pairs interleaved features and uses
    ``10000^(-i/(dk/2-1))``, so its checkpoints would need that variant), keys scaled by
    ``dk^-0.5``. Head ``h`` decays by
    ``gamma_h = 1 - 2^(-5-h)``. GroupNorm normalises each head's ``dv`` outputs per position
    (``"layernorm"`` as in the paper, or ``"rmsnorm"``) with a learnable ``(heads, dv)`` scale.
    No biases. The retention output is named ``ATTENTION_OUT`` for remat policies.

    Training: ``form="chunkwise"`` runs ``chunkwise_retention`` (``pallas_kernels.ssd.ssd``
    with ``chunk_size``, ``implementation``, ``interpret``); ``form="parallel"`` runs
    ``parallel_retention`` (float32, O(length^2)). ``segment_ids`` (0 = padding) reset the state
    at every document boundary; the caller restarts ``positions`` at every document.

    Decoding (``decode=True``): initialising creates a zero float32 state ``(batch, heads, dv,
    dk)`` and the last segment id ``(batch,)`` in the ``"cache"`` collection; applying with one
    token takes a recurrent step (``ssd_step``), with several (a prompt) the chunkwise form from
    the cached state; both store the new state. A token whose segment id differs from the
    previous token's starts from a zero state. Positions are the caller's (as for
    ``Attention``).
    """

    num_heads: int
    value_factor: int = 2
    form: str = "chunkwise"
    chunk_size: int = 256
    implementation: str = "auto"
    interpret: bool = False
    rope_theta: float = 10000.0
    group_norm: str = "layernorm"
    norm_eps: float = 1e-6
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    out_kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None):
        """``x (batch, length, d_model)``, ``positions (batch, length)`` int, ``segment_ids
        (batch, length)`` int or None. Returns ``(batch, length, d_model)`` in ``dtype``."""
        dk, dv = self._head_dims(x, positions, segment_ids)
        heads = self.num_heads

        def project(features, name):
            return HeadDense(
                (heads, features), contract=1, kernel_axes=("embed", "heads", "head_dim"),
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init, name=name,
            )(x)

        q = apply_rope(project(dk, "query"), positions, self.rope_theta)
        k = apply_rope(project(dk, "key"), positions, self.rope_theta) * (dk ** -0.5)
        q, k, v = (nn.with_logical_constraint(a, HEAD_AXES)
                   for a in (q, k, project(dv, "value")))
        gate = nn.with_logical_constraint(project(dv, "gate"), HEAD_AXES)

        log_gamma = log_decays(heads)
        if self.decode and self.has_variable("cache", "state"):
            y = self._decode(q, k, v, log_gamma, segment_ids)
        else:
            if self.decode:  # initialising: create the zero state for this batch
                self._cache_variables(x.shape[0], dk, dv)
            y = self._retention(q, k, v, log_gamma, segment_ids)
        y = nn.with_logical_constraint(checkpoint_name(y, ATTENTION_OUT), HEAD_AXES)
        y = self._norm()(y)
        out = nn.with_logical_constraint(nn.silu(gate) * y, HEAD_AXES)
        return HeadDense(
            (x.shape[-1],), contract=2, kernel_axes=("heads", "head_dim", "embed"),
            use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.out_kernel_init, name="out",
        )(out)

    def _head_dims(self, x, positions, segment_ids):
        """Validate the fields and inputs; returns ``(dk, dv)``."""
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"x must be (batch, length, d_model), got {getattr(x, 'shape', x)}")
        d_model = x.shape[-1]
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads!r} must be a positive int dividing d_model={d_model}"
            )
        dk = d_model // self.num_heads
        if dk % 2:
            raise ValueError(f"the rotation needs an even head dim d_model/num_heads, got {dk}")
        if not isinstance(self.value_factor, int) or self.value_factor < 1:
            raise ValueError(f"value_factor must be a positive int, got {self.value_factor!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.group_norm not in GROUP_NORMS:
            raise ValueError(f"group_norm must be one of {GROUP_NORMS}, got {self.group_norm!r}")
        for name, ids in (("positions", positions), ("segment_ids", segment_ids)):
            given = ids is not None or name == "positions"
            if given and getattr(ids, "shape", None) != x.shape[:2]:
                raise ValueError(f"{name} must be (batch, length) = {x.shape[:2]}, got "
                                 f"{getattr(ids, 'shape', type(ids).__name__)}")
        return dk, self.value_factor * dk

    def _retention(self, q, k, v, log_gamma, segment_ids):
        if self.form == "parallel":
            return parallel_retention(q, k, v, log_gamma, segment_ids)
        return chunkwise_retention(
            q, k, v, log_gamma, segment_ids, chunk_size=self.chunk_size,
            implementation=self.implementation, interpret=self.interpret,
        )

    def _norm(self):
        """Per-head GroupNorm: statistics over each head's ``dv`` features, float32."""
        common = dict(
            epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            reduction_axes=-1, feature_axes=(-2, -1), name="group_norm",
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("heads", "head_dim")),
        )
        if self.group_norm == "rmsnorm":
            return nn.RMSNorm(**common)
        return nn.LayerNorm(use_bias=False, use_fast_variance=False, **common)

    def _cache_variables(self, batch, dk, dv):
        state = self.variable(
            "cache", "state", nn.with_logical_partitioning(jnp.zeros, STATE_AXES),
            (batch, self.num_heads, dv, dk), f32,
        )
        last_segment = self.variable(
            "cache", "segment_id", nn.with_logical_partitioning(jnp.zeros, ("activation_batch",)),
            (batch,), jnp.int32,
        )
        return state, last_segment

    def _decode(self, q, k, v, log_gamma, segment_ids):
        batch, length = q.shape[:2]
        state, last_segment = self._cache_variables(batch, q.shape[-1], v.shape[-1])
        if state.value.shape[0] != batch:
            raise ValueError(f"the cached state is for batch {state.value.shape[0]}, got {batch}")
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        # A new document in the first token starts from zero; later ones reset inside.
        same = (segment_ids[:, 0] == last_segment.value).astype(f32)
        h0 = state.value * same[:, None, None, None]
        if length == 1:
            y, h = ssd_step(h0, v[:, 0], jnp.ones((batch, self.num_heads), f32),
                            jnp.asarray(log_gamma, f32), k[:, 0], q[:, 0])
            y = y[:, None]
        else:
            y, h = chunkwise_retention(
                q, k, v, log_gamma, segment_ids, initial_state=h0, return_final_state=True,
                chunk_size=self.chunk_size, implementation=self.implementation,
                interpret=self.interpret,
            )
        state.value = h
        last_segment.value = segment_ids[:, -1]
        return y
