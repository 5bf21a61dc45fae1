"""PyTorch baseline for scripts/bench_train.py's T5 configs: ``transformers``'
``T5ForConditionalGeneration`` of the same sizes and variant as a meshlm ``T5Config``, trained the
way a PyTorch user would (torch.compile of forward + loss, bf16 autocast, fused AdamW, global-norm
clipping) on the same shapes: encoder and decoder rows of ``seq`` tokens, ``batch`` rows. Its
parameter count equals meshlm's (shared embedding, one relative-bias table per stack).
"""

from __future__ import annotations

import math
import time

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
    """Time compiled bf16 training steps on CUDA; the same result keys as
    ``scripts/torch_gpt.measure`` (step time: fastest of ``rounds`` means over ``steps``)."""
    torch.manual_seed(0)
    dev = "cuda"
    model = hf_model(model_cfg).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def loss_fn(inputs, decoder_inputs, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    compiled = torch.compile(loss_fn)
    gen = torch.Generator(device=dev).manual_seed(0)
    data = torch.randint(1, model_cfg.vocab_size, (4, 2, batch, seq + 1), device=dev,
                         generator=gen)

    def step(i):
        enc, dec = data[i % 4]
        loss = compiled(enc[:, :-1], dec[:, :-1], dec[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = float(step(0))
    for i in range(1, warmup):
        step(i)
    torch.cuda.synchronize()
    round_s = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        losses = [step(i) for i in range(steps)]
        last = float(losses[-1])  # synchronises
        round_s.append((time.perf_counter() - t0) / steps)
    step_s = min(round_s)
    summary = None
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                step(i)
            torch.cuda.synchronize()
        summary = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                            max_name_column_width=90)
    n_params = sum(p.numel() for p in model.parameters())
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, compiled
    torch.cuda.empty_cache()
    return {"step_s": step_s, "round_s": round_s, "tokens_per_s": batch * seq / step_s,
            "params": n_params, "first_loss": first, "last_loss": last,
            "finite": math.isfinite(last), "peak_gib": peak_gib,
            **({"profile": summary} if summary else {})}
