"""Pallas kernels for attention, state-space scans and grouped matmuls (GPU: Triton and Mosaic-GPU;
TPU: Mosaic-TPU).

Standalone: depends on jax only and never imports meshlm. Each operation lives in its own
subpackage with a plain-JAX ``reference`` beside its kernels and one public function in ``api``.
"""

from pallas_kernels._api import lowering_for

__all__ = ["lowering_for"]
