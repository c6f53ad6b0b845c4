"""A safetensors file's header, checked before any tensor is read: a user's file is untrusted.

Layout: 8 bytes of little-endian header length N, N bytes of JSON, then the data. The JSON maps
tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data), plus an
optional "__metadata__" of strings. A header that lies (offsets past the file, overlapping
tensors, a size that disagrees with shape x dtype) is refused with one line, not a traceback
from deep inside a reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def read_header(path: str | Path) -> dict:
    """The checked header of one safetensors file (tensor name -> entry, without "__metadata__")."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise UserError(f"weights file {path} is truncated or corrupt (bad header length)")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"weights file {path} is corrupt (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError(f"weights file {path} is corrupt (its header is a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        spans.append((*_check_entry(path, name, entry, data_size), name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise UserError(f"weights file {path} is corrupt (tensors {first} and {second} overlap)")
    return header


def _check_entry(path: Path, name: str, entry, data_size: int) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes, after checking its entry agrees with itself and the file."""
    where = f"weights file {path}, tensor {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise UserError(f"{where}: the header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise UserError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise UserError(f"{where}: shape must be a list of sizes, not {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise UserError(f"{where}: data_offsets must be [begin, end], not {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise UserError(f"weights file {path} is truncated or corrupt (tensor {name} at bytes {begin}..{end} of "
                        f"{data_size})")
    if end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
        raise UserError(f"{where}: {end - begin} bytes do not hold a {dtype} tensor of shape {shape}")
    return begin, end


__all__ = ["ITEM_BYTES", "read_header"]
