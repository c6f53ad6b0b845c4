"""Building and caching TensorRT engines of KV-cache graphs: optimisation profiles, cache key, builder. UNVERIFIED.

Written against the TensorRT 10 Python API (with the TensorRT 11 removals guarded) but never
run: TensorRT cannot be installed on the machines this was written on and needs an NVIDIA
GPU. What needs no TensorRT is tested: the optimisation profiles, the engine cache key and
the precision / typing choice. The session that runs an engine is trt_session.

Engine: two optimisation profiles (see `decoder_profiles`): 0 "general" covers every step
up to (max_batch, max_seq new tokens, max_past cached tokens) and is tuned for a prefill;
1 "decode" covers one new token and is tuned for decoding. Engines are cached under a key of
everything that changes them (`engine_cache_key`); the timing cache is kept beside them.

Precision: fp32 builds a strongly typed network with TF32 off. fp16 / bf16 of a float32
graph use the builder flags of TensorRT 10 (weakly typed: TensorRT picks per layer; inputs
and outputs, the KV cache included, stay float32). TensorRT 11 removed those flags: there
a float16 / bfloat16 graph is needed for fp16 / bf16.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..contract import DOMAIN as OP_DOMAIN
from ..contract import OP_TYPE, PAST_PREFIX, KVGeometry
from ..errors import UserError
from ..files import write_file_atomically
from .trt_graph import graph_float_type, onnx_model_files

PRECISIONS = ("fp32", "fp16", "bf16")
NOT_INSTALLED = "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU); the trt backend is unverified"


def import_tensorrt():
    """The `tensorrt` module, or a UserError saying it is missing (imported only when asked for)."""
    try:
        import tensorrt
    except ImportError:
        raise UserError(NOT_INSTALLED) from None
    return tensorrt


# ---------------------------------------------------------------------------------------------
# optimisation profiles


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shape of one input in an optimisation profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"ranks differ: {self}")
        if not all(lo <= o <= hi for lo, o, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"need min <= opt <= max per dimension: {self}")

    def covers(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))


@dataclass(frozen=True)
class OptimizationProfile:
    """Shape ranges of every input of the graph, by input name."""

    name: str
    shapes: dict[str, ShapeRange]

    def covers(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(self.shapes[name].covers(tuple(shape)) for name, shape in shapes.items())


def decoder_profiles(input_names: list[str], geometry: KVGeometry, max_batch: int, max_seq: int, max_past: int,
                     opt_batch: int | None = None) -> list[OptimizationProfile]:
    """The two profiles of a KV-cache decoder engine.

    max_seq: most new tokens in one step (the longest prompt); max_past: most cached tokens
    before a step. 0 "general": B in [1, max_batch], S in [1, max_seq], P in [0, max_past];
    opt is a prefill (S = max_seq // 2, P = 0). 1 "decode": S = 1, P in [0, max_past]; opt
    P = max_past // 2, the mean over a generation whose cache grows from 0 to max_past.
    opt batch: `opt_batch`, default max_batch (steps are batched when serving).
    """
    if min(max_batch, max_seq) < 1 or max_past < 0:
        raise UserError(f"need max_batch >= 1, max_seq >= 1, max_past >= 0 (got {max_batch}, {max_seq}, {max_past})")
    b = max_batch if opt_batch is None else opt_batch
    kv, hd = geometry.kv_heads, geometry.head_dim

    def profile(name: str, seq: tuple[int, int, int], past: tuple[int, int, int]) -> OptimizationProfile:
        batch = (1, b, max_batch)
        token = ShapeRange(*((n, s) for n, s in zip(batch, seq)))
        shapes = {"input_ids": token, "position_ids": token,
                  "attention_mask": ShapeRange(*((n, max(1, p + s)) for n, p, s in zip(batch, past, seq)))}
        cache = ShapeRange(*((n, kv, p, hd) for n, p in zip(batch, past)))
        shapes.update({name: cache for name in input_names if name.startswith(PAST_PREFIX)})
        unknown = set(input_names) - set(shapes)
        if unknown:
            raise UserError(f"the graph has inputs a KV-cache decoder does not: {', '.join(sorted(unknown))}")
        return OptimizationProfile(name, {k: v for k, v in shapes.items() if k in input_names})

    return [profile("general", (1, max(1, max_seq // 2), max_seq), (0, 0, max_past)),
            profile("decode", (1, 1, 1), (0, max_past // 2, max_past))]


def choose_profile(profiles: list[OptimizationProfile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the profile (from `decoder_profiles`) to run a step with these input shapes on:
    "decode" for one new token, else "general"; a UserError when none covers them."""
    order = (1, 0) if shapes["input_ids"][1] == 1 else (0,)
    for index in order:
        if profiles[index].covers(shapes):
            return index
    limits = profiles[0].shapes["attention_mask"].max
    raise UserError(f"a step of shape {tuple(shapes['attention_mask'])} (batch, cached + new tokens) is outside the "
                    f"engine's limits {limits}; open the session with larger max_batch / max_seq / max_past")


# ---------------------------------------------------------------------------------------------
# engine cache


@dataclass(frozen=True)
class DeviceInfo:
    """What a TensorRT engine is specific to on the device side."""

    name: str
    compute_capability: tuple[int, int]

    @classmethod
    def current(cls, index: int = 0) -> DeviceInfo:
        import torch

        return cls(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))

    @property
    def slug(self) -> str:
        major, minor = self.compute_capability
        return "".join(c if c.isalnum() else "-" for c in self.name).lower() + f"-sm{major}{minor}"


def engine_cache_key(onnx_path: str | Path, tensorrt_version: str, device: DeviceInfo, precision: str,
                     profiles: list[OptimizationProfile], options: dict[str, Any] | None = None) -> str:
    """sha256 (hex) of what an engine depends on: the ONNX bytes (graph and external data
    files), the TensorRT version, the GPU, the precision, the profiles and `options`
    (plugin use, workspace, ...; JSON-serialisable). The model's bytes are read in full."""
    digest = hashlib.sha256()
    for path in onnx_model_files(onnx_path):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    facts = {"tensorrt": tensorrt_version, "device": asdict(device), "precision": precision,
             "profiles": [asdict(p) for p in profiles], "options": options or {}}
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return digest.hexdigest()


def engine_path(cache_dir: str | Path, onnx_path: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{Path(onnx_path).stem}.{key[:24]}.plan"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MCSMOE_CACHE_DIR", Path.home() / ".cache" / "mcsmoe-deploy")) / "tensorrt"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` (parents created) so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, data)


# ---------------------------------------------------------------------------------------------
# building


def network_typing(precision: str, graph_type: str, has_weak_typing: bool) -> tuple[bool, list[str]]:
    """(strongly typed network?, BuilderFlag names to set) for `precision` on a graph whose
    floats are `graph_type` ("fp32" | "fp16" | "bf16"); `has_weak_typing`: the TensorRT
    here still has BuilderFlag.FP16 (TensorRT 10; removed in 11)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if precision == graph_type:
        return True, []
    if graph_type != "fp32":
        raise UserError(f"the graph is {graph_type}; build it with precision={graph_type!r}")
    if not has_weak_typing:
        raise UserError(f"this TensorRT builds strongly typed networks only (no BuilderFlag.FP16): for {precision} "
                        "export a float16/bfloat16 graph, or use precision='fp32'")
    return False, [precision.upper()]


def build_engine(trt, logger, onnx_path: Path, profiles: list[OptimizationProfile], precision: str,
                 use_plugin: bool, workspace_bytes: int | None, timing_cache: Path | None) -> bytes:
    """Parse `onnx_path` (prepared by trt_graph) and build a serialized engine."""
    strongly_typed, flags = network_typing(precision, graph_float_type(onnx_path), hasattr(trt.BuilderFlag, "FP16"))
    builder = trt.Builder(logger)
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(typed_flag) if strongly_typed and typed_flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if use_plugin and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        error = parser.get_error(0)
        node = getattr(error, "node_name", lambda: "")()
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {error.desc()}" + (f" (node {node})" if node else ""))
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 is asked for to match the reference
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, shapes in profile.shapes.items():
            trt_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
        config.add_optimization_profile(trt_profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine for {onnx_path.name} (see its log above)")
    if cache is not None:
        write_atomic(timing_cache, bytes(memoryview(cache.serialize())))
    return bytes(memoryview(plan))


def moe_plugin_registered(trt) -> bool:
    """Whether a plugin creator GroupedLowRankMoE is registered in namespace ai.mcsmoe."""
    registry = trt.get_plugin_registry()
    creators = getattr(registry, "all_creators", None) or registry.plugin_creator_list
    return any(c.name == OP_TYPE and c.plugin_namespace == OP_DOMAIN for c in creators)


__all__ = [
    "DeviceInfo", "NOT_INSTALLED", "OptimizationProfile", "PRECISIONS", "ShapeRange", "build_engine",
    "choose_profile", "decoder_profiles", "default_cache_dir", "engine_cache_key", "engine_path", "import_tensorrt",
    "moe_plugin_registered", "network_typing", "write_atomic",
]
