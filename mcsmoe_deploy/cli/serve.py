"""`mcsmoe run`, `bench`, `compare` and `triton`: argument parsing only; each calls the runtime API."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..contract import DECODER_FILE, ENCODER_FILE, read_graph
from ..errors import UserError
from ..files import check_output


def _cmd_run(args: argparse.Namespace) -> int:
    from ..runtime.generation import GenerationConfig
    from ..runtime.text import generate_text
    from ..summary import format_generation

    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.save_optimized:
        check_output(args.save_optimized, force=True, inputs=[args.model], kind="file")
    options = {} if args.backend == "trt" else {"threads": args.threads}  # a TensorRT engine runs on the GPU
    if args.backend == "ort":
        options.update(provider=args.provider, opt_level=args.opt_level, optimized_model_path=args.save_optimized)
    text = generate_text(args.model, args.prompt, args.backend, config, args.tokenizer, **options)
    print(format_generation(text))
    return 0


def _add_run_parser(sub) -> None:
    from ..runtime.ort_session import OPT_LEVELS
    from ..runtime.session import BACKENDS

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
    run.add_argument("--backend", choices=BACKENDS, default="ort",
                     help="ort: onnxruntime (default); trt: TensorRT (unverified); torch: eager PyTorch")
    run.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="default: 32")
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); > 0 samples")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    run.add_argument("--tokenizer", default=None, metavar="DIR", help="directory with the tokenizer files")
    run.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                     help="onnxruntime provider (default: CUDA when present, else CPU)")
    run.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    run.add_argument("--opt-level", choices=tuple(OPT_LEVELS), default="all",
                     help="onnxruntime graph optimisation level (default: all)")
    run.add_argument("--save-optimized", default=None, metavar="FILE",
                     help="also save the graph as onnxruntime optimised it (onnxruntime only)")
    run.set_defaults(run=_cmd_run)


def _contestants(models: list[str], backends: list[str] | None, provider: str | None):
    from ..runtime.bench import Contestant

    from ..runtime.session import is_seq2seq_export

    contestants = []
    for model in models:
        # an encoder-decoder export folder runs on onnxruntime, like a graph file
        kinds = ("ort",) if is_seq2seq_export(model) else ("torch",) if Path(model).is_dir() else ("ort", "trt")
        chosen = [b for b in (backends or kinds[:1]) if b in kinds]
        if not chosen:
            kind = {("ort",): "encoder-decoder export folder", ("torch",): "checkpoint directory"}.get(kinds, "graph file")
            raise UserError(f"{model}: none of the backends {', '.join(backends)} runs a {kind}")
        if kinds != ("torch",):  # a graph that is unreadable or reads outside its folder: told before any timing
            for graph in ((Path(model) / ENCODER_FILE, Path(model) / DECODER_FILE) if kinds == ("ort",) else (model,)):
                read_graph(graph)
        for backend in chosen:
            options = {"provider": provider} if backend == "ort" and provider else {}
            contestants.append(Contestant(model, backend, options=options))
    return contestants


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..runtime.bench import BenchConfig
    from ..runtime.bench_report import run_bench
    from ..summary import format_bench

    config = BenchConfig(batch=args.batch, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                         warmup=args.warmup, iterations=args.iterations, threads=args.threads, seed=args.seed)
    if args.json:  # checked before the long run: never a model being measured, never a folder or a link
        check_output(args.json, force=True, inputs=args.models, kind="file")
    report = run_bench(_contestants(args.models, args.backend, args.provider), config, progress=not args.quiet)
    print(format_bench(report))
    if args.json:
        report.save(args.json, inputs=args.models)
        print(f"wrote {args.json}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..runtime.bench_report import BenchReport
    from ..runtime.compare import compare_reports, parse_threshold
    from ..summary import format_comparison

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
    from ..runtime.session import BACKENDS

    bench = sub.add_parser(
        "bench",
        help="measure latency, throughput and memory of models on backends",
        description="Time prefill and per-token decode of each model on each backend, all in one run (each "
                    "contestant in its own process, so peak RSS is its own), and report ratios to the first. "
                    "Graph files run on ort (or trt), checkpoint directories on torch. The decode floor is "
                    "active weight bytes per token / memory bandwidth measured in the same run.",
    )
    bench.add_argument("models", nargs="+", help="ONNX files (KV-cache graphs) and/or checkpoint directories")
    bench.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
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
    from ..runtime.triton import write_triton_repository

    repository = write_triton_repository(
        args.model, args.repo_dir, name=args.name, max_batch_size=args.max_batch_size, backend=args.backend,
        engine_path=args.engine, force=args.force,
    )
    print(repository.summary())
    return 0


def _add_triton_parser(sub) -> None:
    from ..runtime.triton import BACKENDS as TRITON_BACKENDS

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
    triton.add_argument("--backend", choices=TRITON_BACKENDS, default="onnxruntime",
                        help="Triton backend (default: onnxruntime); tensorrt needs --engine")
    triton.add_argument("--engine", default=None, metavar="PLAN", help="TensorRT engine for --backend tensorrt")
    triton.add_argument("--force", action="store_true", help="replace the model folder if it exists")
    triton.set_defaults(run=_cmd_triton)


def add_parsers(sub) -> None:
    _add_run_parser(sub)
    _add_bench_parsers(sub)
    _add_triton_parser(sub)
