"""onnxruntime backend: a KV-cache graph from `mcsmoe export`, on CPU or CUDA.

On CUDA the cache stays on the device between steps through I/O binding (presents are
bound as outputs on the device and fed back as the next step's pasts); only logits come
to the host. The CUDA path is written against onnxruntime's documented API but is
unverified here: no GPU and no onnxruntime-gpu on these machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..contract import PAST_PREFIX, PRESENT_PREFIX, geometry_from_graph
from .session import DecoderSession, StepOutput

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def choose_providers(provider: str | None = None) -> list[str]:
    """onnxruntime providers to use: `provider` ("cpu", "cuda"), or CUDA when available, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider in (None, "auto"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    name = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(provider)
    if name is None:
        raise UserError(f"unknown provider {provider!r}; one of cpu, cuda, auto")
    if name not in available:
        raise UserError(f"onnxruntime here has no {name} (available: {', '.join(available)}); "
                        "install onnxruntime-gpu for cuda")
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def session_options(threads: int | None = None, opt_level: str = "all", optimized_model_path: str | Path | None = None):
    """SessionOptions: intra-op threads (None: onnxruntime's default), graph optimisation level, and
    where to save the optimised graph (None: not saved)."""
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise UserError(f"unknown optimisation level {opt_level!r}; one of {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # nodes run one after another (sequential execution): no second pool
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


class OrtDecoderSession(DecoderSession):
    """A KV-cache graph in onnxruntime.

    provider: "cpu", "cuda" or None/"auto"; threads: intra-op threads; opt_level:
    disable | basic | extended | all; optimized_model_path: also save the optimised graph.
    """

    backend = "ort"

    def __init__(self, path: str | Path, provider: str | None = None, threads: int | None = None,
                 opt_level: str = "all", optimized_model_path: str | Path | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.geometry, self.vocab_size = geometry_from_graph(self.path)
        self.providers = choose_providers(provider)
        self.threads, self.opt_level = threads, opt_level
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads, opt_level, optimized_model_path), providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise UserError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self.on_device = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith(PRESENT_PREFIX)]
        self.has_positions = "position_ids" in {i.name for i in self.session.get_inputs()}
        self.dtype = np.float16 if self.session.get_inputs()[-1].type == "tensor(float16)" else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        g = self.geometry
        empty = np.zeros((batch, g.kv_heads, 0, g.head_dim), dtype=self.dtype)
        return [empty] * len(self.past_names)

    def _feeds(self, input_ids, attention_mask, position_ids) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        if self.has_positions:
            feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        return feeds

    def step(self, input_ids, attention_mask, position_ids, past: Any) -> StepOutput:
        import onnxruntime as ort

        feeds = self._feeds(input_ids, attention_mask, position_ids)
        if self.on_device:
            return self._step_bound(feeds, past)
        # the cache stays in onnxruntime's OrtValues from one step to the next: no copy of it per step
        values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feeds.items()}
        for name, value in zip(self.past_names, past):
            values[name] = value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
        logits, *presents = self.session.run_with_ort_values(["logits", *self.present_names], values)
        return StepOutput(logits.numpy().astype(np.float32, copy=False), presents)

    def _step_bound(self, feeds: dict[str, np.ndarray], past: list) -> StepOutput:
        # I/O binding: pasts and presents stay on the GPU (OrtValues); unverified, see module docstring
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return StepOutput(outputs[0].numpy().astype(np.float32, copy=False), outputs[1:])

    def describe(self) -> dict:
        return {"backend": self.backend, "provider": self.session.get_providers()[0], "threads": self.threads,
                "opt_level": self.opt_level, "path": str(self.path)}

    def close(self) -> None:
        del self.session


__all__ = ["OPT_LEVELS", "OrtDecoderSession", "choose_providers", "geometry_from_graph", "session_options"]
