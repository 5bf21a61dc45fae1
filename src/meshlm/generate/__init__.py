"""Sampling with a KV cache: ``generate(model, params, prompt, rng, max_new_tokens=...)``."""

from meshlm.generate.decode import generate
from meshlm.generate.sampling import SamplingParams, filter_logits, sample

__all__ = ["SamplingParams", "filter_logits", "generate", "sample"]
