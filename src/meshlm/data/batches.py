"""Batch types: the arrays one training example of a task is made of.

Every array is ``(batch, length)``; the step shards them all by ``sharding.batch_sharding``. A
family's config names its task's batch type (``ModelConfig.batch_fields``), and the step, the
eval step and the compiled shapes are built from that, never from a hard-coded dict.
"""

from __future__ import annotations

# Decoder-only language modelling: ``inputs`` -> next-token ``targets``; ``segment_ids`` number
# the packed documents of a row from 1 (0 = padding), ``positions`` restart at 0 in each, and
# ``loss_mask`` is 0 on padding and on the target that belongs to the next document.
DECODER_LM: dict[str, str] = {
    "inputs": "int32",
    "targets": "int32",
    "segment_ids": "int32",
    "positions": "int32",
    "loss_mask": "float32",
}
