"""What the API and the lowerings share: the static description of a call."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Call:
    """The static shape of a ``causal_conv1d`` call: ``x (batch, length, channels)``, kernel
    width ``K``, and whether the bias, the document positions and SiLU are present."""

    x_shape: tuple[int, int, int]
    K: int
    bias: bool = True
    doc_pos: bool = False
    activation: str | None = None

    @property
    def channels(self) -> int:
        return self.x_shape[2]
