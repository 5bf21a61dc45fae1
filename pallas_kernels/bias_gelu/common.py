"""What the bias-GELU implementations share: the call's static shape and kernel configuration."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


class Call(NamedTuple):
    rows: int  # every axis but the last, flattened
    features: int


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) description of one call; the custom VJP's nondiff argument."""

    implementation: str
    block_rows: int = 0  # Triton: rows and features of one loop step's tile
    block_features: int = 0
    rows_per_program: int = 0  # rows one program walks (one bias-gradient partial each)
    num_warps: int = 0
    num_stages: int = 1
    interpret: bool = False
