"""Weight bytes a model reads to decode one token at batch 1: the numerator of the decode floor.

Counted from the files, without loading weights. A tensor counts in full, except:
- expert weights: the share of experts one token uses, min(k, G) / G (k picks, G groups or
  experts; two picks in one merged group read it once, so this is an upper bound);
- an embedding table read by lookup (ONNX Gather, or the input embedding in a checkpoint):
  one row, unless the same table is also the output projection (tied), which reads it all.
In a checkpoint, the family's adapter tells which tensors are experts and what k is
(`FamilyAdapter.token_read_share`).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..contract import DECODER_FILE, DOMAIN, OP_TYPE, read_graph
from ..models import adapter_for_config

_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def bytes_on_disk(model: str | Path) -> int:
    """Bytes of an ONNX file with its external data, or of every file in a checkpoint directory."""
    path = Path(model)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def active_weight_bytes(model: str | Path, backend: str) -> int:
    """Weight bytes read per decoded token (batch 1) of an ONNX graph (ort, trt) or a checkpoint (torch)."""
    if backend == "torch":
        return _checkpoint_active_bytes(Path(model))
    if Path(model).is_dir():  # an encoder-decoder export: each decoded token runs the decoder only
        return _onnx_active_bytes(Path(model) / DECODER_FILE)
    return _onnx_active_bytes(Path(model))


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _onnx_active_bytes(path: Path) -> int:
    model = read_graph(path)
    graph = model.graph
    sizes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    rows = {t.name: max(t.dims[0], 1) if t.dims else 1 for t in graph.initializer}
    share: dict[str, float] = {}
    formal = {(f.domain, f.name, f.overload): list(f.input) for f in model.functions}

    def use(name: str, fraction: float) -> None:
        if name in sizes:
            share[name] = max(share.get(name, 0.0), fraction)

    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.domain, node.op_type) == (DOMAIN, OP_TYPE):
            for name, fraction in _moe_input_shares(node, attrs["top_k"], graph, formal.get(
                    (node.domain, node.op_type, node.overload))).items():
                use(name, fraction)
        elif (node.domain, node.op_type) == ("com.microsoft", "MoE"):
            experts = rows.get(node.input[2], 1)
            for index, name in enumerate(node.input):
                use(name, min(attrs.get("k", 1), experts) / experts if index >= 2 else 1.0)
        elif (node.domain, node.op_type) in (("com.microsoft", "RotaryEmbedding"),
                                             ("com.microsoft", "GroupQueryAttention")):
            # cos/sin caches [max positions, head_dim / 2] (RotaryEmbedding's inputs 2, 3; GroupQueryAttention's
            # 7, 8 when it rotates): a decoded token reads its position's row
            caches = (2, 3) if node.op_type == "RotaryEmbedding" else (7, 8)
            for index, name in enumerate(node.input):
                use(name, 1 / rows.get(name, 1) if index in caches else 1.0)
        elif node.op_type == "Gather" and node.input[0] in sizes:
            use(node.input[0], 1 / rows[node.input[0]])
            for name in node.input[1:]:
                use(name, 1.0)
        else:
            for name in node.input:
                use(name, 1.0)
    # initializers only a function body or nothing reads still sit in memory; count them in full
    return int(sum(size * share.get(name, 1.0) for name, size in sizes.items()))


def _moe_input_shares(node: onnx.NodeProto, top_k: int, graph: onnx.GraphProto,
                      formal_names: list[str] | None) -> dict[str, float]:
    """Share of each GroupedLowRankMoE input a decoded token reads: expert tensors min(k, G) / G, whether
    stacked [G, ...] or one input per group (versions 2, 3: formal names end in `_<g>`); a low-rank factor
    shared by all groups (version 3, no group axis) and the routing inputs in full."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    formal = list(formal_names or [])[:len(node.input)]
    formal += [""] * (len(node.input) - len(formal))
    suffixes = [int(m.group(1)) for m in map(re.compile(r"_(\d+)$").search, formal[3:]) if m]
    per_group_count = max(suffixes) + 1 if suffixes else None
    shares = {name: 1.0 for name in node.input[:3]}
    for name, formal_name in zip(node.input[3:], formal[3:]):
        shape = dims.get(name, [])
        if formal_name.endswith(("_left", "_right", "_base")) and len(shape) == 2:
            shares[name] = 1.0  # a shared basis or base: every token reads it
            continue
        groups = per_group_count or (max(shape[0], 1) if shape else 1)
        shares[name] = min(top_k, groups) / groups
    return shares


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _checkpoint_active_bytes(model_dir: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for_config(config)
    total = 0.0
    for weights in sorted(model_dir.glob("*.safetensors")):
        for name, info in _safetensors_header(weights).items():
            shape = info["shape"]
            size = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_ITEMSIZE.get(info["dtype"], 4)
            total += size * adapter.token_read_share(name, shape, config)
    return int(total)


__all__ = ["active_weight_bytes", "bytes_on_disk"]
