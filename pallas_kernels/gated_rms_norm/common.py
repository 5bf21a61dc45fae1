"""The static description of one gated-RMSNorm call (what a lowering's ``supports`` sees)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple


class Call(NamedTuple):
    rows: int  # every axis but the last, flattened
    groups: int
    group_size: int  # features // groups: one normalisation's width


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Static (hashable) description of one kernel call; the custom VJP's nondiff argument."""

    implementation: str
    block_rows: int
    bwd_rows: int
    num_warps: int
    epsilon: float
    dtype: Any
    interpret: bool
