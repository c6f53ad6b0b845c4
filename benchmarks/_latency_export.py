"""Build the latency benchmark's model and export it, one contestant per child process.

    python benchmarks/_latency_export.py KIND MODEL_DIR OUT

KIND is one of EXPORTERS: "ours" and "ort-fused" (a dense checkpoint through our exporter,
MoE blocks as `ai.mcsmoe::GroupedLowRankMoE` or as `com.microsoft::MoE`), "compressed" (a
compressed checkpoint through our exporter) and "transformers" (transformers' own
`OnnxExporter.export_for_generation`, fused for onnxruntime's CPU provider). The parent
(export_latency.py) times the child and reads its peak RSS from the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _random_models import save_random_mixtral

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class ModelSize:
    """A random Mixtral-family model: the shape of the benchmark."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    experts: int = 8
    top_k: int = 2
    vocab: int = 32000
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        """Parameter count (untied embeddings and head, norms and routers included)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        experts = self.experts * 3 * self.hidden * self.intermediate
        per_layer = attention + experts + self.experts * self.hidden + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


MODEL_SIZES = {
    # about 350M parameters (1.4 GB fp32): each layer's experts (69M parameters, 277 MB) are far past any cache
    "bench": ModelSize(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4),
    # for developing the benchmark: same structure, seconds to export
    "small": ModelSize(hidden=256, intermediate=704, layers=2, heads=8, kv_heads=2, vocab=4096),
    # for checking that every contestant decodes like transformers' generate (a large init spreads the logits)
    "tiny": ModelSize(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=2048, initializer_range=0.2),
}


def build_model(path: Path, size: ModelSize, seed: int = 0) -> int:
    """Save a seeded random Mixtral of `size` with the package's embedded tokenizer; returns its parameters."""
    return save_random_mixtral(
        path, seed, vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        num_local_experts=size.experts, num_experts_per_tok=size.top_k, max_position_embeddings=2048,
        tie_word_embeddings=False, initializer_range=size.initializer_range,
    )


def export_transformers(model_dir: Path, out_dir: Path) -> None:
    """transformers' exporter: prefill.onnx + decode.onnx (KV cache), fused for onnxruntime's CPU provider."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.exporters import OnnxConfig, OnnxExporter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # the capture runs generate(): a short prompt, batch 1 (the batch axis specialises to the sample's)
    ids = torch.arange(3, 11, dtype=torch.long)[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        exported = OnnxExporter().export_for_generation(model, inputs, OnnxConfig(dynamic=True, ort_fusions="cpu"))
    shutil.rmtree(out_dir, ignore_errors=True)
    exported.save_pretrained(out_dir)


def export_ours(model_dir: Path, out_path: Path, target: str) -> None:
    """Our exporter with KV cache (one graph for prefill and decode), dense or compressed checkpoint."""
    from mcsmoe_deploy.exporters.pipeline import export_model

    export_model(model_dir, out_path, with_past=True, target=target, validate=False, force=True)


EXPORTERS = ("transformers", "ours", "ort-fused", "compressed")


def export(kind: str, model_dir: Path, out: Path) -> None:
    """Export `model_dir` as contestant `kind` to `out` (a file, or a folder for transformers)."""
    if kind == "transformers":
        export_transformers(model_dir, out)
    elif kind in ("ours", "compressed"):
        export_ours(model_dir, out, "portable")
    elif kind == "ort-fused":
        export_ours(model_dir, out, "ort-fused")
    else:
        raise ValueError(f"unknown exporter {kind!r}; one of {', '.join(EXPORTERS)}")


def main() -> None:
    kind, model_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    start = time.perf_counter()
    export(kind, model_dir, out)
    # the parent reads this line for the export time without interpreter start-up and imports
    print(json.dumps({"kind": kind, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
