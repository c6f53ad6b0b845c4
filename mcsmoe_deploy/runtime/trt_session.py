"""TensorRT backend: a KV-cache graph from `mcsmoe export` built into a cached engine. UNVERIFIED.

Written against the TensorRT 10 Python API (with the TensorRT 11 removals guarded) but never
run: TensorRT cannot be installed on the machines this was written on and needs an NVIDIA
GPU. What needs no TensorRT is separated out and tested: the optimisation profiles and the
engine cache key (trt_engine), and the graph preparation (trt_graph), checked in onnxruntime.

Engine: two optimisation profiles (see `decoder_profiles`): 0 "general" covers every step
up to (max_batch, max_seq new tokens, max_past cached tokens) and is tuned for a prefill;
1 "decode" covers one new token and is tuned for decoding. A step runs on the decode
context when S = 1, else on the general one (one execution context per profile, so each
holds its own activation memory). Engines are cached in `cache_dir` under a key of
everything that changes them (`engine_cache_key`); the timing cache is kept beside them.

Precision: fp32 builds a strongly typed network with TF32 off. fp16 / bf16 of a float32
graph use the builder flags of TensorRT 10 (weakly typed: TensorRT picks per layer; inputs
and outputs, the KV cache included, stay float32). TensorRT 11 removed those flags: there
a float16 / bfloat16 graph is needed for fp16 / bf16. The cache lives on the GPU between
steps as torch tensors (the step's `past`); only logits come to the host.

GroupedLowRankMoE: when a TensorRT plugin named GroupedLowRankMoE is registered in
namespace "ai.mcsmoe" (a plugin library in `plugin_libraries`, or a `tensorrt.plugin`
Python plugin imported beforehand) the MoE nodes go to it; otherwise the functions are
inlined into standard ops (see trt_graph.prepare_for_tensorrt).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import PAST_PREFIX, PRESENT_PREFIX, geometry_from_graph, read_graph
from ..errors import UserError
from .session import DecoderSession, StepOutput
from .trt_engine import (
    NOT_INSTALLED,
    PRECISIONS,
    DeviceInfo,
    OptimizationProfile,
    ShapeRange,
    build_engine,
    choose_profile,
    decoder_profiles,
    default_cache_dir,
    engine_cache_key,
    engine_path,
    import_tensorrt,
    moe_plugin_registered,
    network_typing,
    write_atomic,
)
from .trt_graph import prepare_for_tensorrt

# TensorRT DataType names -> torch dtype names
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


# ---------------------------------------------------------------------------------------------
# the session


class TrtDecoderSession(DecoderSession):
    """A KV-cache graph as a TensorRT engine (UNVERIFIED; see the module docstring).

    precision: fp32 | fp16 | bf16; max_batch / max_seq / max_past: the engine's shape limits
    (`decoder_profiles`); cache_dir: engines and timing cache (default
    ~/.cache/mcsmoe-deploy/tensorrt, or $MCSMOE_CACHE_DIR/tensorrt); plugin_libraries:
    shared libraries to load into the plugin registry; workspace_gb: builder workspace
    limit; rebuild: ignore a cached engine; verbose: TensorRT's verbose log.
    """

    backend = "trt"

    def __init__(self, path: str | Path, precision: str = "fp16", max_batch: int = 8, max_seq: int = 512,
                 max_past: int = 2048, cache_dir: str | Path | None = None, device: int = 0,
                 plugin_libraries: tuple[str | Path, ...] = (), workspace_gb: float | None = None,
                 rebuild: bool = False, verbose: bool = False):
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise UserError("the trt backend needs a CUDA GPU, and torch here sees none")
        self.path, self.precision = Path(path), precision
        self.device = torch.device("cuda", device)
        self.geometry, self.vocab_size = geometry_from_graph(self.path)
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")  # TensorRT's own plugins (ScatterElements with reduction)
        for library in plugin_libraries:
            trt.get_plugin_registry().load_library(str(library))
        self.use_plugin = moe_plugin_registered(trt)
        inputs = [i.name for i in read_graph(self.path).graph.input]
        self.profiles = decoder_profiles(inputs, self.geometry, max_batch, max_seq, max_past)
        self.device_info = DeviceInfo.current(device)
        workspace = int(workspace_gb * 2**30) if workspace_gb else None
        key = engine_cache_key(self.path, trt.__version__, self.device_info, precision, self.profiles,
                               {"plugin": self.use_plugin, "workspace": workspace})
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.engine_path = engine_path(cache_dir, self.path, key)
        if rebuild or not self.engine_path.exists():
            with tempfile.TemporaryDirectory(prefix="mcsmoe-trt-") as scratch:
                prepared = prepare_for_tensorrt(self.path, Path(scratch) / "prepared.onnx", plugin=self.use_plugin)
                timing = cache_dir / f"timing-{trt.__version__}-{self.device_info.slug}.cache"
                plan = build_engine(trt, self.logger, prepared.path, self.profiles, precision, self.use_plugin,
                                    workspace, timing)
            write_atomic(self.engine_path, plan)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise UserError(f"TensorRT cannot load {self.engine_path} (delete it to rebuild)")
            self.stream = torch.cuda.Stream(self.device)
            self.contexts = []
            for index in range(len(self.profiles)):
                context = self.engine.create_execution_context()
                context.set_optimization_profile_async(index, self.stream.cuda_stream)
                self.contexts.append(context)
            # TensorRT gets a valid address for empty tensors (a prefill's zero-length past)
            self._placeholder = torch.empty(256, dtype=torch.uint8, device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.past_names = [n for n in self.input_names if n.startswith(PAST_PREFIX)]
        self.present_names = [n for n in self.output_names if n.startswith(PRESENT_PREFIX)]
        self.dtypes = {n: getattr(torch, TORCH_DTYPES[self.engine.get_tensor_dtype(n).name]) for n in names}

    def empty_past(self, batch: int) -> list:
        import torch

        g = self.geometry
        return [torch.zeros((batch, g.kv_heads, 0, g.head_dim), dtype=self.dtypes[n], device=self.device)
                for n in self.past_names]

    def step(self, input_ids, attention_mask, position_ids, past: Any) -> StepOutput:
        import torch

        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            tensors = {n: torch.as_tensor(np.ascontiguousarray(feeds[n]), device=self.device).to(self.dtypes[n])
                       for n in self.input_names if n in feeds}
            for name, value in zip(self.past_names, past):
                tensors[name] = torch.as_tensor(value, device=self.device).to(self.dtypes[name]).contiguous()
            profile = choose_profile(self.profiles, {n: tuple(t.shape) for n, t in tensors.items()})
            context = self.contexts[profile]
            for name, tensor in tensors.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, self._address(tensor))
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                if min(shape, default=0) < 0:
                    raise RuntimeError(f"TensorRT left the shape of {name} unresolved: {shape}")
                tensors[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                context.set_tensor_address(name, self._address(tensors[name]))
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT failed to run the step (see its log)")
            logits = tensors["logits"].float().cpu().numpy()  # waits for the stream
        return StepOutput(logits, [tensors[n] for n in self.present_names])

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()

    def describe(self) -> dict:
        import tensorrt

        return {"backend": self.backend, "tensorrt": tensorrt.__version__, "device": self.device_info.name,
                "precision": self.precision, "plugin": self.use_plugin, "engine": str(self.engine_path),
                "profiles": [p.name for p in self.profiles], "path": str(self.path)}

    def close(self) -> None:
        self.contexts.clear()
        del self.engine, self.runtime


__all__ = [
    "DeviceInfo", "NOT_INSTALLED", "OptimizationProfile", "PRECISIONS", "ShapeRange", "TrtDecoderSession",
    "build_engine", "choose_profile", "decoder_profiles", "default_cache_dir", "engine_cache_key", "engine_path",
    "import_tensorrt", "moe_plugin_registered", "network_typing",
]
