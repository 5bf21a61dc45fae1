"""Mamba-2's gated RMSNorm, ``scale * rmsnorm(y * silu(z))`` per group of channels: one public
function over a plain-JAX reference and a Triton kernel that reads each input once per pass."""

from pallas_kernels.gated_rms_norm.api import IMPLEMENTATIONS, gated_rms_norm

__all__ = ["IMPLEMENTATIONS", "gated_rms_norm"]
