"""The contract between export and runtime: what a graph from `mcsmoe export` looks like.

The exporters write it and the runtime reads it; both import it from here, so neither
imports the other. It holds:
- the custom op's identity (`ai.mcsmoe::GroupedLowRankMoE`, version 1; docs/ops.md);
- the graph's input and output names: a decoder graph takes `input_ids` [B, S],
  `attention_mask` [B, P + S], `position_ids` [B, S] (absent where every attention rotates inside
  GroupQueryAttention, at the row's own positions) and per layer
  `past_key_values.{i}.key` / `.value` [B, kv_heads, P, head_dim], and returns `logits`
  [B, S, V] and `present.{i}.key` / `.value` [B, kv_heads, P + S, head_dim]; Switch's
  encoder and decoder graphs follow optimum's names (see exporters/switch_export.py);
- the KV cache's geometry, and how a graph wants padded batches (`PADDING_SIDE`);
- where external data lives (`OUT.onnx.data`) and the inlined copy's name;
- reading a user's graph: one error line when it is missing, unreadable or not ours.
"""

from __future__ import annotations

from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, NamedTuple

from .errors import UserError

if TYPE_CHECKING:
    import onnx

DOMAIN = "ai.mcsmoe"
OP_TYPE = "GroupedLowRankMoE"
OP_VERSION = 1
# quantized factors as per-group INT4/UINT4/INT8/UINT8 inputs (docs/ops.md, "Version 2")
QUANTIZED_OP_VERSION = 2
# version 3 (docs/ops.md, "Version 3"): float factors as per-group inputs transposed to [in, out] (target
# ort), and low-rank factors shared by all groups (one input without the group axis)
PER_GROUP_OP_VERSION = 3
SHARED_BASIS_OP_VERSION = PER_GROUP_OP_VERSION
# version 4 (docs/ops.md, "Version 4"): a low-rank projection may take one more input, a full-rank base
# [out, in] shared by all groups (base-delta), which a version-3 consumer would read as the sparse rows
BASE_DELTA_OP_VERSION = 4


def op_version(quantized: bool, unstacked_floats: bool, shared_base: bool = False) -> int:
    """The op version a node needs: the oldest whose inputs it fits (docs/ops.md, "Versioning").

    unstacked_floats: some float factor is not stacked [G, ...] (per-group inputs or a shared basis);
    shared_base: some projection adds a base shared by all groups."""
    if shared_base:
        return BASE_DELTA_OP_VERSION
    return PER_GROUP_OP_VERSION if unstacked_floats else QUANTIZED_OP_VERSION if quantized else OP_VERSION

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# metadata_props key: how a decoder graph wants batches of prompts of different lengths padded. "left"
# (absent: the default; transformers' convention, the mask says which cache positions are real) or
# "right" (target ort with GroupQueryAttention: each row's real tokens first, in the batch and in the
# cache, and the mask is ones for a row's length then zeros; runtime.generation pads accordingly)
PADDING_SIDE = "mcsmoe.padding_side"

# Switch Transformers: two graphs in one folder
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"


class KVGeometry(NamedTuple):
    """The KV cache's shape: per layer a key and a value [B, kv_heads, P, head_dim]."""

    num_layers: int
    kv_heads: int
    head_dim: int


def past_names(num_layers: int) -> list[str]:
    """Past inputs of a decoder graph, per layer key then value."""
    return [f"{PAST_PREFIX}{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Present outputs of a decoder graph, in the order of `past_names`."""
    return [f"{PRESENT_PREFIX}{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def past_name(present: str) -> str:
    """The past input fed from a present output: `present.X` -> `past_key_values.X`."""
    return PAST_PREFIX + present.removeprefix(PRESENT_PREFIX)


def encoder_present_names(num_layers: int) -> list[str]:
    """Cross-attention key/value outputs of Switch's encoder graph."""
    return [f"{PRESENT_PREFIX}{i}.encoder.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def decoder_past_names(num_layers: int) -> list[str]:
    """Switch decoder past inputs, per layer: self-attention key, value, then cross-attention key, value."""
    return [f"{PAST_PREFIX}{i}.{part}.{kind}" for i in range(num_layers) for part in ("decoder", "encoder")
            for kind in ("key", "value")]


def decoder_present_names(num_layers: int) -> list[str]:
    """Self-attention key/value outputs of Switch's decoder graph."""
    return [f"{PRESENT_PREFIX}{i}.decoder.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def external_data_path(graph_path: str | Path) -> Path:
    """Where the weights of `graph_path` live when stored as external data: `OUT.onnx.data` beside it."""
    graph_path = Path(graph_path)
    return graph_path.with_name(graph_path.name + ".data")


def inlined_path(graph_path: str | Path) -> Path:
    """The name of the functions-inlined copy: `model.onnx` -> `model.inlined.onnx`."""
    graph_path = Path(graph_path)
    return graph_path.with_name(f"{graph_path.stem}.inlined{graph_path.suffix or '.onnx'}")


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers, sparse initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _attribute_tensors(graph.node)


def _attribute_tensors(nodes):
    for node in nodes:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else [])
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def external_data_files(model: onnx.ModelProto, folder: str | Path) -> list[Path]:
    """The external data files `model` refers to, as `folder / location` (sorted, each once), checked.

    A graph's file is untrusted: each location must be a relative path without `..`, and must
    resolve (symbolic links followed) to a regular file inside `folder`, the graph's own
    folder. One UserError line otherwise (an absolute path, an escape, a missing file).
    """
    from onnx import TensorProto

    folder = Path(folder)
    root = folder.resolve()
    tensors = [*_tensors(model.graph), *(t for f in model.functions for t in _attribute_tensors(f.node))]
    locations = sorted({entry.value for tensor in tensors if tensor.data_location == TensorProto.EXTERNAL
                        for entry in tensor.external_data if entry.key == "location"})
    files = []
    for location in locations:
        relative, windows = Path(location), PureWindowsPath(location)
        if not location or relative.is_absolute() or windows.is_absolute() or windows.drive:
            raise UserError(f"the graph's external data location {location!r} is not a relative path inside "
                            f"{folder}; refusing to read it")
        if ".." in relative.parts or ".." in windows.parts:
            raise UserError(f"the graph's external data location {location!r} leaves {folder} ('..'); "
                            "refusing to read it")
        path = folder / relative
        if not path.exists() and not path.is_symlink():
            raise UserError(f"the graph's external data file {path} is missing (copy it beside the graph)")
        resolved = path.resolve()
        if root not in resolved.parents:
            raise UserError(f"the graph's external data file {path} is a link to {resolved}, outside {folder}; "
                            "refusing to read it")
        if not resolved.is_file():
            raise UserError(f"the graph's external data file {path} is not a regular file")
        files.append(path)
    return files


def read_graph(path: str | Path, check_external_data: bool = True, weight_bytes: bool = True) -> onnx.ModelProto:
    """A user's ONNX file without its external weights (graph, I/O, metadata); one UserError line when it is
    not one, or (`check_external_data`) when its external data lies outside its folder or is missing
    (`external_data_files`). weight_bytes=False also leaves out embedded weights' bytes, never holding
    them in memory (onnx_header): what a session opening the file itself needs."""
    import onnx

    from .onnx_header import load_without_weight_bytes

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False) if weight_bytes else load_without_weight_bytes(path)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors
        raise UserError(f"{path} is not a readable ONNX file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if check_external_data:
        external_data_files(model, path.parent)
    return model


def geometry_from_graph(path: str | Path) -> tuple[KVGeometry, int]:
    """(KV geometry, vocabulary size) from a decoder graph's inputs and outputs (weights not loaded)."""
    graph = read_graph(path, weight_bytes=False).graph
    pasts = [i for i in graph.input if i.name.startswith(PAST_PREFIX) and i.name.endswith(".key")]
    if not pasts or INPUT_IDS not in {i.name for i in graph.input}:
        raise UserError(f"{path} is not a KV-cache graph from `mcsmoe export` (no {PAST_PREFIX}N.key inputs); "
                        "export it without --no-past")
    dims = pasts[0].type.tensor_type.shape.dim
    logits = next(o for o in graph.output if o.name == LOGITS).type.tensor_type.shape.dim
    return KVGeometry(len(pasts), dims[1].dim_value, dims[3].dim_value), logits[2].dim_value


__all__ = [
    "ATTENTION_MASK",
    "DECODER_FILE",
    "DOMAIN",
    "ENCODER_ATTENTION_MASK",
    "ENCODER_FILE",
    "ENCODER_HIDDEN_STATES",
    "INPUT_IDS",
    "KVGeometry",
    "LOGITS",
    "OP_TYPE",
    "OP_VERSION",
    "QUANTIZED_OP_VERSION",
    "PER_GROUP_OP_VERSION",
    "SHARED_BASIS_OP_VERSION",
    "BASE_DELTA_OP_VERSION",
    "op_version",
    "PAST_PREFIX",
    "POSITION_IDS",
    "PRESENT_PREFIX",
    "decoder_past_names",
    "decoder_present_names",
    "encoder_present_names",
    "external_data_files",
    "external_data_path",
    "geometry_from_graph",
    "inlined_path",
    "past_name",
    "past_names",
    "present_names",
    "read_graph",
]
