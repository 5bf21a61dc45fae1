"""Test-wide setup: 8 fake CPU devices (set before jax is imported) for the sharding tests, and
fixtures that several modules use."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The Mosaic GPU interpreter runs a CTA's 3 warpgroups as host callbacks that wait on each other:
# XLA's CPU client must have as many threads, one per core unless NPROC says more (2-core CI).
if len(os.sched_getaffinity(0)) < 4:
    os.environ.setdefault("NPROC", "4")

import jax  # noqa: E402 - after XLA_FLAGS, which jax reads once at import
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compile():
    """Interpret-mode kernels are big HLO programs; XLA's optimisations only cost compile time.

    Module-scoped: a module opts in with ``pytestmark = pytest.mark.usefixtures("fast_compile")``.
    """
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
