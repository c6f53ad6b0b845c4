"""The `mcsmoe` command line: argument parsing only; every subcommand calls the public API."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    from .compress.recipe import CompressionRecipe

    defaults = CompressionRecipe()
    group = parser.add_argument_group("merging (M-SMoE)")
    group.add_argument("--experts", type=int, default=None, metavar="G",
                       help="merged experts per MoE layer (default: half of the model's experts)")
    group.add_argument("--adaptive", action="store_true",
                       help="spread G x layers groups over layers by one global routing-frequency threshold")
    group.add_argument("--similarity", choices=("router-logits", "router-weights"), default=defaults.similarity,
                       help="how experts join a dominant expert: cosine of router-logit columns on calibration "
                            "text (default) or of router weight rows")
    group.add_argument("--no-permute", action="store_true", help="merge without neuron permutation alignment")
    group = parser.add_argument_group("compression (MC-SMoE)")
    group.add_argument("--rank-ratio", type=float, default=defaults.rank_ratio, metavar="R",
                       help="share of each merged projection's parameters kept in its low-rank factors, in (0, 1]; "
                            f"1 means merge only (default: {defaults.rank_ratio})")
    group.add_argument("--rank-energy", type=float, default=None, metavar="E",
                       help="instead of --rank-ratio: per layer, the smallest rank keeping this share of the "
                            "squared singular values")
    group.add_argument("--sparse-keep", type=float, default=defaults.sparse_keep, metavar="S",
                       help="share of rows of the low-rank residual kept as structured-sparse rows, in [0, 1] "
                            f"(default: {defaults.sparse_keep})")
    group.add_argument("--activation-aware", action="store_true",
                       help="fit each merged projection's factors to the calibration inputs it sees, minimising "
                            "the error of its outputs rather than of its weights (beyond the paper)")
    group = parser.add_argument_group("calibration and recovery")
    group.add_argument("--calib", default=None, metavar="FILE",
                       help="calibration text: a .txt file, or .jsonl with a 'text' field per line "
                            "(default: the built-in corpus of Python documentation)")
    group.add_argument("--max-calib-tokens", type=int, default=defaults.max_calib_tokens, metavar="N",
                       help=f"calibration tokens to use (default: {defaults.max_calib_tokens})")
    group.add_argument("--distill-steps", type=int, default=0, metavar="N",
                       help="knowledge-distillation steps from the original model after compression (default: 0)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: 0)")


def _recipe_from(args: argparse.Namespace):
    from .compress.recipe import CompressionRecipe

    return CompressionRecipe(
        experts=args.experts,
        adaptive=args.adaptive,
        similarity=args.similarity,
        permute=not args.no_permute,
        rank_ratio=args.rank_ratio,
        rank_energy=args.rank_energy,
        sparse_keep=args.sparse_keep,
        activation_aware=args.activation_aware,
        calib=args.calib,
        max_calib_tokens=args.max_calib_tokens,
        distill_steps=args.distill_steps,
        seed=args.seed,
    )


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress.pipeline import compress_model
    from .summary import format_compression

    result = compress_model(
        args.model_dir, args.out_dir, _recipe_from(args), device=args.device, force=args.force,
        progress=not args.quiet,
    )
    print(format_compression(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .summary import format_demo

    _quiet_torch_onnx()
    result = run_demo(
        model_dir=args.model, experts=args.experts, rank_ratio=args.rank_ratio, sparse_keep=args.sparse_keep,
        distill_steps=args.distill_steps, activation_aware=args.activation_aware, out_dir=args.out,
        force=args.force, progress=not args.quiet, serve=not args.no_serve,
    )
    print(format_demo(result))
    return 0


def _quiet_torch_onnx() -> None:
    import logging
    import warnings

    # torch.onnx explains its dynamic-shape renaming in UserWarnings, and lists the torchvision
    # ops it skips, in terms that say nothing to a user of these commands
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    warnings.filterwarnings("ignore", message=r".*treespec", category=FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _cmd_export(args: argparse.Namespace) -> int:
    from .exporters.pipeline import export_model
    from .summary import format_export

    _quiet_torch_onnx()
    report = export_model(
        args.model_dir, args.out, with_past=not args.no_past, target=args.target, validate=not args.no_validate,
        inline=args.inline, external_data=True if args.external_data else None, force=args.force,
        progress=not args.quiet,
    )
    print(format_export(report))
    return 0


def _add_export_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="export a dense or compressed MoE checkpoint to ONNX (also: mcsmoe-export)",
        description="Export a Hugging Face MoE checkpoint, dense or compressed by `mcsmoe compress`, to ONNX. "
                    "Each MoE block becomes one ai.mcsmoe::GroupedLowRankMoE node whose semantics ship in the "
                    "file as an ONNX function (docs/ops.md), so onnxruntime runs it as it is; everything else is "
                    "traced from the transformers model. By default one graph serves prefill and decode "
                    "(inputs input_ids, attention_mask, position_ids, past_key_values.N.key/value; outputs "
                    "logits, present.N.key/value). The file passes onnx.checker's full check and its logits are "
                    "compared with the torch reference in onnxruntime. Families: mixtral, qwen2_moe, qwen3_moe, "
                    "olmoe.",
    )
    export.add_argument("model_dir", help="checkpoint directory (a Hugging Face MoE model, or from mcsmoe compress)")
    export.add_argument("out", help="ONNX file to write, e.g. model.onnx")
    export.add_argument("--no-past", action="store_true", help="a plain logits graph without KV cache")
    export.add_argument("--target", choices=("mcsmoe", "ort-fused"), default="mcsmoe",
                        help="mcsmoe: the GroupedLowRankMoE op (default); ort-fused: dense SwiGLU experts as "
                             "onnxruntime's com.microsoft.MoE, a baseline for comparison (dense checkpoints only)")
    export.add_argument("--inline", action="store_true",
                        help="also write OUT.inlined.onnx with every function inlined (standard ops only), "
                             "for runtimes that reject custom domains")
    export.add_argument("--external-data", action="store_true",
                        help="store the weights in OUT.onnx.data (automatic beyond about 1.8 GB)")
    export.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    export.add_argument("--force", action="store_true", help="replace the output if it exists")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=_cmd_export)


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime.generation import GenerationConfig
    from .runtime.text import generate_text
    from .summary import format_generation

    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    options = {"threads": args.threads}
    if args.backend == "ort":
        options["provider"] = args.provider
    text = generate_text(args.model, args.prompt, args.backend, config, args.tokenizer, **options)
    print(format_generation(text))
    return 0


def _add_run_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        help="generate text with an exported graph or a checkpoint",
        description="Generate a continuation of each prompt. MODEL is an ONNX file from `mcsmoe export` (backends "
                    "ort, trt) or a checkpoint directory, dense or compressed (backend torch). The tokenizer comes "
                    "from the checkpoint the graph was exported from, or --tokenizer.",
    )
    run.add_argument("model", help="ONNX file (KV-cache graph) or checkpoint directory")
    run.add_argument("--prompt", action="append", required=True,
                     help="text to continue; repeat for a batch (left-padded)")
    run.add_argument("--backend", choices=("ort", "trt", "torch"), default="ort",
                     help="ort: onnxruntime (default); trt: TensorRT (unverified); torch: eager PyTorch")
    run.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="default: 32")
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); > 0 samples")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    run.add_argument("--tokenizer", default=None, metavar="DIR", help="directory with the tokenizer files")
    run.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                     help="onnxruntime provider (default: CUDA when present, else CPU)")
    run.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    run.set_defaults(run=_cmd_run)


def _contestants(models: list[str], backends: list[str] | None, provider: str | None):
    from pathlib import Path

    from .runtime.bench import Contestant

    contestants = []
    for model in models:
        kinds = ("torch",) if Path(model).is_dir() else ("ort", "trt")
        chosen = [b for b in (backends or kinds[:1]) if b in kinds]
        if not chosen:
            raise UserError(f"{model}: none of the backends {', '.join(backends)} runs a "
                            f"{'checkpoint directory' if kinds == ('torch',) else 'graph file'}")
        for backend in chosen:
            options = {"provider": provider} if backend == "ort" and provider else {}
            contestants.append(Contestant(model, backend, options=options))
    return contestants


def _cmd_bench(args: argparse.Namespace) -> int:
    from .runtime.bench import BenchConfig
    from .runtime.bench_report import run_bench
    from .summary import format_bench

    config = BenchConfig(batch=args.batch, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                         warmup=args.warmup, iterations=args.iterations, threads=args.threads, seed=args.seed)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"parent folder of {args.json} does not exist")
    report = run_bench(_contestants(args.models, args.backend, args.provider), config, progress=not args.quiet)
    print(format_bench(report))
    if args.json:
        report.save(args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .runtime.bench_report import BenchReport
    from .runtime.compare import compare_reports, parse_threshold
    from .summary import format_comparison

    reports = []
    for path in (args.base, args.new):
        try:
            reports.append(BenchReport.load(path))
        except FileNotFoundError:
            raise UserError(f"no such file: {path}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path} is not a report from `mcsmoe bench --json`: {exc}") from None
    comparison = compare_reports(*reports, parse_threshold(args.max_regression), ratios_only=args.ratios_only)
    print(format_comparison(comparison))
    return 1 if comparison.failed else 0


def _add_bench_parsers(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure latency, throughput and memory of models on backends",
        description="Time prefill and per-token decode of each model on each backend, all in one run (each "
                    "contestant in its own process, so peak RSS is its own), and report ratios to the first. "
                    "Graph files run on ort (or trt), checkpoint directories on torch. The decode floor is "
                    "active weight bytes per token / memory bandwidth measured in the same run.",
    )
    bench.add_argument("models", nargs="+", help="ONNX files (KV-cache graphs) and/or checkpoint directories")
    bench.add_argument("--backend", nargs="+", choices=("ort", "trt", "torch"), default=None,
                       help="backends to run each model on (default: ort for graphs, torch for directories)")
    bench.add_argument("--batch", type=int, default=1, help="default: 1")
    bench.add_argument("--prompt-len", type=int, default=128, metavar="N", help="prefill tokens (default: 128)")
    bench.add_argument("--decode-tokens", type=int, default=32, metavar="N", help="decode steps (default: 32)")
    bench.add_argument("--warmup", type=int, default=1, help="unrecorded iterations first (default: 1)")
    bench.add_argument("--iterations", type=int, default=5, help="recorded iterations (default: 5)")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads for every backend")
    bench.add_argument("--provider", choices=("auto", "cpu", "cuda"), default=None, help="onnxruntime provider")
    bench.add_argument("--seed", type=int, default=0, help="prompt token seed (default: 0)")
    bench.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON (schema "
                       "mcsmoe-bench/1, see mcsmoe_deploy/runtime/bench_report.py)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(run=_cmd_bench)

    compare = sub.add_parser(
        "compare",
        help="compare two bench reports; exit 1 on a regression",
        description="Compare every metric of two `mcsmoe bench --json` reports, absolute and as in-run ratios "
                    "to each run's first model, and exit 1 when any is worse than --max-regression. Absolute "
                    "times move between machines and runs; --ratios-only gates on in-run ratios alone (CI).",
    )
    compare.add_argument("base", help="the reference report (JSON)")
    compare.add_argument("new", help="the report to check (JSON)")
    compare.add_argument("--max-regression", default="10%", help="allowed worsening, e.g. 10%% or 0.1 (default: 10%%)")
    compare.add_argument("--ratios-only", action="store_true", help="check in-run ratios only, not absolute values")
    compare.set_defaults(run=_cmd_compare)


def _cmd_triton(args: argparse.Namespace) -> int:
    from .runtime.triton import write_triton_repository

    repository = write_triton_repository(
        args.model, args.repo_dir, name=args.name, max_batch_size=args.max_batch_size, backend=args.backend,
        engine_path=args.engine, force=args.force,
    )
    print(repository.summary())
    return 0


def _add_triton_parser(sub) -> None:
    triton = sub.add_parser(
        "triton",
        help="write a Triton Inference Server model repository for an exported graph",
        description="Lay out REPO_DIR/NAME/config.pbtxt and REPO_DIR/NAME/1/model.onnx (model.plan for the "
                    "tensorrt backend) with dynamic batching and every input's dims, so Triton serves the graph "
                    "on many machines. The KV-cache graph is served stateless: the client sends the cache with "
                    "each request and receives the grown cache back (see mcsmoe_deploy/runtime/triton.py).",
    )
    triton.add_argument("model", help="ONNX file from mcsmoe export")
    triton.add_argument("repo_dir", help="model repository folder (created if missing)")
    triton.add_argument("--name", default=None, help="model name in the repository (default: the file's stem)")
    triton.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                        help="Triton's max_batch_size; 0 disables batching (default: 8)")
    triton.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                        help="Triton backend (default: onnxruntime); tensorrt needs --engine")
    triton.add_argument("--engine", default=None, metavar="PLAN", help="TensorRT engine for --backend tensorrt")
    triton.add_argument("--force", action="store_true", help="replace the model folder if it exists")
    triton.set_defaults(run=_cmd_triton)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcsmoe",
        description="Merge, then compress sparse mixture-of-experts models (MC-SMoE, arXiv 2310.01334).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compress = sub.add_parser(
        "compress",
        help="merge and compress a Hugging Face MoE checkpoint",
        description="Group each layer's experts by routing statistics on calibration text, align and merge each "
                    "group into one expert, then store merged projections as low-rank factors plus sparse rows. "
                    "Writes an ordinary Hugging Face directory holding G experts per layer; "
                    "load it with mcsmoe_deploy.load_compressed. Families: mixtral, qwen2_moe, qwen3_moe, olmoe, "
                    "switch_transformers.",
    )
    compress.add_argument("model_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
    compress.add_argument("out_dir", help="directory to write the compressed checkpoint to")
    _add_recipe_arguments(compress)
    compress.add_argument("--device", default=None,
                          help="cpu, cuda, cuda:N, or auto (spread a model larger than one device over devices) "
                               "(default: the GPU when there is one, else cpu)")
    compress.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    compress.set_defaults(run=_cmd_compress)

    _add_export_parser(sub)
    _add_run_parser(sub)
    _add_bench_parsers(sub)
    _add_triton_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="compress the embedded model and compare quality and size",
        description="Compress the small trained Mixtral-family model that ships in the package (8 experts, top-2) "
                    "and print parameters, bytes and held-out perplexity of the dense, merged and compressed models; "
                    "then export the dense and the compressed model to ONNX, serve both with onnxruntime, and "
                    "print their latency, memory and a short generated text.",
    )
    demo.add_argument("--model", default=None, help="a different causal-LM MoE checkpoint directory to demonstrate on")
    demo.add_argument("--experts", type=int, default=4, metavar="G", help="merged experts per layer (default: 4)")
    demo.add_argument("--rank-ratio", type=float, default=0.5, metavar="R", help="low-rank share (default: 0.5)")
    demo.add_argument("--sparse-keep", type=float, default=0.05, metavar="S", help="sparse rows share (default: 0.05)")
    demo.add_argument("--distill-steps", type=int, default=100, metavar="N",
                      help="distillation steps after compression, shown as a fourth row; 0 to skip (default: 100)")
    demo.add_argument("--activation-aware", action="store_true",
                      help="fit the low-rank factors to calibration activations (beyond the paper)")
    demo.add_argument("--out", default=None, metavar="DIR", help="also write the compressed checkpoint here")
    demo.add_argument("--no-serve", action="store_true",
                      help="skip exporting both models to ONNX and serving them with onnxruntime")
    demo.add_argument("--force", action="store_true", help="replace --out if it exists")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        return args.run(args)
    except UserError as exc:
        print(f"mcsmoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mcsmoe: interrupted", file=sys.stderr)
        return 130


def main_export(argv: list[str] | None = None) -> int:
    """`mcsmoe-export ...`, the same as `mcsmoe export ...`."""
    return main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
