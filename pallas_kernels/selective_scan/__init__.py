"""Mamba-1 selective scan (S6): one public function over a plain-JAX reference and Pallas kernels.

``selective_scan(u, delta, A, B, C, ...)`` runs the whole sequence (training, prefill) with the
``D`` skip, the ``silu(z)`` gate, delta bias/softplus, grouped ``B``/``C``, initial/final states
and packed-document resets, forward and backward; ``selective_scan_step`` advances a state by one
token (decoding).
"""

from pallas_kernels.selective_scan.api import IMPLEMENTATIONS, selective_scan, selective_scan_step

__all__ = ["IMPLEMENTATIONS", "selective_scan", "selective_scan_step"]
