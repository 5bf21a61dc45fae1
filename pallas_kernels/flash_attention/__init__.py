"""Flash attention: one public function over a plain-JAX reference, Pallas kernels and cuDNN.

``flash_attention(q, k, v, ...)`` takes the layout of ``jax.nn.dot_product_attention``
(``(batch, length, heads, head_dim)``) and supports causal / sliding-window / segment masking,
GQA and MQA, ALiBi, T5's relative position bias, logit soft-capping and decoding offsets,
forward and backward; ``flash_attention_qkv(qkv, ...)`` takes a fused projection's
``(batch, length, heads, 3, head_dim)`` output as it is. Each Pallas lowering's launch shape is
its module's ``Tiles`` (``triton.Tiles``, ``mosaic_gpu.Tiles``, ``tpu.Tiles``), passed as
``tiles=``.
"""

from pallas_kernels.flash_attention.api import (
    IMPLEMENTATIONS,
    RelativeBias,
    flash_attention,
    flash_attention_backward,
    flash_attention_qkv,
)
from pallas_kernels.flash_attention.common import AttentionSpec, RelativeBuckets

__all__ = ["IMPLEMENTATIONS", "AttentionSpec", "RelativeBias", "RelativeBuckets",
           "flash_attention", "flash_attention_backward", "flash_attention_qkv"]
