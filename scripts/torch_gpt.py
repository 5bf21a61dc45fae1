"""PyTorch baseline for scripts/bench_train.py: the same GPT architecture and batch as a meshlm
config, written the way a PyTorch user would (torch.compile, scaled_dot_product_attention, bf16
autocast, fused AdamW, the loss compiled with the model), so the comparison is against a
strong baseline. Parameters are counted the same way as meshlm's (checked by bench_train.py).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def make_norm(m):
    if m.norm == "layernorm":
        return nn.LayerNorm(m.d_model, eps=m.norm_eps, bias=m.use_bias)
    return nn.RMSNorm(m.d_model, eps=m.norm_eps)


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        d_model, n_heads, n_kv_heads, d_ff, bias = (
            m.d_model, m.n_heads, m.kv_heads, m.d_ff, m.use_bias)
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = m.dim_per_head
        self.ln1, self.ln2 = make_norm(m), make_norm(m)
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.swiglu = m.mlp == "swiglu"
        self.fc = nn.Linear(d_model, d_ff * (2 if self.swiglu else 1), bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x, rope):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
             self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, -1))
        h = self.fc(self.ln2(x))
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return x + self.fc_out(h)


def apply_rope(x, rope):
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)  # angles in float32, as meshlm's apply_rope
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class GPT(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        self.tok = nn.Embedding(m.vocab_size, m.d_model)
        self.pos = nn.Embedding(m.max_seq_len, m.d_model) if m.position == "learned" else None
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.n_layers))
        self.ln_f = make_norm(m)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.tok.weight
        for mod in self.modules():  # meshlm's init (normal weights, zero biases): same 1st loss
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=m.init_std)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                nn.init.zeros_(mod.bias)

    def forward(self, tokens):
        s = tokens.shape[1]
        x = self.tok(tokens)
        rope = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(s, device=tokens.device))
        else:
            hd = self.m.dim_per_head
            inv = 1.0 / (self.m.rope_theta ** (torch.arange(0, hd, 2, device=tokens.device) / hd))
            ang = torch.arange(s, device=tokens.device)[:, None] * inv[None]
            rope = (ang.cos(), ang.sin())
        for blk in self.blocks:
            x = blk(x, rope)
        return self.head(self.ln_f(x))


def measure(model_cfg, batch: int, seq: int, steps: int = 10, warmup: int = 4,
            profile: bool = False, rounds: int = 2) -> dict:
    """Time compiled bf16 training steps (forward, loss, backward, clipping, fused AdamW) on CUDA:
    ``time_training`` of this GPT on random tokens."""
    torch.manual_seed(0)
    dev = "cuda"
    model = GPT(model_cfg).to(dev)

    def loss_fn(tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    gen = torch.Generator(device=dev).manual_seed(0)
    data = torch.randint(0, model_cfg.vocab_size, (4, batch, seq + 1), device=dev, generator=gen)
    return time_training(model, loss_fn, [(tokens,) for tokens in data], batch * seq,
                         weight_decay=0.1, steps=steps, warmup=warmup, rounds=rounds,
                         profile=profile)


def time_training(model, loss_fn, batches, tokens_per_step: int, *, weight_decay: float,
                  steps: int, warmup: int, rounds: int, profile: bool) -> dict:
    """Time steps of ``torch.compile(loss_fn)`` + backward + clipping + fused AdamW on CUDA,
    cycling through ``batches`` (argument tuples of ``loss_fn``).

    Returns the mean step time over ``steps`` steps after ``warmup`` (one host sync at the end,
    as a training loop runs), the fastest of ``rounds`` such rounds (each one in ``round_s``),
    tokens/s, the parameter count and the first and last losses; with ``profile``, also
    ``"profile"``: the CUDA kernels of two more steps by total time (text).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=weight_decay, fused=True)
    compiled = torch.compile(loss_fn)

    def step(i):
        loss = compiled(*batches[i % len(batches)])
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
    return {"step_s": step_s, "round_s": round_s, "tokens_per_s": tokens_per_step / step_s,
            "params": n_params,
            "first_loss": first, "last_loss": last, "finite": math.isfinite(last),
            "peak_gib": peak_gib, **({"profile": summary} if summary else {})}
