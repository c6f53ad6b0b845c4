"""`mcsmoe demo`: compress the embedded model and measure what was gained and lost."""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checkpoint import save_compressed
from .files import prepare_output_dir
from .compress.pipeline import calibration_blocks, check_experts, compress_loaded, load_tokenizer, mcsmoe_section
from .compress.plan import apply_plan
from .compress.recipe import CompressionRecipe
from .corpus import builtin_corpus, token_blocks
from .errors import UserError
from .evaluate import perplexity
from .models import load_model
from .report import size_report

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "tiny-mixtral"
EVAL_SEQ_LEN = 128


@dataclass
class DemoRow:
    """One model of the demo: sizes and held-out perplexity."""

    name: str
    parameters: int
    bytes: int
    expert_parameters: int
    expert_bytes: int
    perplexity: float


@dataclass
class ServingResult:
    """Both models exported, served with onnxruntime (CPU) and measured in one run, and a sample of each."""

    exports: list  # ExportReport per model, dense first
    bench: object  # BenchReport, dense first
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (model, prompt, completion)


@dataclass
class DemoResult:
    model_dir: str
    recipe: dict
    rows: list[DemoRow] = field(default_factory=list)
    compress_seconds: float = 0.0
    total_seconds: float = 0.0
    out_dir: str | None = None
    serving: ServingResult | None = None


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
        activation_aware=activation_aware,
    )
    recipe.validate()
    if out_dir is not None:
        prepare_output_dir(out_dir, force)
    torch.manual_seed(recipe.seed)
    check_experts(model_dir, recipe)
    dense, adapter = load_model(model_dir)
    if adapter.encoder_decoder:
        raise UserError("the demo measures causal-LM perplexity; give it a decoder-only model")
    tokenizer = load_tokenizer(model_dir)
    heldout = token_blocks(tokenizer, builtin_corpus("heldout"), EVAL_SEQ_LEN)
    calib = calibration_blocks(tokenizer, recipe)

    def row(name: str, model) -> DemoRow:
        size = size_report(model, adapter)
        return DemoRow(name, size.total_parameters, size.total_bytes, size.expert_parameters, size.expert_bytes,
                       perplexity(model, heldout))

    result = DemoResult(model_dir=str(model_dir), recipe=recipe.to_dict())
    result.rows.append(row("dense", dense))
    compress_start = time.perf_counter()
    merged = copy.deepcopy(dense)
    # one statistics pass and one plan serve both the merge-only and the compressed model
    plan = compress_loaded(merged, adapter, calib, replace(recipe, rank_ratio=1.0), progress)
    compressed = copy.deepcopy(dense)
    apply_plan(compressed, adapter, plan, recipe, progress)
    result.compress_seconds = time.perf_counter() - compress_start
    result.rows.append(row(f"merged (M-SMoE, {experts} experts)", merged))
    aware = ", activation-aware" if activation_aware else ""
    result.rows.append(row(f"compressed (MC-SMoE, rank {rank_ratio:g}, sparse {sparse_keep:g}{aware})", compressed))
    distilled = None
    if distill_steps:
        from .compress.distill import distill

        distilled = distill(
            compressed, dense, adapter, calib, distill_steps, lr=recipe.distill_learning_rate, progress=progress
        )
        result.rows.append(row(f"compressed + distillation ({distill_steps} steps)", compressed))
    section = mcsmoe_section(plan, recipe, str(model_dir), distilled)
    if out_dir is not None:
        result.out_dir = str(save_compressed(compressed, section, out_dir, source_dir=model_dir, force=force))
    if serve:
        with tempfile.TemporaryDirectory(prefix="mcsmoe-demo-") as work:
            compressed_dir = Path(result.out_dir) if result.out_dir else \
                save_compressed(compressed, section, Path(work) / "compressed", source_dir=model_dir)
            del dense, merged, compressed
            result.serving = serve_both(model_dir, compressed_dir, Path(work), progress)
    result.total_seconds = time.perf_counter() - start
    return result


DEMO_PROMPT = "The def statement"


def serve_both(dense_dir: Path, compressed_dir: Path, work_dir: Path, progress: bool = True) -> ServingResult:
    """Export both checkpoints (KV-cache graphs, validated), bench them with onnxruntime in one run
    (batch 1, 64-token prompt, 32 decode steps), and continue DEMO_PROMPT with each."""
    from .exporters.pipeline import export_model
    from .runtime.bench import BenchConfig, Contestant
    from .runtime.bench_report import run_bench
    from .runtime.generation import GenerationConfig
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
