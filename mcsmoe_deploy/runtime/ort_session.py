"""onnxruntime backend: a KV-cache graph from `mcsmoe export`, on CPU or CUDA; Switch's two graphs.

On CUDA the cache stays on the device between steps through I/O binding (presents are
bound as outputs on the device and fed back as the next step's pasts); only logits come
to the host. The CUDA path is written against onnxruntime's documented API but is
unverified here: no GPU and no onnxruntime-gpu on these machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..contract import (
    ATTENTION_MASK,
    DECODER_FILE,
    ENCODER_ATTENTION_MASK,
    ENCODER_FILE,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LOGITS,
    PADDING_SIDE,
    PAST_PREFIX,
    POSITION_IDS,
    PRESENT_PREFIX,
    KVGeometry,
    geometry_from_graph,
    past_name,
    read_graph,
)
from ..errors import UserError
from .session import DecoderSession, EncoderOutput, Seq2SeqSession, StepOutput

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


def load_session(path: Path, provider: str | None, options):
    """An onnxruntime InferenceSession of `path` on `provider` (see `choose_providers`); one error line if it fails."""
    import onnxruntime as ort

    providers = choose_providers(provider)
    # one clear line for a file that is not a graph, or external data outside its folder
    header = read_graph(path, weight_bytes=False)
    model = _with_accuracy_level(path, header, _config_entry(options, MATMUL_ACCURACY_KEY))
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
        raise UserError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


def _config_entry(options, key: str) -> str | None:
    """A session config entry of `options`, None when unset (onnxruntime raises for a missing key)."""
    try:
        return options.get_session_config_entry(key)
    except Exception:  # onnxruntime's own Fail type: "does not have configuration with key"
        return None


def _with_accuracy_level(path: Path, header, level: str | None) -> str | bytes:
    """What InferenceSession should load: `path`, or, when the session asks for accuracy `level` and the
    graph holds quantized kernels (MatMulNBits, QMoE) written at another (target ort writes them, see
    exporters/passes/matmul_nbits.py and ort_qmoe.py; the session entry only reaches MatMulNBits nodes
    onnxruntime fuses itself), the graph's bytes with their `accuracy_level` set to `level`. Parity checks
    use this (level 0); it holds the weights in Python once more while the session loads."""
    import onnx

    if level is None or all(written_accuracy_level(n) == int(level) for n in quantized_kernels(header.graph)):
        return str(path)
    model = onnx.load(str(path))
    for node in quantized_kernels(model.graph):
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", int(level))])
    return model.SerializeToString()


# the com.microsoft kernels of quantized weights that take an `accuracy_level` attribute
QUANTIZED_KERNELS = ("MatMulNBits", "QMoE")


def quantized_kernels(graph) -> list:
    """The nodes of an onnx GraphProto (top level) that are onnxruntime's quantized kernels (QUANTIZED_KERNELS)."""
    return [n for n in graph.node if n.op_type in QUANTIZED_KERNELS and n.domain == "com.microsoft"]


def written_accuracy_level(node) -> int:
    """The `accuracy_level` a quantized kernel node holds; an unset attribute is onnxruntime's 0."""
    return next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
# onnxruntime's DequantizeLinear + MatMul -> MatMulNBits fusion picks this compute accuracy by default:
# 4 (int8-quantized activations, ~0.5% relative error); 0 computes in float32 (exact up to rounding)
MATMUL_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
INITIALIZERS_OUTSIDE_ARENA_KEY = "session.use_device_allocator_for_initializers"


def session_options(threads: int | None = None, opt_level: str = "all", optimized_model_path: str | Path | None = None,
                    matmul_accuracy_level: int | None = None):
    """SessionOptions: intra-op threads (None: onnxruntime's default), graph optimisation level,
    where to save the optimised graph (None: not saved), and the accuracy level of quantized kernels
    (None: as the graph says, and onnxruntime's default 4 for the MatMulNBits it fuses itself; 0: float32
    compute, what parity checks use; `load_session` rewrites MatMulNBits and QMoE nodes written at another).
    Initializers are allocated outside the CPU arena (benchmarks/results/session-memory.md)."""
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise UserError(f"unknown optimisation level {opt_level!r}; one of {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # nodes run one after another (sequential execution): no second pool
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    # weights the graph file holds get their own allocations, not the arena's power-of-two chunks: a one-file
    # int4 graph's session otherwise peaks at 2.8x its bytes in about one run of two (2.2x with this)
    options.add_session_config_entry(INITIALIZERS_OUTSIDE_ARENA_KEY, "1")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if matmul_accuracy_level is not None:
        options.add_session_config_entry(MATMUL_ACCURACY_KEY, str(int(matmul_accuracy_level)))
    return options


class OrtDecoderSession(DecoderSession):
    """A KV-cache graph in onnxruntime.

    provider: "cpu", "cuda" or None/"auto"; threads: intra-op threads; opt_level:
    disable | basic | extended | all; optimized_model_path: also save the optimised graph;
    matmul_accuracy_level: compute accuracy of the quantized kernels (MatMulNBits, QMoE; None: as
    written, 4 by default, int8 activations, fastest; 0: float32, exact parity with load_compressed).
    """

    backend = "ort"

    def __init__(self, path: str | Path, provider: str | None = None, threads: int | None = None,
                 opt_level: str = "all", optimized_model_path: str | Path | None = None,
                 matmul_accuracy_level: int | None = None):
        self.path = Path(path)
        self.geometry, self.vocab_size = geometry_from_graph(self.path)
        self.threads, self.opt_level = threads, opt_level
        options = session_options(threads, opt_level, optimized_model_path, matmul_accuracy_level)
        self._attach(load_session(self.path, provider, options))

    @classmethod
    def from_inference_session(cls, session, geometry: KVGeometry) -> OrtDecoderSession:
        """Wrap an open onnxruntime InferenceSession of a KV-cache graph (its options are the caller's)."""
        wrapped = cls.__new__(cls)
        wrapped.path, wrapped.geometry, wrapped.threads, wrapped.opt_level = None, geometry, None, None
        logits = next(o for o in session.get_outputs() if o.name == LOGITS).shape
        wrapped.vocab_size = logits[-1] if isinstance(logits[-1], int) else 0
        wrapped._attach(session)
        return wrapped

    def _attach(self, session) -> None:
        self.session = session
        self.on_device = session.get_providers()[0] == "CUDAExecutionProvider"
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)]
        self.present_names = [o.name for o in session.get_outputs() if o.name.startswith(PRESENT_PREFIX)]
        self.has_positions = POSITION_IDS in {i.name for i in session.get_inputs()}
        self.padding_side = session.get_modelmeta().custom_metadata_map.get(PADDING_SIDE, "left")
        if self.padding_side not in ("left", "right"):
            raise UserError(f"{self.path or 'the graph'}: metadata {PADDING_SIDE} must be 'left' or 'right', "
                            f"not {self.padding_side!r}")
        self.dtype = np.float16 if session.get_inputs()[-1].type == "tensor(float16)" else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        g = self.geometry
        empty = np.zeros((batch, g.kv_heads, 0, g.head_dim), dtype=self.dtype)
        return [empty] * len(self.past_names)

    def _feeds(self, input_ids, attention_mask, position_ids) -> dict[str, np.ndarray]:
        feeds = {INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
                 ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype=np.int64)}
        if self.has_positions:
            feeds[POSITION_IDS] = np.ascontiguousarray(position_ids, dtype=np.int64)
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
        logits, *presents = self.session.run_with_ort_values([LOGITS, *self.present_names], values)
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
        binding.bind_output(LOGITS, "cpu")
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


class OrtSeq2SeqSession(Seq2SeqSession):
    """Switch's encoder.onnx and decoder.onnx (exporters/switch_export.py) in onnxruntime, on the host.

    provider / threads / opt_level as OrtDecoderSession (provider default cpu: the graphs are
    run with numpy feeds); decoder_start_token_id: the decoder's first token (the graphs do
    not record it; Switch's is 0); matmul_accuracy_level as OrtDecoderSession.
    """

    backend = "ort"

    def __init__(self, encoder_path: str | Path, decoder_path: str | Path, provider: str | None = "cpu",
                 threads: int | None = None, opt_level: str = "all", decoder_start_token_id: int = 0,
                 optimized_model_path: str | Path | None = None, matmul_accuracy_level: int | None = None):
        if optimized_model_path is not None:
            raise UserError("saving the optimised graph takes one ONNX file; an encoder-decoder export has two")
        options = session_options(threads, opt_level, matmul_accuracy_level=matmul_accuracy_level)
        self.paths = (Path(encoder_path), Path(decoder_path))
        self._attach(load_session(self.paths[0], provider, options), load_session(self.paths[1], provider, options))
        self.decoder_start_token_id = decoder_start_token_id

    @classmethod
    def from_folder(cls, folder: str | Path, **options) -> OrtSeq2SeqSession:
        """The two graphs of an export folder (ENCODER_FILE, DECODER_FILE)."""
        return cls(Path(folder) / ENCODER_FILE, Path(folder) / DECODER_FILE, **options)

    @classmethod
    def from_inference_sessions(cls, encoder, decoder, decoder_start_token_id: int = 0) -> OrtSeq2SeqSession:
        """Wrap two open onnxruntime InferenceSessions (their options are the caller's)."""
        wrapped = cls.__new__(cls)
        wrapped.paths, wrapped.decoder_start_token_id = None, decoder_start_token_id
        wrapped._attach(encoder, decoder)
        return wrapped

    def _attach(self, encoder, decoder) -> None:
        self.encoder, self.decoder_graph = encoder, decoder
        self.encoder_outputs = [o.name for o in encoder.get_outputs()]
        self.present_names = [o.name for o in decoder.get_outputs() if o.name.startswith(PRESENT_PREFIX)]
        self_past = next(i for i in decoder.get_inputs() if i.name == past_name(self.present_names[0]))
        self.heads, self.head_dim = self_past.shape[1], self_past.shape[3]  # static in the export
        self.dtype = np.float16 if self_past.type == "tensor(float16)" else np.float32
        logits = next(o for o in decoder.get_outputs() if o.name == LOGITS).shape
        self.vocab_size = logits[-1] if isinstance(logits[-1], int) else 0

    def encode(self, input_ids, attention_mask) -> EncoderOutput:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        encoded = dict(zip(self.encoder_outputs, self.encoder.run(self.encoder_outputs,
                                                                 {INPUT_IDS: ids, ATTENTION_MASK: mask})))
        cross = {past_name(n): v for n, v in encoded.items() if n.startswith(PRESENT_PREFIX)}
        return EncoderOutput(encoded[ENCODER_HIDDEN_STATES].astype(np.float32, copy=False), mask, cross)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.heads, 0, self.head_dim), dtype=self.dtype)] * len(self.present_names)

    def decode_step(self, input_ids, encoded: EncoderOutput, past) -> StepOutput:
        feeds = {INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
                 ENCODER_ATTENTION_MASK: encoded.attention_mask, **encoded.cross_past,
                 **{past_name(n): p for n, p in zip(self.present_names, past)}}
        logits, *presents = self.decoder_graph.run([LOGITS, *self.present_names], feeds)
        return StepOutput(logits.astype(np.float32, copy=False), presents)

    def describe(self) -> dict:
        return {"backend": self.backend, "provider": self.encoder.get_providers()[0],
                "paths": [str(p) for p in self.paths or ()]}

    def close(self) -> None:
        del self.encoder, self.decoder_graph


__all__ = ["OPT_LEVELS", "OrtDecoderSession", "OrtSeq2SeqSession", "choose_providers", "geometry_from_graph",
           "load_session", "session_options"]
