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
from .contract import external_data_files, read_graph
from .onnx_header import load_without_weight_bytes
from .errors import ParameterError, Terminated, UserError
from .files import check_output, clear_stale_staging, staged_output, staging_leftovers
from .evaluate import perplexity
from .exporters import (
    ExportConfig,
    ExportReport,
    FusionPlan,
    MoEOpSpec,
    ParityCheck,
    check_parity,
    group_dense_experts,
    write_inlined_copy,
    export_compressed,
    export_compressed_with_past,
    export_model,
    export_switch,
    genai_config,
    greedy_generate_onnx,
    greedy_generate_switch_onnx,
    grouped_moe_function,
    write_genai_files,
    ort_modules_fused,
)
from .grouped_experts import GroupedLowRankExperts, GroupedProjection, ProjectionSpec, grouped_moe_forward, route_top_k
from .models import ExpertLayout, FamilyAdapter, MoELayer, Routing, SUPPORTED_FAMILIES, adapter_for_config, load_model
from .quantization import QuantSpec, QuantizedWeight, block_grid, dequantize, quantize, round_to_grid
from .quantized_embedding import QuantizedEmbedding, quantize_input_embeddings, quantized_embedding_specs
from .quantized_linear import QuantizedLinear, install_quantized_linears, quantize_linears, quantized_linear_specs
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
    "FusionPlan",
    "MoEOpSpec",
    "FamilyAdapter",
    "GroupedLowRankExperts",
    "GroupedProjection",
    "MoELayer",
    "ParameterError",
    "ParityCheck",
    "ProjectionSpec",
    "QuantSpec",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedWeight",
    "Routing",
    "SUPPORTED_FAMILIES",
    "SizeReport",
    "Terminated",
    "UserError",
    "adapter_for_config",
    "block_grid",
    "builtin_corpus",
    "calibration_text",
    "check_output",
    "check_parity",
    "clear_stale_staging",
    "ort_modules_fused",
    "compare_reports",
    "dequantize",
    "export_compressed",
    "export_compressed_with_past",
    "grouped_moe_forward",
    "route_top_k",
    "export_model",
    "export_switch",
    "external_data_files",
    "genai_config",
    "generate",
    "generate_text",
    "greedy_generate_onnx",
    "greedy_generate_switch_onnx",
    "group_dense_experts",
    "grouped_moe_function",
    "write_genai_files",
    "is_compressed_checkpoint",
    "is_quantized_checkpoint",
    "load_compressed",
    "load_model",
    "open_session",
    "perplexity",
    "quantize",
    "read_graph",
    "load_without_weight_bytes",
    "quantize_linears",
    "quantized_linear_specs",
    "quantize_input_embeddings",
    "quantized_embedding_specs",
    "install_quantized_linears",
    "read_text",
    "round_to_grid",
    "run_bench",
    "save_compressed",
    "save_standard",
    "write_model_dir",
    "size_report",
    "staged_output",
    "staging_leftovers",
    "token_blocks",
    "write_inlined_copy",
]
