"""Peak memory of `mcsmoe compress` on a random Mixtral-family model of about 1B parameters.

Builds the model once (cached in benchmarks/cache/, about 4 GB of fp32 safetensors),
then runs the real command line in a child process and reads the child's peak RSS
from the kernel (getrusage). Reports the peak as a ratio to the model's fp32 size.

    python benchmarks/compress_memory.py [--layers 13] [--json out.json]

Takes several minutes on 2 cores (calibration is kept short: the point is memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _random_models import save_random_mixtral

CACHE = Path(__file__).parent / "cache"


def build_model(path: Path, layers: int) -> int:
    """Save a random ~1B Mixtral (hidden 1024, 8 experts of 3072) with the embedded tokenizer; returns parameters."""
    return save_random_mixtral(
        path, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank-ratio", type=float, default=1.0)
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_dir = CACHE / f"mixtral-1b-{args.layers}l"
    if not model_dir.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"building {model_dir} ...", flush=True)
        build_model(model_dir, args.layers)
    weights_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    out_dir = CACHE / "mixtral-1b-compressed"
    command = [
        sys.executable, "-m", "mcsmoe_deploy.cli", "compress", str(model_dir), str(out_dir), "--force",
        "--experts", str(args.experts), "--rank-ratio", str(args.rank_ratio),
        "--max-calib-tokens", str(args.calib_tokens), "--quiet",
    ]
    start = time.perf_counter()
    completed = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"compress failed:\n{completed.stderr}")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    result = {
        "parameters_fp32_bytes": weights_bytes,
        "peak_rss_bytes": peak_rss,
        "peak_rss_over_fp32_size": round(peak_rss / weights_bytes, 3),
        "seconds": round(seconds, 1),
        "command": " ".join(command[1:]),
        "compressed_bytes": sum(f.stat().st_size for f in out_dir.glob("*.safetensors")),
    }
    print(completed.stdout)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
