"""Position-wise feed-forward blocks: GELU (GPT-2) and SwiGLU (Shazeer 2020; LLaMA)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


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
            h = jax.nn.gelu(dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi")(x),
                            approximate=True)
        elif self.kind == "swiglu":
            gate = dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi_gate")(x)
            up = dense(self.d_ff, "embed", "mlp", self.kernel_init, "wi_up")(x)
            h = jax.nn.silu(gate) * up
        else:
            raise ValueError(f"unknown mlp {self.kind!r}; choose 'gelu' or 'swiglu'")
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(x.shape[-1], "mlp", "embed", self.out_kernel_init, "wo")(h)
