"""`mcsmoe demo`: compress the embedded model and measure what was gained and lost.

Built on the public API only: one CalibratedModel (the statistics pass compress_model uses) makes
both the merged and the compressed model; export_model, run_bench and generate_text serve them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from torch import nn

from .compress import CalibratedModel, CompressionRecipe
from .corpus import builtin_corpus, token_blocks
from .errors import UserError
from .evaluate import perplexity
from .files import prepare_output_dir
from .report import DemoResult, DemoRow, ServingResult, size_report

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "tiny-mixtral"
EVAL_SEQ_LEN = 128


def embedded_model_dir() -> Path:
    """The small trained Mixtral-family model shipped in the package."""
    if not (EMBEDDED_MODEL / "config.json").is_file():
        raise UserError(f"the embedded model is missing from the installation ({EMBEDDED_MODEL})")
    return EMBEDDED_MODEL


def run_demo(
    model_dir: str | Path | None = None,
    experts: int = 4,
    rank_ratio: float = 0.5,
    sparse_keep: float = 0.05,
    distill_steps: int = 100,
    activation_aware: bool = False,
    out_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    serve: bool = True,
) -> DemoResult:
    """Dense vs merged (M-SMoE) vs merged and compressed (MC-SMoE), on held-out text of the built-in corpus.

    One routing-statistics pass serves both recipes. With `out_dir`, the
    compressed model is also written as a checkpoint. With `serve`, the dense and the final
    compressed model are exported to ONNX, served with onnxruntime and measured (see
    `serve_both`).
    """
    start = time.perf_counter()
    model_dir = Path(model_dir) if model_dir is not None else embedded_model_dir()
    recipe = CompressionRecipe(
        experts=experts, rank_ratio=rank_ratio, sparse_keep=sparse_keep, distill_steps=distill_steps,
        low_rank="activation-aware" if activation_aware else "svd",
    )
    recipe.validate()
    if out_dir is not None:
        prepare_output_dir(out_dir, force, inputs=(model_dir,))
    source = CalibratedModel(model_dir, recipe, progress=progress)
    adapter = source.adapter
    if adapter.encoder_decoder:
        raise UserError("the demo measures causal-LM perplexity; give it a decoder-only model")
    heldout = token_blocks(source.tokenizer, builtin_corpus("heldout"), EVAL_SEQ_LEN)

    def row(name: str, model: nn.Module) -> DemoRow:
        size = size_report(model, adapter)
        return DemoRow(name, size.total_parameters, size.total_bytes, size.expert_parameters, size.expert_bytes,
                       perplexity(model, heldout))

    result = DemoResult(model_dir=str(model_dir), recipe=recipe.to_dict())
    result.rows.append(row("dense", source.model))
    compress_start = time.perf_counter()
    # both recipes share the one statistics pass and group alike; only the storage of the merged experts differs
    merged = source.compress(replace(recipe, rank_ratio=1.0))
    compressed = source.compress(recipe)
    result.compress_seconds = time.perf_counter() - compress_start
    result.rows.append(row(f"merged (M-SMoE, {experts} experts)", merged.model))
    aware = ", activation-aware" if activation_aware else ""
    name = f"compressed (MC-SMoE, rank {rank_ratio:g}, sparse {sparse_keep:g}{aware})"
    result.rows.append(row(name, compressed.model))
    if distill_steps:
        source.distill(compressed)
        result.rows.append(row(f"compressed + distillation ({distill_steps} steps)", compressed.model))
    if out_dir is not None:
        result.out_dir = str(source.save(compressed, out_dir, force=force))
    if serve:
        with tempfile.TemporaryDirectory(prefix="mcsmoe-demo-") as work:
            if result.out_dir:
                compressed_dir = Path(result.out_dir)
            else:
                compressed_dir = source.save(compressed, Path(work) / "compressed")
            del source, merged, compressed
            result.serving = serve_both(model_dir, compressed_dir, Path(work), progress)
    result.total_seconds = time.perf_counter() - start
    return result


DEMO_PROMPT = "The def statement"


def serve_both(dense_dir: Path, compressed_dir: Path, work_dir: Path, progress: bool = True) -> ServingResult:
    """Export both checkpoints (KV-cache graphs, validated), bench them with onnxruntime in one run
    (batch 1, 64-token prompt, 32 decode steps), and continue DEMO_PROMPT with each."""
    from .exporters import export_model
    from .runtime import BenchConfig, Contestant, GenerationConfig, run_bench
    from .runtime.text import generate_text

    graphs = {"dense": work_dir / "dense.onnx", "compressed": work_dir / "compressed.onnx"}
    exports = [export_model(source, graphs[name]) for name, source in (("dense", dense_dir), ("compressed", compressed_dir))]
    contestants = [Contestant(str(path), "ort", label=f"{name} (onnxruntime)") for name, path in graphs.items()]
    bench = run_bench(contestants, BenchConfig(prompt_len=64, decode_tokens=32, warmup=2, iterations=5), progress)
    samples = []
    for name, path in graphs.items():
        text = generate_text(path, [DEMO_PROMPT], "ort", GenerationConfig(max_new_tokens=24))
        samples.append((name, DEMO_PROMPT, text.completions[0]))
    return ServingResult(exports, bench, samples)
