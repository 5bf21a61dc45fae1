"""Decoding with a cache: sampling (``generate``) and beam search (``beam_search``)."""

from meshlm.generate.beam import BeamResult, beam_search
from meshlm.generate.decode import generate
from meshlm.generate.sampling import SamplingParams, filter_logits, sample

__all__ = ["BeamResult", "SamplingParams", "beam_search", "filter_logits", "generate", "sample"]
