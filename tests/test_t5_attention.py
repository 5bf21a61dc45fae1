"""T5's attention through ``flash_attention`` (``model.attention``): the Triton kernels in
interpret mode against the einsum path with its materialised bias, loss and every parameter
gradient (the relative-bias tables included) on packed rows with padding; and the config
errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from kernel_checks import TRITON

from meshlm.config import ConfigError, model_config
from meshlm.models import build_model, t5

pytestmark = pytest.mark.usefixtures("fast_compile")

# d_kv 16: the Triton kernels' smallest head size.
SIZES = dict(vocab_size=64, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=3, d_kv=16,
             d_ff=48, max_seq_len=32, dtype="float32", extra_ids=8, relative_buckets=8,
             relative_max_distance=12, feed_forward="gated-gelu")


def _packed_batch(batch, enc_len, dec_len, seed):
    """Two documents per row on each side, positions restarting, padding (id 0) at the end."""
    rng = np.random.default_rng(seed)
    out = {}
    for side, length, (a, b) in (("encoder", enc_len, (9, 17)), ("decoder", dec_len, (5, 13))):
        seg = np.zeros((batch, length), np.int32)
        pos = np.zeros((batch, length), np.int32)
        for row in range(batch):
            cut = a + row
            seg[row, :cut], seg[row, cut:b] = 1, 2
            pos[row, :cut], pos[row, cut:b] = np.arange(cut), np.arange(b - cut)
        out[f"{side}_tokens"] = rng.integers(1, 64, (batch, length)) * (seg > 0)
        out[f"{side}_positions"], out[f"{side}_segment_ids"] = pos, seg
    out["targets"] = rng.integers(1, 64, (batch, dec_len))
    out["loss_mask"] = (out["decoder_segment_ids"] > 0).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in out.items()}


@functools.cache
def _loss_and_grads(attention, scan_layers):
    cfg = model_config("t5", **SIZES, attention=attention, scan_layers=scan_layers)
    model = build_model(cfg)
    batch = _packed_batch(2, 20, 16, seed=0)
    params = meta.unbox(jax.jit(model.init)(jax.random.key(1), batch["encoder_tokens"],
                                            batch["decoder_tokens"])["params"])
    # Tables of a trained size, so the bias matters.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * 30.0 if "relative_bias" in jax.tree_util.keystr(path) else p, params)

    def loss(params):
        total, weight, _ = cfg.loss(model, params, batch)
        return total / weight

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_triton_attention_equals_the_einsum_path(scan_layers, monkeypatch):
    interpret = functools.partial(t5.flash_attention, **TRITON.kwargs)
    monkeypatch.setattr(t5, "flash_attention", interpret)
    got_loss, got = _loss_and_grads("triton", scan_layers)
    want_loss, want = _loss_and_grads("xla", scan_layers)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    leaves = jax.tree_util.tree_leaves_with_path(want)
    assert any("relative_bias" in jax.tree_util.keystr(p) for p, _ in leaves)
    for (path, w), g in zip(leaves, jax.tree.leaves(got)):
        scale = float(jnp.abs(w).max())
        assert scale > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_triton_attention_with_dropout_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention=triton cannot drop"):
        model_config("t5", **SIZES, attention="triton", dropout=0.1)
    with pytest.raises(ConfigError, match="attention"):
        model_config("t5", **SIZES, attention="cudnn")


def test_lowered_for_a_gpu_the_kernels_run_per_shard():
    """The training gradient lowered for an H200 on a data x tensor mesh (no GPU needed): "auto"
    runs the Triton kernels there (each verified), inside shard_map, the relative bias included
    (T5 base's 12 heads over 2 tensor shards)."""
    import flax.linen as nn

    from kernel_checks import verified_triton_modules
    from meshlm import sharding
    from meshlm.config import MeshConfig
    from pallas_kernels import lowering_for

    cfg = model_config("t5", **dict(SIZES, n_heads=12, d_kv=64, dtype="bfloat16",
                                    attention="auto"))
    model = build_model(cfg)
    batch = _packed_batch(4, 32, 16, seed=1)
    tokens = batch["encoder_tokens"], batch["decoder_tokens"]
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *tokens))["params"]
    mesh_cfg = MeshConfig(data=2, tensor=2)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4])

    def loss(p):
        return cfg.loss(model, p, batch)[0]

    with verified_triton_modules() as checked, lowering_for("NVIDIA H200", mesh=mesh), \
            nn.logical_axis_rules(sharding.axis_rules(mesh_cfg)):
        text = jax.jit(jax.grad(loss)).trace(params).lower(
            lowering_platforms=("cuda",)).as_text()
    # forward, dK/dV and dQ of encoder and decoder self-attention (cross-attention, which has no
    # bias, takes what "auto" picks without one: the Mosaic GPU kernels on an H200)
    assert checked[0] == 6
    assert text.count("sdy.manual_computation") >= 2
