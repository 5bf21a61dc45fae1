"""Peak host memory and time of ``meshlm convert hf-to-orbax`` on a >= 1B-parameter checkpoint.

No real checkpoint is downloaded: a random one in the shapes of Llama-3.2-1B (1.24B parameters,
bfloat16, two safetensors shards with the index, as the Hub stores it) is written first, through
the LLaMA table's inverse layout, then converted in a child process whose peak resident set size
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) is reported. On a CPU host JAX's "device" arrays are
host memory too, so the converted parameters themselves (the checkpoint's size) are part of the
peak; the rest is the converter's overhead.

    python scripts/measure_convert_memory.py [--dir /tmp/llama1b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                tie_word_embeddings=True)


def write_checkpoint(directory: pathlib.Path) -> int:
    """A random Llama-3.2-1B-shaped HF directory; returns its parameter count."""
    import jax
    import ml_dtypes

    from meshlm.convert.hf import abstract_params, hf_state, run_config
    from meshlm.convert.safetensors_dir import write_shards

    cfg = run_config(LLAMA_1B, "bfloat16")
    abstract = abstract_params(cfg, jax.devices()[:1])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(
        ml_dtypes.bfloat16), abstract)
    directory.mkdir(parents=True)
    write_shards(hf_state(cfg.model, params), directory, max_shard_bytes=2 * 2**30)
    (directory / "config.json").write_text(json.dumps(LLAMA_1B))
    return sum(x.size for x in jax.tree.leaves(params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/meshlm_llama1b_hf")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    hf = pathlib.Path(args.dir)
    if not hf.is_dir():
        print(f"writing a random Llama-3.2-1B-shaped checkpoint to {hf}: "
              f"{write_checkpoint(hf):,} parameters")
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    out = hf.with_name(hf.name + "_run")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "meshlm.cli", "convert", "hf-to-orbax", "--hf",
                    str(hf), "--out", str(out), "--dtype", args.dtype, "--overwrite"], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    print(f"checkpoint {size / 2**30:.2f} GiB ({args.dtype} run): convert {seconds:.0f} s, "
          f"peak RSS {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
