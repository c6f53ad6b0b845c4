"""`mcsmoe compress` and `mcsmoe demo`: argument parsing only; both call the public API."""

from __future__ import annotations

import argparse

from .export import QUANTIZE_SCOPE_HELP, add_quant_symmetry, quiet_torch_onnx

# recipe field -> its flag, so that an error in the field's own terms names the flag the user typed
RECIPE_FLAGS = {
    "experts": "--experts",
    "adaptive": "--adaptive",
    "similarity": "--similarity",
    "grouping": "--grouping",
    "weighting": "--weighting",
    "permute": "--no-permute",
    "rank_ratio": "--rank-ratio",
    "rank_energy": "--rank-energy",
    "sparse_keep": "--sparse-keep",
    "low_rank": "--low-rank",
    "low_rank_basis": "--low-rank-basis",
    "output_refit": "--output-refit",
    "refit_ridge": "--refit-ridge",
    "refit_tokens": "--refit-tokens",
    "calib": "--calib",
    "max_calib_tokens": "--max-calib-tokens",
    "distill_steps": "--distill-steps",
    "distill_lr": "--distill-lr",
    "quantize": "--quantize",
    "quant_block": "--quant-block",
    "quant_symmetric": "--quant-asymmetric",
    "quant_scope": "--quantize-scope",
    "quant_method": "--quant-method",
    "calibrate_router": "--calibrate-router",
    "router_steps": "--router-steps",
    "router_lr": "--router-lr",
    "output_format": "--format",
    "seed": "--seed",
}

# the demo sets these recipe fields from its own flags (the rest are the recipe's defaults)
DEMO_FLAGS = {
    **{field: RECIPE_FLAGS[field] for field in ("experts", "rank_ratio", "sparse_keep", "distill_steps", "quantize",
                                                "quant_block")},
    "low_rank": "--activation-aware",
}


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    from ..compress import GROUPINGS, LOW_RANK_KINDS, SIMILARITIES, WEIGHTINGS
    from ..compress.shared_basis import LOW_RANK_BASES
    from ..compress.recipe import (
        BASE_DELTA_DISTILL_LR, COMPRESSED_DISTILL_LR, FORMATS, MERGED_DISTILL_LR, QUANT_METHODS, QUANT_SCOPES,
        QUANTIZATIONS, ROUTER_LR, ROUTER_STEPS, CompressionRecipe,
    )

    defaults = CompressionRecipe()
    group = parser.add_argument_group("merging (M-SMoE)")
    group.add_argument("--experts", type=int, default=None, metavar="G",
                       help="merged experts per MoE layer (default: half of the model's experts)")
    group.add_argument("--adaptive", action="store_true",
                       help="spread G x layers groups over layers by one global routing-frequency threshold")
    group.add_argument("--similarity", choices=SIMILARITIES.names(), default=defaults.similarity,
                       help="how experts join a dominant expert: cosine of router-logit columns on calibration "
                            f"text or of router weight rows (default: {defaults.similarity})")
    group.add_argument("--grouping", choices=GROUPINGS.names(), default=defaults.grouping,
                       help="how each layer's E experts become G: similarity (M-SMoE: the G most used lead, the "
                            "others join the most similar by --similarity); hc (HC-SMoE: average-linkage hierarchical "
                            "clustering of the experts' mean outputs on the calibration tokens, cosine, each cluster "
                            "aligned to and led by its most used expert); reap (REAP: keep the G experts of highest "
                            "mean routing weight x output norm over their routed tokens, remove the rest, exactly); "
                            "the baselines random, and drop (keep the G most used). Removed experts lose their "
                            "router rows (default: %(default)s)")
    group.add_argument("--weighting", choices=WEIGHTINGS.names(), default=defaults.weighting,
                       help="how a group's members are averaged (default: %(default)s, by routing frequency)")
    group.add_argument("--no-permute", action="store_true", help="merge without neuron permutation alignment")
    group.add_argument("--output-refit", action="store_true",
                       help="after merging or pruning, refit each layer's G output projections (down) in closed "
                            "form, by ridge least squares on the calibration tokens, so that the compressed block "
                            "reproduces the dense block's output as the compressed model routes them; router and "
                            "gate/up stay, the checkpoint format is the same. No training; on the trained test LMs "
                            "it lowered held-out perplexity for every grouping (beyond the paper)")
    group.add_argument("--refit-ridge", type=float, default=None, metavar="L",
                       help="the refit's ridge, relative to the mean diagonal of its Gram matrix, pulling towards "
                            f"the merged weights (default: {defaults.refit_ridge:g}; needs --output-refit)")
    group.add_argument("--refit-tokens", type=int, default=None, metavar="N",
                       help="calibration tokens per layer the refit fits to; their block inputs are held in memory "
                            f"(default: {defaults.refit_tokens}; needs --output-refit)")
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
    group.add_argument("--low-rank", choices=LOW_RANK_KINDS.names(), default=defaults.low_rank,
                       help="how low-rank factors are fitted: svd of the weights (the paper), or activation-aware "
                            "(default: %(default)s)")
    group.add_argument("--activation-aware", dest="low_rank", action="store_const", const="activation-aware",
                       help="the same as --low-rank activation-aware: fit each merged projection's factors to the "
                            "calibration inputs it sees, minimising the error of its outputs rather than of its "
                            "weights (beyond the paper)")
    group.add_argument("--low-rank-basis", choices=LOW_RANK_BASES, default=defaults.low_rank_basis,
                       help="per-expert: each merged expert's own factors (the paper); shared: per layer and "
                            "projection one basis on the hidden-size side for all merged experts plus each expert's "
                            "coefficients (D2-MoE / Sub-MoE style; whitened with --low-rank activation-aware), at "
                            "the rank that stores as many numbers as per-expert factors at --rank-ratio; base-delta: "
                            "per layer and projection one full-rank base (the experts' frequency-weighted mean) plus "
                            "each expert's low-rank delta, at equal bytes too (needs --rank-ratio above 1/G). "
                            "Float only: "
                            "not with --quantize or --rank-energy (default: %(default)s)")
    group = parser.add_argument_group("quantization (after merging, low rank and recovery)")
    group.add_argument("--quantize", choices=tuple(QUANTIZATIONS), default=None,
                       help="store every merged expert's factors (dense weights, or low-rank left and right) and, by "
                            "--quantize-scope, the other linear layers as blockwise int4 or int8 codes with a scale "
                            "per block, rounded to nearest; low-rank ranks are rounded to a multiple of the block "
                            "(default: no quantization)")
    group.add_argument("--quant-block", type=int, default=defaults.quant_block, metavar="N",
                       help="values per quantization block along each factor's input dimension; must divide the "
                            "input size of every quantized weight (default: %(default)s)")
    add_quant_symmetry(group, defaults.quant_symmetric)
    group.add_argument("--quantize-scope", choices=QUANT_SCOPES, default=defaults.quant_scope,
                       help=QUANTIZE_SCOPE_HELP)
    group.add_argument("--quant-method", choices=QUANT_METHODS, default=defaults.quant_method,
                       help="how codes are chosen, in one stored format: rtn rounds each weight to nearest; "
                            "gptq quantizes input channels in order and feeds each one's rounding error into the "
                            "ones left, fitted to the calibration tokens each merged expert sees, layer by layer "
                            "(GPTQ; a partial forward per MoE layer on the first 4096 calibration tokens), and with "
                            "--quantize-scope all the other linear layers fitted to the inputs they see (one more "
                            "forward). On the embedded model (int4, blocks of 16, every layer, asymmetric) gptq "
                            "gives held-out perplexity 19.16 against 19.31, for a quantization step about 5x longer, "
                            "so rtn stays the default (default: %(default)s)")
    group = parser.add_argument_group("calibration and recovery")
    group.add_argument("--calib", default=None, metavar="FILE",
                       help="calibration text: a .txt file, or .jsonl with a 'text' field per line "
                            "(default: the built-in corpus of Python documentation)")
    group.add_argument("--max-calib-tokens", type=int, default=defaults.max_calib_tokens, metavar="N",
                       help=f"calibration tokens to use (default: {defaults.max_calib_tokens})")
    group.add_argument("--distill-steps", type=int, default=0, metavar="N",
                       help="knowledge-distillation steps from the original model after compression (default: 0)")
    group.add_argument("--distill-lr", type=float, default=None, metavar="LR",
                       help="peak learning rate of distillation, decaying linearly to 0 (default: "
                            f"{MERGED_DISTILL_LR:g} for a merge-only recipe, which a higher rate undoes; "
                            f"{COMPRESSED_DISTILL_LR:g} with low rank, which recovers more with it; "
                            f"{BASE_DELTA_DISTILL_LR:g} with --low-rank-basis base-delta, which starts close)")
    group.add_argument("--calibrate-router", action="store_true",
                       help="after compression (and distillation), train the routers alone on the calibration text "
                            "to match the dense model's next-token distribution (KL); expert weights stay bit for bit")
    group.add_argument("--router-steps", type=int, default=None, metavar="N",
                       help=f"router calibration steps of 8 blocks (default: {ROUTER_STEPS}; needs --calibrate-router)")
    group.add_argument("--router-lr", type=float, default=None, metavar="LR",
                       help=f"peak rate of router calibration, decaying linearly to 0 (default: {ROUTER_LR:g}; "
                            "needs --calibrate-router)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: 0)")
    group = parser.add_argument_group("output")
    group.add_argument("--format", choices=FORMATS, default=defaults.output_format, dest="output_format",
                       help="mcsmoe: our checkpoint (load_compressed; exported with the GroupedLowRankMoE op). "
                            "standard: a plain checkpoint of the source family with G experts and a G-row router, "
                            "loadable by transformers.AutoModelForCausalLM alone and exported as a dense model. "
                            "Pruning (reap, drop) is the same function in both; merging is not: the standard router "
                            "keeps each group's dominant expert's row and picks top-k among G, where ours scores E "
                            "experts and maps them to groups, so add --calibrate-router. Merge only: no low rank, "
                            "no quantization, no --adaptive (default: %(default)s)")


def _recipe_from(args: argparse.Namespace):
    from ..compress import CompressionRecipe
    from ..errors import UserError

    router = {"router_steps": args.router_steps, "router_lr": args.router_lr}
    for field, value in router.items():
        if value is not None and not args.calibrate_router:
            raise UserError(f"{RECIPE_FLAGS[field]} needs --calibrate-router")
    refit = {"refit_ridge": args.refit_ridge, "refit_tokens": args.refit_tokens}
    for field, value in refit.items():
        if value is not None and not args.output_refit:
            raise UserError(f"{RECIPE_FLAGS[field]} needs --output-refit")
    return CompressionRecipe(
        calibrate_router=args.calibrate_router,
        **{field: value for field, value in router.items() if value is not None},
        output_format=args.output_format,
        experts=args.experts,
        adaptive=args.adaptive,
        similarity=args.similarity,
        grouping=args.grouping,
        weighting=args.weighting,
        permute=not args.no_permute,
        output_refit=args.output_refit,
        **{field: value for field, value in refit.items() if value is not None},
        rank_ratio=args.rank_ratio,
        rank_energy=args.rank_energy,
        sparse_keep=args.sparse_keep,
        low_rank=args.low_rank,
        low_rank_basis=args.low_rank_basis,
        calib=args.calib,
        max_calib_tokens=args.max_calib_tokens,
        distill_steps=args.distill_steps,
        distill_lr=args.distill_lr,
        quantize=args.quantize,
        quant_block=args.quant_block,
        quant_symmetric=args.quant_symmetric,
        quant_scope=args.quantize_scope,
        quant_method=args.quant_method,
        seed=args.seed,
    )


def _cmd_compress(args: argparse.Namespace) -> int:
    from ..compress import compress_model
    from ..summary import format_compression

    result = compress_model(
        args.model_dir, args.out_dir, _recipe_from(args), device=args.device, force=args.force,
        progress=not args.quiet,
    )
    print(format_compression(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from ..summary import format_demo

    quiet_torch_onnx()
    result = run_demo(
        model_dir=args.model, experts=args.experts, rank_ratio=args.rank_ratio, sparse_keep=args.sparse_keep,
        distill_steps=args.distill_steps, activation_aware=args.activation_aware,
        quantize=None if args.quantize == "none" else args.quantize, quant_block=args.quant_block, out_dir=args.out,
        force=args.force, progress=not args.quiet, serve=not args.no_serve,
    )
    print(format_demo(result))
    return 0


def add_parsers(sub) -> None:
    compress = sub.add_parser(
        "compress",
        help="merge and compress a Hugging Face MoE checkpoint",
        description="Group each layer's experts by routing statistics on calibration text, align and merge each "
                    "group into one expert, then store merged projections as low-rank factors plus sparse rows. "
                    "Writes an ordinary Hugging Face directory holding G experts per layer; "
                    "load it with mcsmoe_deploy.load_compressed, or with --format standard a plain checkpoint of the "
                    "source family that transformers loads alone. Families: mixtral, qwen2_moe, qwen3_moe, olmoe, "
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
    compress.set_defaults(run=_cmd_compress, parameter_flags=RECIPE_FLAGS)

    demo = sub.add_parser(
        "demo",
        help="compress the embedded model and compare quality and size",
        description="Compress the small trained Mixtral-family model that ships in the package (8 experts, top-2) "
                    "and print parameters, bytes and held-out perplexity of the dense, merged, merged and quantized, "
                    "and compressed models; then export the dense, the quantized and the compressed model to ONNX, "
                    "serve them with onnxruntime, and print their latency, memory and a short generated text.",
    )
    demo.add_argument("--model", default=None, help="a different causal-LM MoE checkpoint directory to demonstrate on")
    demo.add_argument("--experts", type=int, default=4, metavar="G", help="merged experts per layer (default: 4)")
    demo.add_argument("--rank-ratio", type=float, default=0.5, metavar="R", help="low-rank share (default: 0.5)")
    demo.add_argument("--sparse-keep", type=float, default=0.05, metavar="S", help="sparse rows share (default: 0.05)")
    demo.add_argument("--distill-steps", type=int, default=100, metavar="N",
                      help="distillation steps after compression, shown as a row of its own; 0 to skip (default: 100)")
    demo.add_argument("--activation-aware", action="store_true",
                      help="fit the low-rank factors to calibration activations (beyond the paper)")
    demo.add_argument("--quantize", choices=("int4", "int8", "none"), default="int4",
                      help="also the merged model with every linear layer and the input embeddings quantized, "
                           "a row of its own; none to skip (default: int4)")
    demo.add_argument("--quant-block", type=int, default=16, metavar="N",
                      help="values per quantization block, a power of two >= 16 dividing every layer's input size "
                           "(default: 16, which divides the embedded model's expert size 144)")
    demo.add_argument("--out", default=None, metavar="DIR", help="also write the compressed checkpoint here")
    demo.add_argument("--no-serve", action="store_true",
                      help="skip exporting the models to ONNX and serving them with onnxruntime")
    demo.add_argument("--force", action="store_true", help="replace --out if it exists")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_cmd_demo, parameter_flags=DEMO_FLAGS)
