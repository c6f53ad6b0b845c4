"""The benchmark peer: onnxruntime-genai's model builder on Mixtral-family checkpoints, run with plain onnxruntime.

onnxruntime-genai is a benchmark/test-only dependency: nothing in `mcsmoe_deploy` imports it.

Building. onnxruntime-genai 0.18's builder (`onnxruntime_genai.models.builder.create_model`) does not
dispatch `MixtralForCausalLM`. A Mixtral decoder is the builder's Mistral decoder (GroupQueryAttention,
SkipSimplifiedLayerNorm, rotary embedding) whose MLP is a routed-expert block with no shared expert,
which the builder's Qwen3.5-MoE code already emits as one `com.microsoft.MoE` node (fp32) or `QMoE`
node (int4, blocks of 32). `_mixtral_builder_class` is that ~30-line adapter; `build_genai_peer`
runs the builder in a child process (the builder appends its own folder to `sys.path`, prints a lot
and holds the whole torch model: a child keeps all that out of the caller).

Running. `GenaiPeerSession` runs the builder's `model.onnx` in a plain `onnxruntime.InferenceSession`
with the project's decoder-step interface (`empty_past`, `step`; see
`mcsmoe_deploy.runtime.session.DecoderSession`) for parity checks; `open_peer_lm` hands the same
graph to `benchmarks._latency`, so the peer is timed by the same loops as our graphs.

What the int4 peer is (the builder's CPU defaults): every MatMul becomes MatMulNBits (attention,
the routers too, and the head), tied embeddings become GatherBlockQuantized, experts become QMoE;
symmetric round-to-nearest, blocks of 32, accuracy_level 4 (int8 activations in MatMulNBits). QMoE
uses MLAS's 4-bit GEMMs only when each expert input size is a multiple of the block: the embedded
model's intermediate size 144 is not, so its down projections fall back to dequantize + SGEMM
(onnxruntime warns at session start).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:  # the project's decoder-step interface; mirrored below if the runtime package does not import
    from mcsmoe_deploy.runtime.session import DecoderSession, KVGeometry, StepOutput
except ImportError:  # pragma: no cover - only while mcsmoe_deploy.runtime is being reworked
    from typing import NamedTuple

    class KVGeometry(NamedTuple):  # type: ignore[no-redef]
        num_layers: int
        kv_heads: int
        head_dim: int

    class StepOutput(NamedTuple):  # type: ignore[no-redef]
        logits: np.ndarray
        past: Any

    class DecoderSession:  # type: ignore[no-redef]
        backend = ""
        vocab_size = 0

        def describe(self) -> dict:
            return {"backend": self.backend}

        def close(self) -> None:
            pass


PRECISIONS = ("fp32", "int4")
MODEL_FILE = "model.onnx"


# ---------------------------------------------------------------------------------------------
# Building (everything that touches onnxruntime_genai runs in the child process)
# ---------------------------------------------------------------------------------------------


def _mixtral_builder_class():
    """The builder's `MistralModel` with Mixtral's routed experts (defined lazily: needs onnxruntime_genai).

    Each override, and why:
    - `__init__`: the MoE op attributes for Mixtral. SwiGLU experts (silu(gate) * up), gate/up rows
      interleaved (`swiglu_fusion=1`, the layout `make_interleaved_swiglu_moe_preprocessing` writes),
      routing = softmax over all experts, top-k, renormalised over the k (`normalize_routing_weights`),
      exactly `MixtralTopKRouter`. `moe_intermediate_size` is what that preprocessing sizes the (zero)
      expert biases with; Mixtral calls it `intermediate_size`.
    - `get_moe_module`: transformers' Mixtral keeps the MoE block at `layer.mlp` (the builder's default
      is `layer.moe`).
    - `make_moe_preprocessing`, `make_moe_router`: taken from the builder's Qwen3.5-MoE decoder, whose
      expert storage (`mlp.experts.gate_up_proj` [E, 2I, H], gate first; `down_proj` [E, H, I]) and
      router (`mlp.gate.weight` [E, H], a bias-free linear) are Mixtral's in transformers 5.
    - `make_moe_subgraph`: Qwen3.5-MoE's without its shared expert and sigmoid-gated add: the MoE
      node's output is the block's output and the next SkipSimplifiedLayerNorm's skip input.
    """
    from onnxruntime_genai.models.builders.mistral import MistralModel
    from onnxruntime_genai.models.builders.qwen import Qwen35MoETextModel

    class MixtralPeerModel(MistralModel):
        def __init__(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options):
            super().__init__(config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
            self.moe_attrs["activation_type"] = "swiglu"
            self.moe_attrs["swiglu_fusion"] = 1
            self.moe_attrs["normalize_routing_weights"] = True
            self.moe_intermediate_size = config.intermediate_size

        def get_moe_module(self, layer_id, layer):
            return layer.mlp

        make_moe_preprocessing = Qwen35MoETextModel.make_moe_preprocessing
        make_moe_router = Qwen35MoETextModel.make_moe_router

        def make_moe_subgraph(self, layer_id, moe, root_input):
            basename = f"/model/layers.{layer_id}/moe"
            quantized = self.moe_attrs["op_type"] == "QMoE"
            names = self.make_moe_expert_names(layer_id)
            moe_name = f"{basename}/{self.moe_attrs['op_type']}"
            self.make_moe_op(
                moe_name,
                root_input=root_input,
                router_probs=f"{basename}/router/Reshape/output_0",
                weight1=names["gate_up_weight"],
                scales1=names["gate_up_scales"] if quantized else "",
                bias1=names["gate_up_bias"],
                weight2=names["down_weight"],
                scales2=names["down_scales"] if quantized else "",
                bias2=names["down_bias"],
            )
            self.layernorm_attrs["skip_input"] = f"{moe_name}/output_0"
            return f"{moe_name}/output_0"

    return MixtralPeerModel


def _build_here(model_dir: str, out_dir: str, precision: str, block_size: int, cache_dir: str,
                extra_options: list[str]) -> None:
    """Run the builder in this process with Mixtral dispatched to the adapter (the child's entry point).

    `create_model` picks the builder class by `config.architectures[0]`. We route Mixtral through its
    `MistralForCausalLM` branch with `MistralModel` swapped for the adapter, so the rest of
    `create_model` (dtypes, int4 post-pass, genai_config, tokenizer files) runs unchanged. The
    renamed architecture also gives genai_config the model type "mistral", a decoder the
    onnxruntime-genai runtime knows. The weights are still loaded from `model_dir` by
    `AutoModelForCausalLM`, i.e. as `MixtralForCausalLM`.
    """
    from onnxruntime_genai.models import builder

    # RTN int4 (the builder's default quantizer, no calibration) for MatMuls (MatMulNBits) and experts (QMoE)
    options = [f"block_size={block_size}", f"qmoe_block_size={block_size}"] if precision == "int4" else []
    options += list(extra_options)
    extra = builder.parse_extra_options(None, model_dir, out_dir, precision, "cpu", cache_dir, options)
    hf_config = extra["hf_details"]["hf_config"]
    hf_config.architectures = ["MistralForCausalLM"]
    builder.MistralModel = _mixtral_builder_class()
    builder.create_model(None, model_dir, out_dir, precision, "cpu", cache_dir, **extra)


def build_genai_peer(model_dir: str | Path, out_dir: str | Path, precision: str = "fp32", block_size: int = 32,
                     extra_options: tuple[str, ...] = ()) -> Path:
    """Build onnxruntime-genai's CPU graph of a Mixtral checkpoint into `out_dir`; returns `out_dir`.

    `out_dir` gets the builder's folder: `model.onnx` (+ `model.onnx.data`), `genai_config.json`
    and the tokenizer files. precision "fp32": MatMul + `com.microsoft.MoE`; "int4":
    `MatMulNBits` + `QMoE`, round-to-nearest, blocks of `block_size`, the builder's CPU defaults
    otherwise (symmetric, accuracy_level 4). `extra_options`: more of the builder's KEY=VALUE
    options (its `--extra_options`), for experiments. The builder runs in a child process (see the module
    docstring); its output is shown only if it fails.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or [None]
    if architectures[0] != "MixtralForCausalLM":
        raise ValueError(f"{model_dir} is a {architectures[0]} checkpoint; the peer adapter covers MixtralForCausalLM")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir / ".builder_cache"  # the builder's scratch space for external data
    code = (
        "import sys; from benchmarks._genai_peer import _build_here; "
        "_build_here(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6:])"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(out_dir), precision, str(block_size), str(cache_dir),
         *extra_options],
        cwd=root, env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                           f"{done.stderr[-4000:]}")
    shutil.rmtree(cache_dir, ignore_errors=True)
    if not (out_dir / MODEL_FILE).is_file():
        raise RuntimeError(f"the builder wrote no {MODEL_FILE} in {out_dir}")
    return out_dir


def folder_bytes(folder: str | Path, pattern: str = "model.onnx*") -> int:
    """Bytes on disk of the files in `folder` matching `pattern` (default: the graph and its external data)."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())


# ---------------------------------------------------------------------------------------------
# Running the builder's graph with plain onnxruntime
# ---------------------------------------------------------------------------------------------

def peer_geometry(folder: str | Path) -> tuple[KVGeometry, int]:
    """KV geometry and vocabulary size of a builder folder, from its genai_config.json."""
    model = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
    decoder = model["decoder"]
    geometry = KVGeometry(decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"])
    return geometry, int(model["vocab_size"])


def peer_session_options(threads: int | None = 2):
    """CPU session options for the peer: `threads` intra-op threads, sequential, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class GenaiPeerSession(DecoderSession):
    """The builder's `model.onnx` in an `onnxruntime.InferenceSession`, as a decoder step.

    The graph's I/O (read from the session, checked here): `input_ids` [B, S], `attention_mask`
    [B, P + S] (int64), `past_key_values.{i}.key|value` [B, kv_heads, P, head_dim]; outputs
    `logits` [B, S, V] and `present.{i}.key|value` [B, kv_heads, P + S, head_dim].
    GroupQueryAttention runs in its non-shared-buffer mode here (a present is the past plus the new
    tokens, as in our graphs), not the fixed-size buffer that the genai runtime preallocates.

    There is no `position_ids` input: GroupQueryAttention derives each new token's rotary position
    from the mask (row total length minus the new tokens), so `position_ids` is accepted for the
    interface and ignored. That equals transformers' positions only for unpadded rows: this class is
    for batch-1 / equal-length measurement, which is all the benchmark does.
    """

    backend = "ort-genai-builder"

    def __init__(self, folder: str | Path, threads: int | None = 2, options=None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.geometry, self.vocab_size = peer_geometry(self.folder)
        self.threads = threads
        self.session = ort.InferenceSession(
            str(self.folder / MODEL_FILE), options or peer_session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        expected = {f"past_key_values.{i}.{k}" for i in range(self.geometry.num_layers) for k in ("key", "value")}
        if set(self.past_names) != expected or not {"input_ids", "attention_mask"} <= set(self.input_names):
            raise ValueError(f"unexpected builder graph inputs: {self.input_names}")

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length caches, one per past input."""
        g = self.geometry
        empty = np.zeros((batch, g.kv_heads, 0, g.head_dim), dtype=np.float32)
        return {name: empty for name in self.past_names}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None,
             past: dict[str, np.ndarray]) -> StepOutput:
        """Run S new tokens after `past`; `position_ids` is ignored (see the class docstring)."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64), **past}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        new_past = {"past_key_values." + name.removeprefix("present."): value
                    for name, value in outputs.items() if name.startswith("present.")}
        return StepOutput(np.asarray(outputs["logits"], dtype=np.float32), new_past)

    def describe(self) -> dict:
        return {"backend": self.backend, "provider": "CPUExecutionProvider", "threads": self.threads,
                "folder": str(self.folder)}

    def close(self) -> None:
        self.session = None


def greedy_tokens(session: DecoderSession, prompt: list[int] | np.ndarray, new_tokens: int) -> list[int]:
    """Greedy decoding of `new_tokens` tokens after `prompt` (batch 1), through the runtime's one decode loop."""
    from mcsmoe_deploy.runtime import GenerationConfig, generate

    ids = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
    return generate(session, ids, GenerationConfig(max_new_tokens=new_tokens)).tokens[0]


def open_peer_lm(name: str, folder: str | Path, options):
    """The builder's graph as a `benchmarks._latency.ExportedLM`, timed by the same loops as our graphs.

    Our graphs and the builder's share the cache layout and names; `_latency` builds feeds from the
    session's own input list, so the missing `position_ids` needs nothing special.
    """
    from benchmarks._latency import open_ours

    geometry, _ = peer_geometry(folder)
    return open_ours(name, Path(folder) / MODEL_FILE, geometry.num_layers, geometry.kv_heads, geometry.head_dim,
                     options)


# ---------------------------------------------------------------------------------------------
# One measurement: bytes on disk and decode p50 of the fp32 and int4 peers, in one run
# ---------------------------------------------------------------------------------------------


def decode_ms(folders: dict[str, Path], threads: int = 2, steps: int = 32, rounds: int = 3, spin: bool = True,
              prompt_length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Milliseconds of each decode step (batch 1) of each folder's graph, timed in alternating rounds.

    Each graph gets an untimed warm-up (a prefill and 4 steps); then `rounds` rounds in which every
    graph decodes `steps` greedy tokens after an untimed prefill (`_latency.timed_rounds`). Alternating
    rounds expose all contestants to the same load on a shared machine, so their ratios are what to read.
    spin: onnxruntime's idle threads spin (its default); False makes them sleep, kinder to a busy machine.
    """
    from benchmarks._latency import random_prompt, session_options, timed_rounds

    lms = {name: open_peer_lm(name, folder, session_options(threads, spin)) for name, folder in folders.items()}
    vocab = min(peer_geometry(folder)[1] for folder in folders.values())
    samples, _ = timed_rounds(lms, rounds, random_prompt(prompt_length, vocab, seed), steps)
    return {name: 1000 * np.asarray(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    """Build the fp32 and int4 peers of a Mixtral checkpoint (unless present) and print bytes and decode p50."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model_dir", type=Path, help="a MixtralForCausalLM checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="gets fp32/ and int4/ builder folders")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-spin", action="store_true", help="idle onnxruntime threads sleep instead of spinning")
    args = parser.parse_args(argv)
    folders = {}
    for precision in PRECISIONS:
        folder = args.out_dir / precision
        if not (folder / MODEL_FILE).is_file():
            build_genai_peer(args.model_dir, folder, precision)
        folders[f"builder-{precision}"] = folder
    times = decode_ms(folders, args.threads, args.steps, args.rounds, spin=not args.no_spin)
    p50 = {name: float(np.median(values)) for name, values in times.items()}
    checkpoint = folder_bytes(args.model_dir, "*.safetensors")
    print(f"checkpoint {args.model_dir}: {checkpoint / 1e6:.1f} MB safetensors; {args.threads} threads, batch 1, "
          f"{args.rounds} x {args.steps} decode steps, spin {not args.no_spin}, load average {os.getloadavg()[0]:.1f}")
    base = p50["builder-fp32"]
    for name, folder in folders.items():
        print(f"{name:13s} on disk {folder_bytes(folder) / 1e6:8.2f} MB   decode p50 {p50[name]:7.3f} ms/token "
              f"({p50[name] / base:.2f}x fp32), min {times[name].min():.3f} ms")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
    main()
