"""PyTorch baseline for scripts/bench_train.py's T5 configs: ``transformers``'
``T5ForConditionalGeneration`` of the same sizes and variant as a meshlm ``T5Config``, trained the
way a PyTorch user would (torch.compile of forward + loss, bf16 autocast, fused AdamW, global-norm
clipping) on the same shapes: encoder and decoder rows of ``seq`` tokens, ``batch`` rows. Its
parameter count equals meshlm's (shared embedding, one relative-bias table per stack).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hf_model(m):
    """``T5ForConditionalGeneration`` for the meshlm ``T5Config`` ``m``, dropout off."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.d_kv, d_ff=m.d_ff,
        num_layers=m.n_layers, num_decoder_layers=m.decoder_layers, num_heads=m.n_heads,
        relative_attention_num_buckets=m.relative_buckets,
        relative_attention_max_distance=m.relative_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=m.norm_eps, initializer_factor=m.init_std,
        feed_forward_proj=m.feed_forward, tie_word_embeddings=m.tie_embeddings,
        decoder_start_token_id=0, pad_token_id=0, use_cache=False)
    return T5ForConditionalGeneration(config)


def measure(model_cfg, batch: int, seq: int, steps: int = 10, warmup: int = 4,
            profile: bool = False, rounds: int = 2) -> dict:
    """Time compiled bf16 training steps on CUDA (``scripts/torch_gpt.time_training``: the same
    loop, timing and result keys as the GPT baseline); a token is one row position."""
    from scripts.torch_gpt import time_training

    torch.manual_seed(0)
    dev = "cuda"
    model = hf_model(model_cfg).to(dev)
    model.train()

    def loss_fn(inputs, decoder_inputs, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    gen = torch.Generator(device=dev).manual_seed(0)
    data = torch.randint(1, model_cfg.vocab_size, (4, 2, batch, seq + 1), device=dev,
                         generator=gen)
    batches = [(enc[:, :-1], dec[:, :-1], dec[:, 1:]) for enc, dec in data]
    return time_training(model, loss_fn, batches, batch * seq, weight_decay=0.01, steps=steps,
                         warmup=warmup, rounds=rounds, profile=profile)
