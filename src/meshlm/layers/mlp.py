"""Position-wise feed-forward blocks: GELU (GPT-2) and SwiGLU (Shazeer 2020; LLaMA)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from meshlm.layers import per_shard
from pallas_kernels.bias_gelu import bias_gelu
from pallas_kernels.bias_gelu.api import DISPATCH
from pallas_kernels.bias_gelu.common import Call

Initializer = Callable[..., jax.Array]


_ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_mlp")


class DenseGelu(nn.Module):
    """``gelu_tanh(x @ kernel + bias)``: ``nn.Dense``'s parameters (``kernel (in, features)``,
    ``bias (features,)``: names, shapes, initialisers and logical axes), so checkpoints and the
    HuggingFace mappings are unchanged, with the bias and GPT-2's GELU as one
    ``pallas_kernels.bias_gelu`` op: its VJP keeps only the pre-activation, so XLA folds the
    bias and the GELU into the product's cuBLAS epilogue (GPT-2 125M on an H200: kernels -0.24 ms
    a step; BENCHMARKS.md, session 19), and forms the pre-activation's and the bias's gradients
    in one pass (XLA's fusion, or with ``implementation="triton"`` a kernel run per device on
    its block)."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    implementation: str = "auto"  # bias_gelu's: "auto", "xla", "triton"
    interpret: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init,
                                                                   ("embed", "mlp")),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                          (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        h = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))

        impl = self.implementation
        if impl == "auto":  # resolved here: what "auto" keeps needs no shard_map
            impl = DISPATCH.choose(impl, Call(h.size // self.features, self.features),
                                   interpret=False)[0]
        act = lambda h, bias: bias_gelu(h, bias, implementation=impl, interpret=self.interpret)
        if not per_shard.runs_a_kernel(impl) or h.ndim != len(_ACTIVATION_AXES):
            return act(h, bias)
        return per_shard.per_shard(act, [(h, _ACTIVATION_AXES), (bias, _ACTIVATION_AXES[-1:])],
                                   _ACTIVATION_AXES)


class Mlp(nn.Module):
    """``wo(act(wi(x)))`` for ``"gelu"`` (tanh approximation, as GPT-2), or
    ``wo(silu(wi_gate(x)) * wi_up(x))`` for ``"swiglu"``."""

    d_ff: int
    kind: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    out_kernel_init: Initializer = nn.initializers.normal(0.02)
    implementation: str = "auto"  # the GELU's (DenseGelu)
    interpret: bool = False

    @nn.compact
    def __call__(self, x):
        def dense(features, in_axis, out_axis, init, name):
            return nn.Dense(
                features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(init, (in_axis, out_axis)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
                name=name,
            )

        if self.kind == "gelu":
            h = DenseGelu(self.d_ff, self.use_bias, self.dtype, self.param_dtype,
                          self.kernel_init, self.implementation, self.interpret, name="wi")(x)
        elif self.kind == "swiglu":
            gate = dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi_gate")(x)
            up = dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi_up")(x)
            h = jax.nn.silu(gate) * up
        else:
            raise ValueError(f"unknown mlp {self.kind!r}; choose 'gelu' or 'swiglu'")
        h = nn.with_logical_constraint(h, _ACTIVATION_AXES)
        return dense(x.shape[-1], "mlp", "embed", self.out_kernel_init, "wo")(h)
