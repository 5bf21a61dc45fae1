"""Grouped matmul (``jax.lax.ragged_dot`` semantics): rows sorted by group, each group's rows times
its own matrix; the experts of a mixture-of-experts layer.

``grouped_matmul(lhs, rhs, group_sizes)`` has Pallas kernels for its forward and both gradients.
"""

from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS, grouped_matmul

__all__ = ["IMPLEMENTATIONS", "grouped_matmul"]
