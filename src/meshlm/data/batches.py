"""Batch types: the arrays one training example of a task is made of.

Every array is ``(batch, length)``; the step shards them all by ``sharding.batch_sharding``. A
family's config names its task's batch type (``ModelConfig.batch_fields``), and the step, the
eval step and the compiled shapes are built from that, never from a hard-coded dict.
"""

from __future__ import annotations

from meshlm.config import ConfigError

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
# ``loss_mask`` is 1 on the real target tokens. The encoder side has ``data.seq_len`` positions,
# the decoder side (``DECODER_SIDE``) ``data.target_len``: span-corruption targets are much
# shorter than their inputs.
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

# The SEQ2SEQ fields that have the decoder's length.
DECODER_SIDE = frozenset({"decoder_tokens", "decoder_positions", "decoder_segment_ids", "targets",
                          "loss_mask"})


def decoder_fields(fields: dict[str, str]) -> frozenset[str]:
    """The fields of batch type ``fields`` that have the decoder's length (none in a
    ``DECODER_LM`` batch, whose ``targets`` are the next tokens of its ``inputs``)."""
    return DECODER_SIDE if fields == SEQ2SEQ else frozenset()


def batch_shapes(cfg) -> dict[str, tuple[int, int]]:
    """``(data.batch_size, length)`` of each field of the model's batch type: the decoder-side
    fields have the run's target length (``seq2seq.target_length``), the others ``data.seq_len``."""
    fields, d = cfg.model.batch_fields, cfg.data
    decoder = decoder_fields(fields)
    if not decoder and d.target_len is not None:
        raise ConfigError(f"data.target_len={d.target_len} sets a sequence-to-sequence decoder's "
                          f"length; model.family={cfg.model.family!r} has none (leave it null)")
    target = d.seq_len
    if decoder:
        from meshlm.data.seq2seq import target_length

        target = target_length(cfg)
    return {k: (d.batch_size, target if k in decoder else d.seq_len) for k in fields}
