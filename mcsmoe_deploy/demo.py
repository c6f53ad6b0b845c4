"""`mcsmoe demo`: compress the embedded model and measure what was gained and lost.

Built on the public API only: one CalibratedModel (the statistics pass compress_model uses) makes
the merged, the merged and quantized, and the compressed model; export_model, run_bench and
generate_text serve them.
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
    quantize: str | None = "int4",
    quant_block: int = 16,
    out_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    serve: bool = True,
) -> DemoResult:
    """Dense vs merged (M-SMoE) vs merged and quantized vs merged and compressed (MC-SMoE), on held-out text
    of the built-in corpus.

    One routing-statistics pass serves every recipe. `quantize` ("int4", "int8"; None: no such row): the
    merged model with every linear layer and the input embeddings quantized in blocks of `quant_block` values
    (16 divides the embedded model's expert size, 144). With `out_dir`, the compressed model is also written
    as a checkpoint. With `serve`, the dense, the merged and quantized, and the final compressed model are
    exported to ONNX, served with onnxruntime and measured (see `serve_models`).
    """
    start = time.perf_counter()
    model_dir = Path(model_dir) if model_dir is not None else embedded_model_dir()
    recipe = CompressionRecipe(
        experts=experts, rank_ratio=rank_ratio, sparse_keep=sparse_keep, distill_steps=distill_steps,
        low_rank="activation-aware" if activation_aware else "svd",
    )
    recipe.validate()
    # merged, then quantized: no low rank, no distillation; same statistics pass and grouping as the others
    quantized_recipe = None if quantize is None else replace(
        recipe, rank_ratio=1.0, distill_steps=0, quantize=quantize, quant_block=quant_block,
        quant_scope="all+embeddings")
    if out_dir is not None:
        prepare_output_dir(out_dir, force, inputs=(model_dir,))
    # calibrated with the quantized recipe, when there is one, so that its block size is checked against the
    # model before the long work; the calibration fields of all recipes are the same
    source = CalibratedModel(model_dir, quantized_recipe or recipe, progress=progress)
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
    # every recipe shares the one statistics pass and groups alike; only the storage of the merged experts differs
    merged = source.compress(replace(recipe, rank_ratio=1.0))
    quantized = None
    if quantized_recipe is not None:
        quantized = source.compress(quantized_recipe)
        source.quantize(quantized)
    compressed = source.compress(recipe)
    result.compress_seconds = time.perf_counter() - compress_start
    result.rows.append(row(f"merged (M-SMoE, {experts} experts)", merged.model))
    if quantized is not None:
        result.rows.append(row(f"merged + {quantize} (all layers, embeddings)", quantized.model))
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
            checkpoints = {"dense": model_dir}
            if quantized is not None:
                checkpoints[f"merged+{quantize}"] = source.save(quantized, Path(work) / "quantized")
            checkpoints["compressed"] = (Path(result.out_dir) if result.out_dir
                                         else source.save(compressed, Path(work) / "compressed"))
            del source, merged, quantized, compressed
            result.serving = serve_models(checkpoints, Path(work), progress)
    result.total_seconds = time.perf_counter() - start
    return result


DEMO_PROMPT = "The def statement"


def serve_models(checkpoints: dict[str, Path], work_dir: Path, progress: bool = True) -> ServingResult:
    """Export each checkpoint (name -> directory, dense first; KV-cache graphs for target ort, validated) into
    `work_dir`, bench them with onnxruntime in one run (batch 1, 64-token prompt, 32 decode steps), and
    continue DEMO_PROMPT with each."""
    from .exporters import export_model
    from .runtime import BenchConfig, Contestant, GenerationConfig, run_bench
    from .runtime.text import generate_text

    graphs = {name: work_dir / f"{name.replace('+', '-')}.onnx" for name in checkpoints}
    exports = [export_model(source, graphs[name]) for name, source in checkpoints.items()]
    contestants = [Contestant(str(path), "ort", label=f"{name} (onnxruntime)") for name, path in graphs.items()]
    bench = run_bench(contestants, BenchConfig(prompt_len=64, decode_tokens=32, warmup=2, iterations=5), progress)
    samples = []
    for name, path in graphs.items():
        text = generate_text(path, [DEMO_PROMPT], "ort", GenerationConfig(max_new_tokens=24))
        samples.append((name, DEMO_PROMPT, text.completions[0]))
    return ServingResult(exports, bench, samples)
