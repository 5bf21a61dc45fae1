"""Parity of ``meshlm convert`` with the transformers (torch) implementation.

Needs torch and transformers (the GPU machine has both; CI does not). For each model type it
builds a randomly initialised transformers model from a config (real shapes by default:
GPT-2 124M, Llama-3.2-1B with its Llama-3 RoPE scaling, Mistral-7B-v0.1's first 2 layers with its
4096-token sliding window, Qwen2-0.5B with its q/k/v biases, Mamba-130m, Mamba-2-130m, t5-base
and t5-v1_1-base (encoder-decoders: encoder tokens and a quarter as many decoder tokens);
``--small`` for tiny ones, where Mistral's window of 32 is shorter than the tokens), with its
biases (zeros from transformers' init) drawn at random, saves it with ``save_pretrained``
(safetensors), converts it with ``meshlm.convert.hf_to_orbax``, runs both on the same random
tokens and prints the max abs logit difference and the mean KL(HF || meshlm) of the next-token
distributions, beside the KL of each from transformers in float32 (in bfloat16 both round
differently: the HF-bf16 KL is the noise floor a correct port shares). It then writes the run
back with ``orbax_to_hf``, reloads that with ``from_pretrained`` (``AutoModelForCausalLM``, or
``AutoModelForSeq2SeqLM``) and checks its logits equal the original's exactly.

    python scripts/check_hf_parity.py [--types gpt2 llama ...] [--dtype float32|bfloat16]
        [--small] [--seq 128] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scripts.make_hf_fixtures import untie_t5_head  # noqa: E402

REAL = {
    "gpt2": dict(model_type="gpt2"),  # GPT2Config defaults: 124M
    "llama": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                  tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=4096, sliding_window=4096),
    "qwen2": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  tie_word_embeddings=True),
    # Mixtral-8x7B and Qwen1.5-MoE-A2.7B, their first 2 layers
    "mixtral": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=32768, num_local_experts=8,
                    num_experts_per_tok=2, rope_parameters={"rope_type": "default",
                                                            "rope_theta": 1000000.0}),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
                      intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
                      num_key_value_heads=16, max_position_embeddings=8192,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      num_experts=60, num_experts_per_tok=4, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mamba": dict(model_type="mamba", vocab_size=50280, hidden_size=768, num_hidden_layers=24,
                  state_size=16),
    "mamba2": dict(model_type="mamba2", vocab_size=50288, hidden_size=768, num_hidden_layers=24,
                   state_size=128, head_dim=64, num_heads=24, n_groups=1, chunk_size=256,
                   tie_word_embeddings=True),
    # t5-base and t5-v1_1-base (encoder-decoder: the decoder reads a quarter of --seq tokens)
    "t5": dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
               num_decoder_layers=12, num_heads=12, feed_forward_proj="relu",
               tie_word_embeddings=True),
    "t5_v1_1": dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=2048,
                    num_layers=12, num_decoder_layers=12, num_heads=12,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
SMALL = {
    "gpt2": dict(model_type="gpt2", vocab_size=512, n_positions=256, n_embd=64, n_layer=2,
                 n_head=4),
    "llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 128}),
    "mistral": dict(model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, sliding_window=32),
    "qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, use_sliding_window=False,
                  tie_word_embeddings=True),
    "mixtral": dict(model_type="mixtral", vocab_size=512, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=512, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=4, use_sliding_window=False),
    "mamba": dict(model_type="mamba", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                  state_size=8),
    "mamba2": dict(model_type="mamba2", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                   state_size=16, head_dim=16, num_heads=8, n_groups=2, chunk_size=32),
    "t5": dict(model_type="t5", vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2,
               num_decoder_layers=2, num_heads=4, feed_forward_proj="relu",
               tie_word_embeddings=True),
    "t5_v1_1": dict(model_type="t5", vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                    num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False),
}


def _auto_class(config_or_type):
    """transformers' Auto class of the model: seq2seq for encoder-decoders (T5), else causal."""
    import transformers

    seq2seq = getattr(config_or_type, "is_encoder_decoder", False)
    return (transformers.AutoModelForSeq2SeqLM if seq2seq
            else transformers.AutoModelForCausalLM)


def _hf_model(spec: dict, torch):
    import transformers

    spec = dict(spec)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = _auto_class(config).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and not param.any():  # not special inits
                param.normal_(0.0, 0.02)
        if config.is_encoder_decoder and not spec.get("tie_word_embeddings", True):
            untie_t5_head(model, torch)
    return model


def _load(path: str, args, torch):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    return _auto_class(config).from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()


def _hf_logits(model, tokens, torch, device):
    """Next-token logits; ``tokens`` one array (decoder-only) or (encoder, decoder) tokens."""
    as_tensor = lambda t: torch.as_tensor(t, device=device)  # noqa: E731
    with torch.no_grad():
        if isinstance(tokens, tuple):
            out = model.to(device)(input_ids=as_tensor(tokens[0]),
                                   decoder_input_ids=as_tensor(tokens[1])).logits
        else:
            out = model.to(device)(as_tensor(tokens)).logits
    return out.float().cpu().numpy()


def _kl(p_logits, q_logits) -> float:
    """Mean KL(p || q) of the next-token distributions."""
    logp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    logq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1)))


def check(model_type: str, spec: dict, args, torch, device) -> dict:
    from meshlm.convert.hf import hf_to_orbax, orbax_to_hf
    from meshlm.models import build_model
    from meshlm.train.checkpoint import restore_params

    with tempfile.TemporaryDirectory() as tmp:
        model = _hf_model(spec, torch).eval()
        model.save_pretrained(f"{tmp}/hf", safe_serialization=True)
        vocab = model.config.vocab_size
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, vocab, (args.batch, args.seq))
        if model.config.is_encoder_decoder:
            tokens = (tokens, rng.integers(0, vocab, (args.batch, max(1, args.seq // 4))))
        exact = _hf_logits(model, tokens, torch, device)  # float32: the yardstick of both
        del model
        # Loaded in --dtype as the round trip's model is: ``.to(bfloat16)`` would also round
        # buffers (RoPE's inverse frequencies) that ``from_pretrained`` keeps in float32.
        want = _hf_logits(_load(f"{tmp}/hf", args, torch), tokens, torch, device)

        start = time.perf_counter()
        hf_to_orbax(f"{tmp}/hf", f"{tmp}/run", dtype=args.dtype)
        seconds = time.perf_counter() - start
        cfg, params = restore_params(f"{tmp}/run")
        inputs = [jnp.asarray(t, jnp.int32) for t in
                  (tokens if isinstance(tokens, tuple) else (tokens,))]
        got = np.asarray(build_model(cfg.model).apply({"params": params}, *inputs), np.float32)
        kl = _kl(want, got)

        orbax_to_hf(f"{tmp}/run", f"{tmp}/back")
        again = _hf_logits(_load(f"{tmp}/back", args, torch), tokens, torch, device)
        return dict(type=model_type, params=sum(x.size for x in jax.tree.leaves(params)),
                    max_abs_diff=float(np.max(np.abs(got - want))), kl=kl,
                    kl_fp32=_kl(exact, got), floor_fp32=_kl(exact, want),
                    round_trip_exact=bool(np.array_equal(again, want)), convert_s=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", nargs="*", default=list(REAL), choices=list(REAL))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--small", action="store_true", help="tiny shapes (a quick check)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None,
                        help="override every model's layer count (real widths, fewer layers)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: torch uses none
    specs = SMALL if args.small else REAL
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on "
          f"{device}, dtype {args.dtype}, tokens {args.batch}x{args.seq}")
    # KL: HF vs meshlm, both in --dtype. KL fp32: meshlm (--dtype) vs HF in float32, beside
    # floor: HF (--dtype) vs HF in float32, the rounding noise a correct port shares.
    print(f"{'type':8s} {'params':>12s} {'max|dlogit|':>12s} {'KL':>10s} {'KL fp32':>10s} "
          f"{'floor':>10s} {'HF->run->HF':>12s} {'convert s':>9s}")
    for t in args.types:
        spec = dict(specs[t])
        if args.layers is not None:
            keys = (("num_layers", "num_decoder_layers") if "num_layers" in spec
                    else ("num_hidden_layers",))
            spec.update(dict.fromkeys(keys, args.layers))
        r = check(t, spec, args, torch, device)
        print(f"{r['type']:8s} {r['params']:12,d} {r['max_abs_diff']:12.3e} {r['kl']:10.3e} "
              f"{r['kl_fp32']:10.3e} {r['floor_fp32']:10.3e} "
              f"{'exact' if r['round_trip_exact'] else 'DIFFERS':>12s} {r['convert_s']:9.1f}")


if __name__ == "__main__":
    main()
