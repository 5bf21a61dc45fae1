"""flash_attention's implementations against its float32 reference, on the shared cases.

Every case checks ``out``, ``lse`` and ``dq, dk, dv`` (random cotangents on ``out`` and ``lse``) on
fresh random inputs, per ``kernel_checks.check_attention``. On CPU the Pallas lowerings run in
interpret mode (Mosaic GPU's with three simulated warpgroups, real barriers and TMA copies, the
tile products taken by XLA; its warpgroups run on XLA's host thread pool, which needs the 8 fake
CPU devices of tests/conftest.py) and cuDNN's masking runs through jax's XLA attention; with a
GPU the compiled lowerings run too.
"""

from __future__ import annotations

import pytest
from kernel_checks import ATTENTION_CASES, ATTENTION_LOWERINGS, check_attention

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize(
    "lowering, case", [param for lowering in ATTENTION_LOWERINGS for param in lowering.params()])
def test_matches_reference(lowering, case, monkeypatch):
    if lowering.setup is not None:
        lowering.setup(monkeypatch)
    check_attention(lowering, case, **ATTENTION_CASES[case])
