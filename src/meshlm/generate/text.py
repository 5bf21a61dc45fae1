"""Text in, text out from a run directory: what ``meshlm generate`` does.

The request's flags are checked before anything loads (a bad value is one ``ConfigError``),
then the run's latest parameters and tokenizer continue the prompt (a decoder-only model) or
transduce it (a seq2seq model: the prompt is the encoder's input), by sampling or, with a beam
width above 1, by beam search. Which of the two is the family's batch type, not its name.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp

from meshlm.config import ConfigError
from meshlm.generate.beam import beam_search
from meshlm.generate.decode import generate
from meshlm.generate.sampling import SamplingParams

# Sampling defaults when a flag is not given (None means "not given", so that beam search can
# refuse a sampling flag instead of ignoring it).
SAMPLING_DEFAULTS = dict(temperature=0.8, top_k=0, top_p=0.95)
LENGTH_PENALTY = 0.6  # GNMT's alpha, T5X's default


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``meshlm generate`` call. ``temperature``/``top_k``/``top_p`` None: not given."""

    run_dir: str
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    beam_width: int = 1
    length_penalty: float | None = None

    def sampling(self) -> SamplingParams:
        given = {k: getattr(self, k) for k in SAMPLING_DEFAULTS if getattr(self, k) is not None}
        if self.beam_width > 1 and given:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
            raise ConfigError(
                f"{flags} choose how to sample, but --beam-width {self.beam_width} searches "
                "instead (deterministic); drop them or use --beam-width 1"
            )
        try:
            return SamplingParams(**(SAMPLING_DEFAULTS | given))
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def check(self) -> None:
        """Every flag on its own, before the run is read."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.beam_width < 1:
            raise ConfigError(
                f"--beam-width must be >= 1 (1 = sample, > 1 = beam search), got "
                f"{self.beam_width}"
            )
        if self.length_penalty is not None:
            if self.beam_width == 1:
                raise ConfigError("--length-penalty ranks beam search's hypotheses; it needs "
                                  "--beam-width > 1")
            if not math.isfinite(self.length_penalty):
                raise ConfigError(
                    f"--length-penalty must be a finite number (alpha in ((5 + length) / 6) ** "
                    f"alpha; 0 = log-probability alone), got {self.length_penalty}"
                )
        self.sampling()


def complete(request: Request) -> str:
    """A decoder-only model's output: the prompt followed by its continuation. A seq2seq
    model's: the output for the prompt as its input. Either ends before the first end-of-text
    token."""
    from meshlm.data import load_run_tokenizer
    from meshlm.data.batches import SEQ2SEQ
    from meshlm.data.tokenizer import eos_id
    from meshlm.train.checkpoint import restore_params

    request.check()
    sampling = request.sampling()
    cfg, params = restore_params(request.run_dir)
    if sampling.top_k > cfg.model.vocab_size:
        raise ConfigError(
            f"--top-k {sampling.top_k} exceeds the model's vocabulary "
            f"(model.vocab_size={cfg.model.vocab_size}); use at most that, or 0 for off"
        )
    tokenizer = load_run_tokenizer(request.run_dir)
    eos = eos_id(tokenizer, repr(request.run_dir))
    run = _transduce if cfg.model.batch_fields == SEQ2SEQ else _continue
    ids = [int(t) for t in jax.device_get(run(request, cfg, params, tokenizer, eos, sampling))]
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids) if run is _transduce else request.prompt + tokenizer.decode(ids)


def _fewer_tokens_note(context: int, max_new: int, request: Request, after: str) -> None:
    print(f"meshlm: note: the model's context is {context} tokens (model.max_seq_len), so "
          f"generating at most {max_new} {after}", file=sys.stderr)


def _continue(request, cfg, params, tokenizer, eos, sampling) -> jax.Array:
    """A decoder-only model's new tokens after the prompt (one row)."""
    from meshlm.models import build_model

    # A document starts after an end-of-text token in training, so the prompt does too.
    prompt = [eos] + tokenizer.encode(request.prompt).ids
    # The model is built for max_seq_len tokens (learned positions have no row beyond it): the
    # sample stops there, as a document would end, rather than refusing the request.
    context = cfg.model.max_seq_len
    if len(prompt) >= context:
        raise ConfigError(
            f"the prompt is {len(prompt)} tokens with the start token, which leaves no room in "
            f"the model's context of model.max_seq_len={context} tokens; shorten it"
        )
    max_new = min(request.max_new_tokens, context - len(prompt))
    if max_new < request.max_new_tokens:
        _fewer_tokens_note(context, max_new, request, f"after the {len(prompt)}-token prompt")
    model, tokens = build_model(cfg.model), jnp.asarray([prompt], jnp.int32)
    if request.beam_width > 1:
        return beam_search(model, params, tokens, beam_width=request.beam_width,
                           max_new_tokens=max_new, length_penalty=_alpha(request),
                           eos_id=eos).tokens[0, 0]
    return generate(model, params, tokens, jax.random.key(request.seed), max_new_tokens=max_new,
                    sampling=sampling, eos_id=eos)[0]


def _transduce(request, cfg, params, tokenizer, eos, sampling) -> jax.Array:
    """A seq2seq model's output tokens for the prompt as its input (one row): the input ends
    with end-of-text and the decoder starts from ``model.decoder_start_token``, as in training."""
    from meshlm.data.seq2seq import decoder_start_id
    from meshlm.generate.seq2seq import seq2seq_beam_search, seq2seq_generate
    from meshlm.models import build_model

    # As the training pairs are encoded: no tokenizer post-processing, end-of-text appended.
    inputs = tokenizer.encode(request.prompt, add_special_tokens=False).ids + [eos]
    length = cfg.model.max_seq_len
    if len(inputs) > length:
        raise ConfigError(
            f"the input is {len(inputs)} tokens with the end-of-text token, more than the "
            f"encoder's model.max_seq_len={length}; shorten it"
        )
    start = decoder_start_id(tokenizer, cfg.model.decoder_start_token)
    max_new = min(request.max_new_tokens, length)  # the decoder's length bounds the output
    if max_new < request.max_new_tokens:
        _fewer_tokens_note(length, max_new, request, "output tokens")
    model, tokens = build_model(cfg.model), jnp.asarray([inputs], jnp.int32)
    if request.beam_width > 1:
        return seq2seq_beam_search(model, params, tokens, start_id=start,
                                   beam_width=request.beam_width, max_new_tokens=max_new,
                                   length_penalty=_alpha(request), eos_id=eos).tokens[0, 0]
    return seq2seq_generate(model, params, tokens, jax.random.key(request.seed), start_id=start,
                            max_new_tokens=max_new, sampling=sampling, eos_id=eos)[0]


def _alpha(request: Request) -> float:
    return LENGTH_PENALTY if request.length_penalty is None else request.length_penalty
