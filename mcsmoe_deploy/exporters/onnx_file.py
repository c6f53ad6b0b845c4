"""Writing ONNX files: checked, with optional external data, never half-written; and the inlined copy.

A model is saved into a staging folder beside the target (files.staged_output), checked
there with onnx.checker (full_check, by path so external data works past protobuf's 2 GB),
and only then renamed into place: the data file first, the graph last. A failure leaves
nothing behind. `write_passes_result` does the same for an `ir.Model` after graph passes,
streaming its weights from disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from ..contract import external_data_path, inlined_path
from ..files import staged_output, with_default_permissions
from .passes import GraphPassManager
from .passes.inline import inline_passes

# protobuf cannot serialise a message of 2 GiB or more; leave room for the graph itself
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_IN_FLIGHT_BYTES = 64 << 20  # bound on weight bytes being written at once


def save_checked(model_proto: onnx.ModelProto, out_path: str | Path, external_data: bool | None = None) -> Path:
    """Save `model_proto` to `out_path` after onnx.checker full_check passes on the saved file.

    external_data: True stores every tensor over 1 KiB in `OUT.onnx.data`; None does so
    only when the model would not fit in one protobuf (about 1.8 GB). With external data
    onnx moves the tensors out of `model_proto` while writing, so the caller's proto no
    longer holds the weights afterwards.
    """
    out_path = Path(out_path)
    if external_data is None:
        # summed per tensor: ByteSize() of the whole message overflows past 2 GB
        external_data = sum(t.ByteSize() for t in model_proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with staged_output(out_path, force=True, kind="file", companions=(external_data_path(out_path).name,)) as target:
        write_staged(model_proto, target, target, external_data)
    return out_path


def write_staged(model_proto: onnx.ModelProto, staged: Path, out_path: str | Path, external_data: bool) -> Path:
    """Write `model_proto` to `staged`, check it, move it to `out_path` (both in a `staged_output` folder).

    external_data: write the weights `model_proto` holds into `STAGED.data`. Tensors that
    already refer to an external file keep referring to it; that file must already sit
    beside `staged` under the output's data name (as `stage_graph` leaves it).
    """
    out_path = Path(out_path)
    if external_data:
        onnx.save_model(
            model_proto, staged, save_as_external_data=True, all_tensors_to_one_file=True,
            location=external_data_path(out_path).name, size_threshold=1024,
        )
    else:
        onnx.save_model(model_proto, staged)
    onnx.checker.check_model(str(staged), full_check=True)
    staged_data = external_data_path(staged)
    for item in (staged, staged_data):
        if item.exists():
            with_default_permissions(item)  # ir.save writes its data file through a private temp file
    if staged_data.exists():
        os.replace(staged_data, external_data_path(out_path))
    os.replace(staged, out_path)
    return out_path


def write_staged_as_one_file(model_proto: onnx.ModelProto, staged: Path, out_path: str | Path) -> Path:
    """Check `model_proto` in its external-data form, then write it to `out_path` as one file.

    `model_proto` refers to its weights in `STAGED.data` (as `stage_graph` leaves them) and
    holds no weight bytes itself. The checker reads only the small graph, and the single
    file is streamed tensor by tensor (`stream_one_file`), so no step holds all weights in
    memory: onnx.save_model of a loaded model would hold them three times over.
    """
    out_path = Path(out_path)
    onnx.save_model(model_proto, staged)
    onnx.checker.check_model(str(staged), full_check=True)
    single = staged.with_name(staged.name + ".single")
    stream_one_file(model_proto, staged.parent, single)
    with_default_permissions(single)
    os.replace(single, out_path)
    return out_path


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(field: int) -> bytes:  # a length-delimited field's key
    return _varint(field << 3 | 2)


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto
_CHUNK = 16 << 20


def stream_one_file(model_proto: onnx.ModelProto, base_dir: Path, out_file: Path) -> None:
    """Serialise `model_proto` with every external tensor's bytes inline, one tensor at a time.

    Protobuf lets a message's fields come in any order and concatenates repeated fields, so
    the file is: the model without its graph, then the graph field, whose body is the graph
    without initializers followed by each initializer (its metadata, then its raw_data read
    from `base_dir` in chunks). Parsers see the same message onnx.save_model would write.
    """
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    head = onnx.ModelProto()
    head.CopyFrom(model_proto)
    head.ClearField("graph")
    graph = onnx.GraphProto()
    graph.CopyFrom(model_proto.graph)
    graph.ClearField("initializer")
    records = []  # (metadata bytes, data file, offset, length) or (serialised tensor, None, 0, 0)
    for tensor in model_proto.graph.initializer:
        if not uses_external_data(tensor):
            records.append((tensor.SerializeToString(), None, 0, 0))
            continue
        info = ExternalDataInfo(tensor)
        meta = onnx.TensorProto()
        meta.CopyFrom(tensor)
        meta.ClearField("external_data")
        meta.ClearField("data_location")  # absent, as in a tensor that was never external
        path = base_dir / info.location
        length = info.length if info.length is not None else path.stat().st_size - (info.offset or 0)
        records.append((meta.SerializeToString(), path, info.offset or 0, length))

    def tensor_size(meta: bytes, path, length: int) -> int:
        return len(meta) + (len(_tag(_TENSOR_RAW_DATA)) + len(_varint(length)) + length if path else 0)

    graph_bytes = graph.SerializeToString()
    body = len(graph_bytes) + sum(
        len(_tag(_GRAPH_INITIALIZER)) + len(_varint(tensor_size(m, p, n))) + tensor_size(m, p, n) for m, p, _, n in records
    )
    with open(out_file, "wb") as out:
        out.write(head.SerializeToString())
        out.write(_tag(_MODEL_GRAPH) + _varint(body) + graph_bytes)
        for meta, path, offset, length in records:
            out.write(_tag(_GRAPH_INITIALIZER) + _varint(tensor_size(meta, path, length)) + meta)
            if path is None:
                continue
            out.write(_tag(_TENSOR_RAW_DATA) + _varint(length))
            with open(path, "rb") as data:
                data.seek(offset)
                remaining = length
                while remaining:
                    chunk = data.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise ValueError(f"{path} ends before tensor {offset}+{length}")
                    out.write(chunk)
                    remaining -= len(chunk)


def write_passes_result(model: ir.Model, staged: Path, out_path: str | Path, external_data: bool) -> onnx.ModelProto:
    """Write an `ir.Model` whose weights are partly on disk, partly made by passes, to `out_path`; checked.

    Every weight is streamed afresh (`ir.save`, a bounded number of bytes in flight) into a
    folder beside `staged`, so weights the passes dropped leave no bytes behind; the
    checker reads that copy, then it moves into place (external_data) or is streamed into
    one file (`stream_one_file`). Returns the written graph without weight values.
    """
    out_path = Path(out_path)
    fresh = staged.parent / "rewritten"
    fresh.mkdir()
    target = fresh / staged.name
    ir.save(model, target, external_data=external_data_path(out_path).name, size_threshold_bytes=1024,
            max_in_flight_bytes=_IN_FLIGHT_BYTES)
    onnx.checker.check_model(str(target), full_check=True)
    written = onnx.load(str(target), load_external_data=False)
    if external_data:
        for item in (target, external_data_path(target)):
            if item.exists():
                with_default_permissions(item)
        if external_data_path(target).exists():
            os.replace(external_data_path(target), external_data_path(out_path))
        os.replace(target, out_path)
    else:
        single = fresh / (staged.name + ".single")
        stream_one_file(written, fresh, single)
        with_default_permissions(single)
        os.replace(single, out_path)
    return written


def _external_weights_as_inputs(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model_proto` whose externally stored initializers are graph inputs (same type and shape)."""
    from onnx.external_data_helper import uses_external_data

    checked = onnx.ModelProto()
    checked.CopyFrom(model_proto)
    external = [t for t in checked.graph.initializer if uses_external_data(t)]
    for tensor in external:
        checked.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        checked.graph.initializer.remove(tensor)
    return checked


def write_inlined_copy(path: str | Path, out_path: str | Path | None = None) -> Path:
    """Write a copy of the model at `path` with every local function inlined (standard ops only).

    For runtimes that reject custom domains. Inlining is onnx-ir's (`passes.inline`); the
    custom domain's opset import goes with the functions. The copy refers to the same
    external data file as the original when there is one (inlining moves no tensors), so
    the weights are not duplicated on disk. Returns the copy's path (default:
    `inlined_path(path)`).
    """
    path = Path(path)
    out_path = Path(out_path) if out_path is not None else inlined_path(path)
    if external_data_path(path).exists() and out_path.parent != path.parent:
        raise ValueError("an inlined copy of a model with external data must sit in the same folder")
    model = ir.from_proto(onnx.load_model(path, load_external_data=False))  # external tensors stay references
    inlined = ir.to_proto(GraphPassManager(inline_passes())(model).model)
    with staged_output(out_path, force=True, kind="file") as staged:
        onnx.save_model(inlined, staged)
        if external_data_path(path).exists():
            # the weights stay in the original's data file, checked when it was written; the checker looks
            # for that file beside the staged copy (refusing a link, and a copy would double the bytes), so
            # check the graph with its external weights as inputs of the same type and shape
            onnx.checker.check_model(_external_weights_as_inputs(inlined), full_check=True)
        else:
            onnx.checker.check_model(str(staged), full_check=True)
    return out_path


__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "save_checked",
    "stream_one_file",
    "write_inlined_copy",
    "write_passes_result",
    "write_staged",
    "write_staged_as_one_file",
]
