"""Tiny random transformers models of each supported ``model_type``, with their outputs, as
fixtures for ``tests/test_convert.py`` and ``tests/test_t5.py`` (needs torch and transformers:
run on the GPU machine).

For each fixture (a ``model_type``, or a named variant of one: ``llama3`` is LLaMA with Llama-3
RoPE scaling): ``AutoModelForCausalLM.from_config`` (float32, seeded; biases, which transformers
initialises to zero, drawn at random where still zero so that a misplaced bias shows) saved with
``save_pretrained`` under ``tests/fixtures/hf/<name>/``, plus ``reference.npz``: fixed
``input_ids`` (2 x 16), their ``logits``, a ``prompt`` (1 x 8) and its 20 ``greedy`` new tokens
(``generate(do_sample=False)``, no end-of-text stop). Each fixture is a few hundred KB. The
fixtures are written by the reference implementation, never by hand; the test converts each and
checks logits (max abs difference <= 1e-4), greedy tokens (identical) and the round trip.

Encoder-decoder fixtures (``t5``: ReLU FFN, tied embeddings; ``t5_v1_1``: gated GELU, untied
head) are ``AutoModelForSeq2SeqLM`` (``T5ForConditionalGeneration``) with layer-norm scales drawn
around 1 (a misplaced norm shows); ``reference.npz`` holds encoder ``input_ids`` (2 x 16),
``decoder_input_ids`` (2 x 8), the ``encoder_output``, the decoder's ``logits``, a ``prompt``
(1 x 8) and its 12 ``greedy`` output tokens (the decoder starts from ``decoder_start_token_id``).

    python scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [--types llama3 mistral ...]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

# name -> config of AutoConfig.for_model(model_type, ...) (model_type defaults to the name).
# llama3's original context of 32 puts the tiny head's 4 frequencies in all three of Llama 3.1's
# bands; mistral's window of 8 is shorter than the 16 input tokens and the 28 generated ones.
SPECS = {
    "gpt2": dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "llama": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "llama3": dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}),
    "mistral": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    sliding_window=8),
    "qwen2": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  use_sliding_window=False, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "mixtral": dict(vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      moe_intermediate_size=16, shared_expert_intermediate_size=32,
                      num_experts=6, num_experts_per_tok=3, use_sliding_window=False),
    "mamba": dict(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2),
    "mamba2": dict(vocab_size=128, hidden_size=32, state_size=8, head_dim=8, num_heads=8,
                   n_groups=2, num_hidden_layers=2, chunk_size=16),
    # transformers 5 always ties T5's head to the embedding and reads tie_word_embeddings=False
    # as "no d_model**-0.5 logit scaling"; make_seq2seq gives t5_v1_1 its own head.
    "t5": dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0),
    "t5_v1_1": dict(model_type="t5", vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                    num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, decoder_start_token_id=0),
}


def make(name: str, out: pathlib.Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    spec = dict(SPECS[name])
    config = transformers.AutoConfig.for_model(spec.pop("model_type", name), **spec)
    if config.is_encoder_decoder:
        return make_seq2seq(name, config, spec, out)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(".bias") and not param.any():  # not special inits
                param.normal_(0.0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (2, 16))
    prompt = ids[:1, :8]
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)).logits.numpy()
        model.generation_config.eos_token_id = None  # 20 tokens, whatever they are
        full = model.generate(torch.as_tensor(prompt), max_new_tokens=20, do_sample=False,
                              pad_token_id=0).numpy()
    np.savez(out / "reference.npz", input_ids=ids.astype(np.int32),
             logits=logits.astype(np.float32), prompt=prompt.astype(np.int32),
             greedy=full[:, prompt.shape[1]:].astype(np.int32))
    print(f"{name}: {out} ({sum(f.stat().st_size for f in out.iterdir()) // 1024} KiB)")


def untie_t5_head(model, torch) -> None:
    """Give a T5 model its own random LM head, as T5 v1.1 / Flan-T5 checkpoints have: transformers
    5 ties T5's head to the embedding whatever ``tie_word_embeddings`` says."""
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(model.shared.weight) * model.config.d_model ** -0.5)
    model.config.tie_word_embeddings = False


def make_seq2seq(name: str, config, spec: dict, out: pathlib.Path) -> None:
    """An encoder-decoder fixture (see the module docstring); ``spec`` is ``config``'s kwargs."""
    import torch
    import transformers

    model = transformers.AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "layer_norm" in param_name:
                param.normal_(1.0, 0.1)
        if not spec["tie_word_embeddings"]:
            untie_t5_head(model, torch)
    model.save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, config.vocab_size, (2, 16))  # no pad (0) or end-of-text (1) ids
    dec_ids = np.concatenate([np.zeros((2, 1), np.int64),
                              rng.integers(2, config.vocab_size, (2, 7))], axis=1)
    prompt = ids[:1, :8]
    with torch.no_grad():
        result = model(input_ids=torch.as_tensor(ids), decoder_input_ids=torch.as_tensor(dec_ids))
        model.generation_config.eos_token_id = None  # 12 tokens, whatever they are
        full = model.generate(input_ids=torch.as_tensor(prompt),
                              attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                              max_new_tokens=12, do_sample=False, pad_token_id=0,
                              decoder_start_token_id=config.decoder_start_token_id).numpy()
    assert full[0, 0] == config.decoder_start_token_id and full.shape == (1, 13), full
    np.savez(out / "reference.npz", input_ids=ids.astype(np.int32),
             decoder_input_ids=dec_ids.astype(np.int32),
             encoder_output=result.encoder_last_hidden_state.numpy().astype(np.float32),
             logits=result.logits.numpy().astype(np.float32), prompt=prompt.astype(np.int32),
             greedy=full[:, 1:].astype(np.int32))
    print(f"{name}: {out} ({sum(f.stat().st_size for f in out.iterdir()) // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parents[1] / "tests" /
                                             "fixtures" / "hf"))
    parser.add_argument("--types", nargs="*", default=list(SPECS), choices=list(SPECS))
    args = parser.parse_args()
    for t in args.types:
        make(t, pathlib.Path(args.out) / t)


if __name__ == "__main__":
    main()
