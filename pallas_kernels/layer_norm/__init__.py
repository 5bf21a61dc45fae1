"""LayerNorm and RMSNorm over the last axis, ``scale * (x - mean) / std + bias`` (RMSNorm: no
mean, no bias): one public function over a plain-JAX reference and a Triton kernel pair that
reads each input once per pass (shared with ``gated_rms_norm``)."""

from pallas_kernels.layer_norm.api import IMPLEMENTATIONS, layer_norm

__all__ = ["IMPLEMENTATIONS", "layer_norm"]
