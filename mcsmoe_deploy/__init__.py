"""mcsmoe-deploy: merge, then compress sparse mixture-of-experts models, and ship them.

The public API, stage by stage:
    models      load_model, adapter_for_config            (find routers and experts)
    compress    compress_model, CompressionRecipe, ...     (statistics -> plan -> merged, compressed experts)
    checkpoint  save_compressed, load_compressed           (the compressed checkpoint directory)
    exporters   export_model, grouped_moe_function         (ONNX with one GroupedLowRankMoE node per block)
    runtime     open_session, generate, generate_text      (serve a graph or checkpoint: ort, trt, torch)
                run_bench, compare_reports                 (measure in one run; catch regressions)
    measure     perplexity, size_report
"""

from .checkpoint import (
    is_compressed_checkpoint, is_quantized_checkpoint, load_compressed, save_compressed, save_standard, write_model_dir,
)
from .compress import *  # noqa: F403 - the compress stage's public API
from .compress import __all__ as _compress_all
from .corpus import builtin_corpus, calibration_text, read_text, token_blocks
from .errors import ParameterError, UserError
from .evaluate import perplexity
from .exporters import (
    ExportConfig,
    ExportReport,
    MoEOpSpec,
    ParityCheck,
    check_parity,
    group_dense_experts,
    write_inlined_copy,
    export_compressed,
    export_compressed_with_past,
    export_model,
    export_switch,
    greedy_generate_onnx,
    greedy_generate_switch_onnx,
    grouped_moe_function,
)
from .grouped_experts import GroupedLowRankExperts, GroupedProjection, ProjectionSpec, grouped_moe_forward, route_top_k
from .models import ExpertLayout, FamilyAdapter, MoELayer, Routing, SUPPORTED_FAMILIES, adapter_for_config, load_model
from .quantization import QuantSpec, QuantizedWeight, dequantize, quantize
from .report import SizeReport, size_report
from .runtime import (
    BenchConfig,
    BenchReport,
    Contestant,
    DecoderSession,
    GenerationConfig,
    GenerationResult,
    compare_reports,
    generate,
    open_session,
    run_bench,
)
from .runtime.text import TextGeneration, generate_text

__version__ = "0.1.0"

__all__ = [
    *_compress_all,
    "BenchConfig",
    "BenchReport",
    "Contestant",
    "DecoderSession",
    "ExpertLayout",
    "GenerationConfig",
    "GenerationResult",
    "TextGeneration",
    "ExportConfig",
    "ExportReport",
    "MoEOpSpec",
    "FamilyAdapter",
    "GroupedLowRankExperts",
    "GroupedProjection",
    "MoELayer",
    "ParameterError",
    "ParityCheck",
    "ProjectionSpec",
    "QuantSpec",
    "QuantizedWeight",
    "Routing",
    "SUPPORTED_FAMILIES",
    "SizeReport",
    "UserError",
    "adapter_for_config",
    "builtin_corpus",
    "calibration_text",
    "check_parity",
    "compare_reports",
    "dequantize",
    "export_compressed",
    "export_compressed_with_past",
    "grouped_moe_forward",
    "route_top_k",
    "export_model",
    "export_switch",
    "generate",
    "generate_text",
    "greedy_generate_onnx",
    "greedy_generate_switch_onnx",
    "group_dense_experts",
    "grouped_moe_function",
    "is_compressed_checkpoint",
    "is_quantized_checkpoint",
    "load_compressed",
    "load_model",
    "open_session",
    "perplexity",
    "quantize",
    "read_text",
    "run_bench",
    "save_compressed",
    "save_standard",
    "write_model_dir",
    "size_report",
    "token_blocks",
    "write_inlined_copy",
]
