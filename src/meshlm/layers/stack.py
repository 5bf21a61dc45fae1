"""The layer stack every family uses: ``n_layers`` copies of a block, scanned or unrolled,
optionally rematerialised.

A block is a linen module class whose ``__call__(x, *args)`` returns ``(x, None)`` (the shape of
an ``nn.scan`` body); the extra ``args`` (positions, segment ids...) are broadcast to every layer.
Scanned, the parameters (and decoding caches) gain a leading ``"layers"`` axis and one block is
compiled; unrolled, the blocks are ``<name>_0 .. <name>_{n-1}``. Values a block sows into
``"intermediates"`` (MoE router statistics) are stacked along the layers axis when scanned.
With a ``PipelineSchedule`` of several stages the scanned stack runs as a pipeline
(``layers/pipeline.py``: parameters laid out ``(repeats, stages, layers_per_stage, ...)``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from meshlm.layers.attention import ATTENTION_OUT
from meshlm.layers.pipeline import PipelineSchedule, apply_pipeline

REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


def apply_stack(block: type[nn.Module], x: jax.Array, *args: Any, n_layers: int, scan: bool,
                remat: str = "none", name: str = "layers",
                pipeline: PipelineSchedule | None = None, **block_fields: Any) -> jax.Array:
    """``x`` through ``n_layers`` blocks ``block(**block_fields)``; call inside a compact module.

    ``remat`` names a policy of ``REMAT_POLICIES`` ("none": keep every activation).
    ``pipeline`` of more than one stage (scanned stacks only) runs the layers as a pipeline.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if pipeline is not None and pipeline.stages > 1:
        if not scan:
            raise ValueError("a pipelined layer stack needs scanned layers (scan_layers=True)")
        return apply_pipeline(
            block, x, *args, n_layers=n_layers, schedule=pipeline, name=name,
            remat_policy=False if remat == "none" else REMAT_POLICIES[remat], **block_fields)
    if remat != "none":
        # Under scan every iteration is already a separate computation, so CSE cannot merge the
        # recomputation away and prevent_cse's extra barriers are pure cost.
        block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        x, _ = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(**block_fields, name=name)(x, *args)
        return x
    for i in range(n_layers):
        x, _ = block(**block_fields, name=f"{name}_{i}")(x, *args)
    return x
