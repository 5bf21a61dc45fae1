"""Model families, registered by name (``config.register_family``) when this package is imported.

``build_model(cfg.model)`` is the family's module; everything else a family provides (its loss,
batch type, FLOPs per token, decoding cache) is a method of its config (``models.base``).
"""

from __future__ import annotations

import flax.linen as nn

from meshlm.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """The (stateless) Flax module for ``cfg``; parameters come from ``model.init``."""
    cfg.validate()
    return cfg.build()


from meshlm.models import gpt, mamba, mamba2, moe, retnet, t5  # noqa: F401  (registers the families)

__all__ = ["build_model"]
