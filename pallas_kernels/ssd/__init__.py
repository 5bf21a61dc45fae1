"""Mamba-2 SSD (state-space duality): one public function over plain-JAX references and Pallas kernels.

``ssd(x, dt, A, B, C, ...)`` runs the selective state-space recurrence of Mamba-2 (scalar decay per
head, grouped B/C) over a sequence, in chunks whose intra-chunk part runs on the matrix units;
``ssd_step`` is the single-token decoding step.
"""

from pallas_kernels.ssd.api import IMPLEMENTATIONS, ssd, ssd_step

__all__ = ["IMPLEMENTATIONS", "ssd", "ssd_step"]
