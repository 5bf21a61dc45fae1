"""Building blocks for meshlm models: stateless Flax linen modules that name logical axes only."""

from meshlm.layers.attention import ATTENTION_OUT, Attention, attend
from meshlm.layers.embeddings import Embed, LearnedPositions, apply_rope
from meshlm.layers.mlp import Mlp
from meshlm.layers.norms import make_norm

__all__ = [
    "ATTENTION_OUT", "Attention", "Embed", "LearnedPositions", "Mlp", "apply_rope", "attend",
    "make_norm",
]
