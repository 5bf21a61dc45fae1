"""PyTorch baseline for scripts/bench_train.py: the same GPT architecture and batch as a meshlm
config, written the way a PyTorch user would (torch.compile, scaled_dot_product_attention, bf16
autocast, fused AdamW), so the comparison is against a strong eager-framework baseline.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads, d_ff, norm, mlp, bias):
        super().__init__()
        Norm = nn.LayerNorm if norm == "layernorm" else nn.RMSNorm
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.ln1, self.ln2 = Norm(d_model), Norm(d_model)
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.swiglu = mlp == "swiglu"
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
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class GPT(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        self.tok = nn.Embedding(m.vocab_size, m.d_model)
        self.pos = nn.Embedding(m.max_seq_len, m.d_model) if m.position == "learned" else None
        self.blocks = nn.ModuleList(
            Block(m.d_model, m.n_heads, m.kv_heads, m.d_ff, m.norm, m.mlp, m.use_bias)
            for _ in range(m.n_layers))
        self.ln_f = nn.LayerNorm(m.d_model) if m.norm == "layernorm" else nn.RMSNorm(m.d_model)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.tok.weight

    def forward(self, tokens):
        s = tokens.shape[1]
        x = self.tok(tokens)
        rope = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(s, device=tokens.device))
        else:
            hd = self.m.d_model // self.m.n_heads
            inv = 1.0 / (self.m.rope_theta ** (torch.arange(0, hd, 2, device=tokens.device) / hd))
            ang = torch.arange(s, device=tokens.device)[:, None] * inv[None]
            rope = (ang.cos(), ang.sin())
        for blk in self.blocks:
            x = blk(x, rope)
        return self.head(self.ln_f(x))


def measure(model_cfg, batch: int, seq: int, steps: int = 10, warmup: int = 3) -> dict:
    """Tokens/s of compiled bf16 training steps (forward, backward, fused AdamW) on CUDA."""
    torch.manual_seed(0)
    dev = "cuda"
    model = GPT(model_cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    compiled = torch.compile(model)
    gen = torch.Generator(device=dev).manual_seed(0)
    data = torch.randint(0, model_cfg.vocab_size, (4, batch, seq + 1), device=dev, generator=gen)

    def step(i):
        tokens = data[i % 4]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(i)
        loss.item()  # synchronise
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt, compiled
    torch.cuda.empty_cache()
    return {"step_s": med, "tokens_per_s": batch * seq / med, "params": n_params,
            "loss": float(loss), "finite": math.isfinite(float(loss))}
