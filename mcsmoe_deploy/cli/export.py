"""`mcsmoe export` (also `mcsmoe-export`): argument parsing only; calls `export_model`."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..exporters.export_config import TARGET_HELP, TARGETS, ExportConfig


# ExportConfig field -> its flag, so that an error in the field's own terms names the flag the user typed
EXPORT_FLAGS = {"quantize": "--quantize", "quant_block": "--quant-block", "quant_scope": "--quantize-scope",
                "accuracy_level": "--accuracy-level", "expert_accuracy_level": "--expert-accuracy-level"}
QUANTIZE_SCOPE_HELP = (
    "what --quantize covers: 'all' (default) quantizes every linear layer of a decoder-only model but its routers: "
    "experts, attention q/k/v/o (biases stay float), a shared expert and its gate, and the LM head (the input "
    "embeddings stay float, untied from a tied LM head), which is what makes decoding fast; 'all+embeddings' "
    "also quantizes the input embedding table (one set of codes with a tied LM head; rows are dequantized as "
    "they are looked up), which is what makes a small-vocabulary model small; 'experts' quantizes the experts "
    "only. Switch Transformers always quantizes its experts only")

QUANT_SYMMETRY_HELP = (
    "the default: a zero point per block as well as a scale, the block's range [min, max] mapped "
    "onto every code; on the embedded model (int4, blocks of 16, every layer) held-out perplexity 19.31 against "
    "19.85 symmetric, dense fp32 18.90, for 4 more bits per block")


def add_quant_symmetry(group, default: bool) -> None:
    """--quant-symmetric / --quant-asymmetric, one dest (quant_symmetric), `default` when neither is given."""
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--quant-asymmetric", dest="quant_symmetric", action="store_false", default=default,
                        help=QUANT_SYMMETRY_HELP)
    choice.add_argument("--quant-symmetric", dest="quant_symmetric", action="store_true",
                        help="symmetric codes, no zero points, as onnxruntime-genai's builder stores int4 "
                             "(see --quant-asymmetric)")


def quiet_torch_onnx() -> None:
    import logging
    import warnings

    # torch.onnx explains its dynamic-shape renaming in UserWarnings, and lists the torchvision
    # ops it skips, in terms that say nothing to a user of these commands
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    warnings.filterwarnings("ignore", message=r".*treespec", category=FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _cmd_export(args: argparse.Namespace) -> int:
    from ..exporters.pipeline import export_model
    from ..summary import format_export

    if (args.out is None) == (args.genai is None):
        raise UserError("give the ONNX file to write (OUT) or an onnxruntime-genai folder (--genai DIR), one of them")
    quiet_torch_onnx()
    config = ExportConfig(
        target=args.target, with_past=not args.no_past, validate=not args.no_validate, inline=args.inline,
        external_data=args.external_data, force=args.force, progress=not args.quiet,
        genai=args.genai is not None, dtype=args.dtype,
        quantize=args.quantize, quant_block=args.quant_block, quant_symmetric=args.quant_symmetric,
        quant_scope=args.quantize_scope, accuracy_level=args.accuracy_level,
        expert_accuracy_level=args.expert_accuracy_level,
    )
    report = export_model(args.model_dir, args.out or args.genai, config)
    print(format_export(report))
    return 0


def add_parsers(sub) -> None:
    export = sub.add_parser(
        "export",
        help="export a dense or compressed MoE checkpoint to ONNX (also: mcsmoe-export)",
        description="Export a Hugging Face MoE checkpoint, dense or compressed by `mcsmoe compress`, to ONNX. "
                    "Each MoE block becomes one ai.mcsmoe::GroupedLowRankMoE node whose semantics ship in the "
                    "file as an ONNX function (docs/ops.md), so onnxruntime runs it as it is; everything else is "
                    "traced from the transformers model, attention and RMSNorms as onnxruntime's fused ops unless "
                    "--target portable. By default one graph serves prefill and decode "
                    "(inputs input_ids, attention_mask, position_ids, past_key_values.N.key/value; outputs "
                    "logits, present.N.key/value). The file passes onnx.checker's full check and its logits are "
                    "compared with the torch reference in onnxruntime. Families: mixtral, qwen2_moe, qwen3_moe, "
                    "olmoe; switch_transformers writes OUT/encoder.onnx and OUT/decoder.onnx (a folder).",
    )
    export.add_argument("model_dir", help="checkpoint directory (a Hugging Face MoE model, or from mcsmoe compress)")
    export.add_argument("out", nargs="?",
                        help="ONNX file to write, e.g. model.onnx (a folder for Switch Transformers); "
                             "omit it with --genai")
    export.add_argument("--genai", metavar="DIR",
                        help="write an onnxruntime-genai model folder instead of OUT: DIR/model.onnx, "
                             "genai_config.json (our input/output names, KV geometry, special tokens, search "
                             "defaults from generation_config.json) and the tokenizer files, so "
                             "onnxruntime-genai generates with DIR as it is (decoder-only families)")
    export.add_argument("--no-past", action="store_true", help="a plain logits graph without KV cache")
    export.add_argument("--target", choices=TARGETS, default=ExportConfig.target,
                        help="; ".join(f"{name}: {text}" for name, text in TARGET_HELP.items()))
    export.add_argument("--inline", action="store_true",
                        help="also write OUT.inlined.onnx with every function inlined (no ai.mcsmoe node), "
                             "for runtimes that reject custom domains; combine with --target portable for standard "
                             "ops only (the 'ort' target's attention and norms stay onnxruntime contrib ops)")
    export.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                        help="store the weights in OUT.onnx.data beside OUT, or (--no-external-data) inside OUT. "
                             "Default: in OUT.onnx.data for quantized graphs of targets ort and ort-qmoe "
                             "(onnxruntime memory-maps the file and drops the pages it repacks, so a session "
                             "holds about 1.3-1.9x the bytes on disk instead of 2-2.8x) and for weights past 64 MiB (a "
                             "330 MB fp32 graph decodes ~12%% faster from it), else inside OUT")
    export.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=ExportConfig.dtype,
                        help="the graph's floating type (weights, activations, KV cache). fp32 (default): what "
                             "onnxruntime's CPU provider computes fastest and exactly; x86 CPUs have no fp16 "
                             "arithmetic for most kernels, so fp16 mainly halves the file. fp16: for GPU runtimes "
                             "and memory; validated against the fp32 reference at fp16 tolerance (decoder-only, not quantized). "
                             "bf16: refused, with the reason (no bf16 kernels to run or validate it on CPU). The "
                             "compressed checkpoint itself keeps its source's dtype either way")
    export.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    group = export.add_argument_group("quantization at export (a checkpoint not quantized by mcsmoe compress)")
    # no argparse choices: a bad value is one error line from ExportConfig, like every other option error
    group.add_argument("--quantize", default=None, metavar="int4|int8",
                       help="quantize the model in memory before export, blockwise round to nearest as mcsmoe "
                            "compress --quantize does (dense experts one per group), and validate against that "
                            "quantized torch model; target ort writes com.microsoft.MatMulNBits (dense int4 experts: "
                            "com.microsoft.QMoE), target portable DequantizeLinear + MatMul (default: no quantization)")
    group.add_argument("--quant-block", type=int, default=ExportConfig.quant_block, metavar="N",
                       help="values per quantization block along each weight's input dimension; must divide every "
                            "quantized weight's input size (default: %(default)s)")
    add_quant_symmetry(group, ExportConfig.quant_symmetric)
    group.add_argument("--quantize-scope", default=ExportConfig.quant_scope, metavar="all|all+embeddings|experts",
                       help=QUANTIZE_SCOPE_HELP)
    export.add_argument("--accuracy-level", type=int, default=ExportConfig.accuracy_level, metavar="4|0",
                       help="compute accuracy written on onnxruntime's quantized kernels (MatMulNBits, QMoE) of a "
                            "quantized checkpoint or --quantize: 4 (default) quantizes activations to int8 per block, "
                            "the fastest (dense int4 experts decode ~1.5x faster than at 0); 0 computes in float32, "
                            "exact, and QMoE then keeps no packed copy of its weights (less session memory). The "
                            "export's parity check runs at 0 either way")
    export.add_argument("--expert-accuracy-level", type=int, default=None, metavar="4|0",
                       help="the same for the experts' kernels only (default: --accuracy-level): 0 with the rest at 4 "
                            "trades some decode speed for less session memory (level 4 holds a float block sum "
                            "beside each block's scale), e.g. for small low-rank graphs")
    export.add_argument("--force", action="store_true", help="replace the output if it exists")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=_cmd_export, parameter_flags=EXPORT_FLAGS)
