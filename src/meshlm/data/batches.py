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

# Sequence to sequence (T5): the encoder reads ``encoder_tokens``; the decoder reads
# ``decoder_tokens`` (the targets shifted right behind the decoder start token, per segment) and
# predicts ``targets``. Both sides are packed: segment ``s`` of the decoder row belongs to
# segment ``s`` of the encoder row (ids from 1, 0 = padding), positions restart in each, and
# ``loss_mask`` is 1 on the real target tokens. Both sides have the batch's one length.
SEQ2SEQ: dict[str, str] = {
    "encoder_tokens": "int32",
    "encoder_positions": "int32",
    "encoder_segment_ids": "int32",
    "decoder_tokens": "int32",
    "decoder_positions": "int32",
    "decoder_segment_ids": "int32",
    "targets": "int32",
    "loss_mask": "float32",
}
