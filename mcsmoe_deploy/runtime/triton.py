"""A Triton Inference Server model repository for a graph from `mcsmoe export`.

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx   (+ the external data files it refers to)   backend "onnxruntime"
    REPO/NAME/1/model.plan   (a TensorRT engine, e.g. TrtDecoderSession's)   backend "tensorrt"

The config lists every input and output with its Triton type (TYPE_INT64, TYPE_FP32,
TYPE_FP16, ...) and dims: a dynamic dimension is -1; with max_batch_size > 0 the batch
axis is left out of dims (Triton adds it) and requests are batched dynamically.

Stateless serving of the KV cache. Triton's sequence batcher with implicit state would keep
the cache on the server; that is beyond this writer. The KV-cache graph is served as a
stateless model: every request carries the whole cache in (`past_key_values.N.key/value`
[kv_heads, P, head_dim] per row) and gets the grown cache back (`present.N.*`), so the
client keeps the cache and feeds each step's presents to the next step. Results are
exact, but each decode step moves 2 x layers x kv_heads x P x head_dim values per row each
way, which grows with the context: fine for short contexts and tests, not for throughput.
Dynamic batching only merges requests whose non-batch dims agree (same new-token count S
and cache length P). A TensorRT engine must cover max_batch_size in the profile Triton
uses (profile 0; TrtDecoderSession's "general" profile covers every step shape).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import UserError
from ..contract import external_data_files, read_graph
from ..files import staged_output

BACKENDS = ("onnxruntime", "tensorrt")
TRITON_TYPES = {
    TensorProto.BOOL: "TYPE_BOOL", TensorProto.UINT8: "TYPE_UINT8", TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT32: "TYPE_INT32", TensorProto.INT64: "TYPE_INT64", TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.FLOAT: "TYPE_FP32", TensorProto.DOUBLE: "TYPE_FP64", TensorProto.BFLOAT16: "TYPE_BF16",
}
MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton sees it: dims without the batch axis when batching."""

    name: str
    data_type: str  # TYPE_*
    dims: tuple[int, ...]  # -1 = dynamic

    def pbtxt(self) -> str:
        dims = ", ".join(map(str, self.dims))
        return f'  {{\n    name: "{self.name}"\n    data_type: {self.data_type}\n    dims: [ {dims} ]\n  }}'


@dataclass
class TritonRepository:
    """What `write_triton_repository` wrote."""

    model_dir: Path
    name: str
    backend: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: list[Path] = field(default_factory=list)  # under model_dir

    def summary(self) -> str:
        size = sum((self.model_dir / f).stat().st_size for f in self.files)
        return (f"wrote Triton model {self.name!r} ({self.backend}, max_batch_size {self.max_batch_size}, "
                f"{len(self.inputs)} inputs, {len(self.outputs)} outputs, {size / 1e6:.1f} MB) to {self.model_dir}")


def _spec(value: onnx.ValueInfoProto, batched: bool) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in TRITON_TYPES:
        raise UserError(f"{value.name} has ONNX type {TensorProto.DataType.Name(tensor.elem_type)}, "
                        "which Triton has no type for")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    if batched:
        if not dims or dims[0] != -1:
            raise UserError(f"{value.name} has no dynamic batch axis (shape {list(dims)}); use max_batch_size=0")
        dims = dims[1:]
    return TensorSpec(value.name, TRITON_TYPES[tensor.elem_type], dims)


def tensor_specs(model_onnx: str | Path, batched: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the graph as Triton specs (weights not loaded)."""
    graph = read_graph(model_onnx).graph
    weights = {t.name for t in graph.initializer}
    inputs = [_spec(v, batched) for v in graph.input if v.name not in weights]
    return inputs, [_spec(v, batched) for v in graph.output]


def config_pbtxt(name: str, backend: str, max_batch_size: int, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 queue_delay_us: int = 100) -> str:
    """The text of config.pbtxt (protobuf text format of inference.ModelConfig)."""
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join(s.pbtxt() for s in inputs) + "\n]",
             "output [\n" + ",\n".join(s.pbtxt() for s in outputs) + "\n]"]
    if max_batch_size > 0:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    if backend == "tensorrt":
        lines.append("instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]")
    return "\n".join(lines) + "\n"


def _place(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (no copy of the weights on the same file system), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_triton_repository(model_onnx: str | Path, repo_dir: str | Path, name: str | None = None,
                            max_batch_size: int = 8, backend: str = "onnxruntime",
                            engine_path: str | Path | None = None, force: bool = False,
                            queue_delay_us: int = 100) -> TritonRepository:
    """Write `repo_dir/<name>/` for `model_onnx` (see the module docstring).

    name: default the ONNX file's stem; max_batch_size: 0 turns batching off (dims then
    include the batch axis); backend: onnxruntime (model.onnx) or tensorrt (engine_path
    copied to model.plan; the ONNX file still gives the inputs and outputs). The folder is
    written through `files.staged_output` (an existing one is replaced only with `force`,
    and stays whole until the new one is complete). Files are hard-linked where possible;
    external data files must lie inside the model's folder (`contract.external_data_files`):
    nothing from elsewhere is linked or copied.
    """
    model_onnx, repo_dir = Path(model_onnx), Path(repo_dir)
    name = name if name is not None else model_onnx.stem
    if backend not in BACKENDS:
        raise UserError(f"unknown Triton backend {backend!r}; one of {', '.join(BACKENDS)}")
    if not MODEL_NAME.match(name):
        raise UserError(f"model name {name!r}: use letters, digits, '_', '.' and '-'")
    if max_batch_size < 0:
        raise UserError(f"max_batch_size must be >= 0 (got {max_batch_size})")
    if not model_onnx.is_file():
        raise UserError(f"model not found: {model_onnx}")
    if backend == "tensorrt" and (engine_path is None or not Path(engine_path).is_file()):
        raise UserError("the tensorrt backend serves an engine: pass engine_path (a .plan file built for this model)")
    target = repo_dir / name
    inputs, outputs = tensor_specs(model_onnx, batched=max_batch_size > 0)  # external data checked here
    if backend == "tensorrt":
        sources = {"1/model.plan": Path(engine_path)}
    else:
        data = external_data_files(read_graph(model_onnx), model_onnx.parent)
        sources = {"1/model.onnx": model_onnx, **{f"1/{d.relative_to(model_onnx.parent)}": d for d in data}}
    if repo_dir.is_symlink() or (repo_dir.exists() and not repo_dir.is_dir()):
        raise UserError(f"repository {repo_dir} is not a folder" + (" (a symbolic link)" if repo_dir.is_symlink() else ""))
    repo_dir.mkdir(parents=True, exist_ok=True)
    with staged_output(target, force=force, inputs=list(sources.values())) as staging:
        for relative, src in sources.items():
            _place(src, staging / relative)
        (staging / "config.pbtxt").write_text(config_pbtxt(name, backend, max_batch_size, inputs, outputs,
                                                           queue_delay_us))
    files = [Path("config.pbtxt"), *map(Path, sources)]
    return TritonRepository(target, name, backend, max_batch_size, inputs, outputs, files)


__all__ = ["BACKENDS", "TRITON_TYPES", "TensorSpec", "TritonRepository", "config_pbtxt", "tensor_specs",
           "write_triton_repository"]
