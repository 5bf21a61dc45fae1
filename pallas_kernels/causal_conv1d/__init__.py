"""Depthwise causal convolution (the Mamba mixers' short conv): one public function over a
plain-JAX form and a Pallas kernel.

``causal_conv1d(x, kernel, ...)`` runs ``K`` shifted multiply-adds per channel over the sequence,
with an optional bias, SiLU and packed-document masking fused.
"""

from pallas_kernels.causal_conv1d.api import IMPLEMENTATIONS, causal_conv1d

__all__ = ["IMPLEMENTATIONS", "causal_conv1d"]
