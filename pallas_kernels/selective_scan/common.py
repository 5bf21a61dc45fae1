"""What every selective-scan lowering shares: the static configuration and tiling helpers.

The softplus / gating arithmetic is in ``pallas_kernels._ssm_math``, shared with SSD.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

LOG2E = math.log2(math.e)


class Call(NamedTuple):
    """The static shape of one call: what a lowering's ``supports`` and ``default_tiles`` see."""

    batch: int
    length: int
    d_inner: int
    n_groups: int
    d_state: int


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Static (hashable) description of one call; the custom_vjp's non-differentiable argument.

    ``block_d`` channels form one program's tile, the state of ``block_d * d_state`` floats that
    stays on chip while the program walks the sequence. ``chunk`` steps are unrolled per loop
    iteration (their loads are issued together, hiding memory latency) and the forward pass saves
    one float32 checkpoint of the state per chunk for the backward pass to restart from.
    ``forward_chunk`` (and ``forward_block_d``) replace ``chunk`` (``block_d``) in a forward pass
    that saves no checkpoints (inference), where a longer chunk costs no backward registers.
    ``segments`` splits the length into that many segments scanned in parallel (1: the
    sequential scan); ``parallel`` scans each ``forward_chunk`` of a forward that saves no
    checkpoints as one parallel scan."""

    implementation: str
    dt_softplus: bool
    block_d: int
    chunk: int
    forward_chunk: int
    num_warps: int | None
    interpret: bool
    fast_math: bool
    segments: int = 1
    parallel: bool = False
    forward_block_d: int | None = None


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def largest_power_of_2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p
