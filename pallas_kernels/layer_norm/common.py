"""The static description of one normalisation call (what a lowering's ``supports`` sees) and
its kernel configuration, shared by ``layer_norm`` and ``gated_rms_norm`` (one kernel pair)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from pallas_kernels._api import shape_of


class Call(NamedTuple):
    rows: int  # every axis but the last, flattened
    groups: int
    group_size: int  # features // groups: one normalisation's width
    subtract_mean: bool = False  # LayerNorm; False: RMSNorm


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
    subtract_mean: bool = False  # LayerNorm; False: RMSNorm
    bwd_stages: int = 1  # the backward's software-pipeline depth


def check_parameters(features: int, epsilon, scale, **optional) -> None:
    """``ValueError`` unless ``scale`` and each optional vector given (None: absent) have shape
    ``(features,)`` and ``epsilon > 0``."""
    given = {name: value for name, value in optional.items() if value is not None}
    for name, value in {"scale": scale, **given}.items():
        if getattr(value, "shape", None) != (features,):
            raise ValueError(f"{name} must have shape (features,) = ({features},), got "
                             f"{shape_of(value)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
