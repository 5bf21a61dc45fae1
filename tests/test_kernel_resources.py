"""scripts/kernel_resources.py: the Triton kernels compiled for an H100 from this CPU host. The
default sm_90 flash-attention tiles must spill no registers and fit shared memory; a tile known
to spill must be reported as spilling (so the check can fail)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("triton", reason="scripts/kernel_resources.py compiles with the triton package")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "scripts"))

import kernel_resources  # noqa: E402

from pallas_kernels.flash_attention import triton as fa_triton  # noqa: E402
from pallas_kernels.flash_attention.common import AttentionSpec  # noqa: E402

H100 = "NVIDIA H100"


def test_default_head_dim_128_tiles_fit_an_h100(tmp_path):
    out = tmp_path / "kernels.json"
    kernels = kernel_resources.main(
        ["--gpu", H100, "--ops", "flash_attention", "--head-dims", "128", "--out", str(out)])
    names = [k.name for k in kernels]
    assert names == ["flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq"] * 2
    limit = kernel_resources._MAX_SHARED["9.0"]
    assert all(k.fits(limit) for k in kernels), kernels
    assert all(k.registers > 0 and k.shared > 0 for k in kernels)
    assert out.read_text().count('"spill_bytes"') == 6


def test_a_spilling_tile_is_reported(tmp_path):
    # 4 warps for a 64x128 dK/dV tile at head_dim 128 spill about 2.5 KB per thread on sm_90a.
    q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 2, 1024), jnp.float32)
    tiles = fa_triton.KernelTiles(64, 128, 4, 2)
    spec = AttentionSpec(causal=False, scale=128 ** -0.5)

    def backward(q, k, v, o, lse, do):
        return fa_triton.backward(q, k, v, None, None, None, o, lse, do, spec=spec,
                                  interpret=False, tiles=fa_triton.Tiles(tiles, tiles, tiles))

    calls = kernel_resources._triton_calls(backward, (q, q, q, q, lse, q), H100)
    dkv = next(c for c in calls if c["name"] == "flash_attention_dkv")
    kernel = kernel_resources._compile("dkv", dkv, "9.0", tmp_path)
    assert kernel.num_warps == 4 and kernel.spill_bytes > 1000
    assert not kernel.fits(kernel_resources._MAX_SHARED["9.0"])
