"""Cross-entropy of each row of logits against an integer target: one public function over a
plain-JAX form and a Triton forward that reads the logits once (an online log-sum-exp)."""

from pallas_kernels.cross_entropy.api import IMPLEMENTATIONS, cross_entropy

__all__ = ["IMPLEMENTATIONS", "cross_entropy"]
