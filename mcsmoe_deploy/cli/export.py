"""`mcsmoe export` (also `mcsmoe-export`): argument parsing only; calls `export_model`."""

from __future__ import annotations

import argparse

from ..exporters.export_config import TARGET_HELP, TARGETS, ExportConfig


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

    quiet_torch_onnx()
    config = ExportConfig(
        target=args.target, with_past=not args.no_past, validate=not args.no_validate, inline=args.inline,
        external_data=True if args.external_data else None, force=args.force, progress=not args.quiet,
    )
    report = export_model(args.model_dir, args.out, config)
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
    export.add_argument("out", help="ONNX file to write, e.g. model.onnx (a folder for Switch Transformers)")
    export.add_argument("--no-past", action="store_true", help="a plain logits graph without KV cache")
    export.add_argument("--target", choices=TARGETS, default=ExportConfig.target,
                        help="; ".join(f"{name}: {text}" for name, text in TARGET_HELP.items()))
    export.add_argument("--inline", action="store_true",
                        help="also write OUT.inlined.onnx with every function inlined (no ai.mcsmoe node), "
                             "for runtimes that reject custom domains; combine with --target portable for standard "
                             "ops only (the 'ort' target's attention and norms stay onnxruntime contrib ops)")
    export.add_argument("--external-data", action="store_true",
                        help="store the weights in OUT.onnx.data (automatic beyond about 1.8 GB)")
    export.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    export.add_argument("--force", action="store_true", help="replace the output if it exists")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=_cmd_export)
