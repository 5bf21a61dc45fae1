"""Position-wise feed-forward blocks: GELU (GPT-2) and SwiGLU (Shazeer 2020; LLaMA)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


@jax.custom_vjp
def gelu_tanh(x):
    """``jax.nn.gelu(x, approximate=True)`` whose gradient keeps only ``x``: autodiff also saves
    ``tanh(...)``, one more activation-sized array written forward and read backward. With only
    the input saved, XLA folds the forward GELU into the ``wi`` product's cuBLAS epilogue
    (GPT-2 125M step on an H200: kernels -0.24 ms, 1.005x tokens/s; BENCHMARKS.md, session 19)."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return gelu_tanh(x), x


def _gelu_bwd(x, g):
    # jax's own GELU derivative, recomputed from x in float32.
    _, vjp = jax.vjp(lambda v: jax.nn.gelu(v, approximate=True), x.astype(jnp.float32))
    return (vjp(g.astype(jnp.float32))[0].astype(g.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


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
            h = gelu_tanh(dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi")(x))
        elif self.kind == "swiglu":
            gate = dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi_gate")(x)
            up = dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi_up")(x)
            h = jax.nn.silu(gate) * up
        else:
            raise ValueError(f"unknown mlp {self.kind!r}; choose 'gelu' or 'swiglu'")
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(x.shape[-1], "mlp", "embed", self.out_kernel_init, "wo")(h)
