"""What every selective-scan lowering shares: the static configuration and small jnp helpers.

The helpers are plain jnp on tiles so that the reference, the Triton kernels and the TPU kernels
apply exactly the same softplus / gating arithmetic.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Static (hashable) description of one call; the custom_vjp's non-differentiable argument.

    ``block_d`` channels form one program's tile, the state of ``block_d * d_state`` floats that
    stays on chip while the program walks the sequence. ``chunk`` steps are unrolled per loop
    iteration (their loads are issued together, hiding memory latency) and the forward pass saves
    one float32 checkpoint of the state per chunk for the backward pass to restart from.
    ``forward_chunk`` replaces ``chunk`` in a forward pass that saves no checkpoints (inference),
    where a longer chunk costs no backward registers.
    """

    implementation: str
    delta_softplus: bool
    block_d: int
    chunk: int
    forward_chunk: int
    num_warps: int | None
    interpret: bool
    fast_math: bool


def softplus(x):
    """``log(1 + exp(x))``, linear above 20 (identical in float32), as in the reference."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def gate_and_grad(y, z):
    """``y * silu(z)`` and ``d(out)/dy = silu(z)``, ``d(out)/dz = y * silu'(z)`` factors."""
    s = sigmoid(z)
    silu = z * s
    return y * silu, silu, y * s * (1.0 + z * (1.0 - s))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def largest_power_of_2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p
