"""The gated RMSNorm, Triton lowering: ``layer_norm``'s kernels with the gate ``z`` (the
normalised quantity is ``y * silu(z)``), no centring and no bias; tiles and limits are theirs."""

from __future__ import annotations

from pallas_kernels.layer_norm.common import NormConfig
from pallas_kernels.layer_norm.triton import (DEFAULT_TILES, Tiles, config, default_tiles,
                                              norm_backward, norm_forward, supports)

__all__ = ["DEFAULT_TILES", "Tiles", "backward", "config", "default_tiles", "forward",
           "supports"]


def forward(y, z, scale, cfg: NormConfig):
    """``y, z (rows, groups, F)``, ``scale (groups, F)`` -> output ``(rows, groups, F)``."""
    return norm_forward(y, z, scale, None, cfg, "gated_rms_norm")


def backward(dout, y, z, scale, cfg: NormConfig):
    """Gradients ``(dy, dz, dscale)`` shaped and typed like ``(y, z, scale)``."""
    dy, dz, dscale, _ = norm_backward(dout, y, z, scale, None, cfg, "gated_rms_norm")
    return dy, dz, dscale
