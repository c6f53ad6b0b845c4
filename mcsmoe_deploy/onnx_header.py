"""An ONNX file's ModelProto without its initializers' bytes, read without holding them in memory.

`onnx.load(path, load_external_data=False)` still parses every embedded weight: on a single-file
330 MB graph, reading the inputs' names for a session costs 330 MB more peak RSS than the session
itself (and fragments the heap the session allocates into next). Here the file is memory-mapped and
walked at the protobuf wire level: initializers (GraphProto field 5) and sparse initializers (15)
keep every field but `raw_data` (TensorProto field 9), whose pages are skipped, never read. The
result parses as an ordinary ModelProto: graph, inputs, outputs, metadata, functions, and each
initializer's name, type, dims and external-data entries.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import onnx

# field number -> None (drop the field) | a nested rule for a length-delimited submessage
_TENSOR = {9: None}  # TensorProto.raw_data
_RULES = {7: {5: _TENSOR, 15: {1: _TENSOR, 2: _TENSOR}}}  # ModelProto.graph: initializer, sparse_initializer


def _varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _rewrite(buf, start: int, end: int, rules: dict) -> bytearray:
    """The message in buf[start:end] with the fields `rules` names dropped or rewritten."""
    out, pos = bytearray(), start
    while pos < end:
        key_start = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            body, pos = pos, pos + length
            if field in rules:
                if rules[field] is not None:
                    inner = _rewrite(buf, body, pos, rules[field])
                    out += _encode_varint(key) + _encode_varint(len(inner)) + inner
                continue
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out += buf[key_start:pos]
    if pos != end:
        raise ValueError("truncated protobuf message")
    return out


def load_without_weight_bytes(path: str | Path) -> onnx.ModelProto:
    """The ModelProto of `path` whose initializers have no `raw_data` (their metadata kept); reads the
    file through a memory map, so its peak memory is the graph's structure, not its weights.
    Raises what `onnx.ModelProto.ParseFromString` or the wire walk raise on a file that is not a model."""
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            return onnx.ModelProto()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stripped = bytes(_rewrite(buf, 0, len(buf), _RULES))
    model = onnx.ModelProto()
    model.ParseFromString(stripped)
    return model


__all__ = ["load_without_weight_bytes"]
