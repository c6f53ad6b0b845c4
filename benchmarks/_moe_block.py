"""One MoE block cut out of an exported graph, timed alone: what an MoE target changes, without attention.

`extract_first_block` keeps the subgraph from the first MoE block's hidden input and router logits to
its output (our GroupedLowRankMoE node and its function, or QMoE with the routing nodes before it);
`time_blocks` runs each such model on one token per call in alternating rounds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

ROUTING_MARK = "/qmoe_routing/"  # names of the routing nodes ort-qmoe puts before QMoE


def _block_io(model) -> tuple[list[str], list[str]]:
    """([hidden, router logits], [output]) value names of the first MoE block of `model` (an onnx.ModelProto)."""
    nodes = list(model.graph.node)
    block = next(n for n in nodes if n.domain == "ai.mcsmoe" or n.op_type == "QMoE")
    logits = block.input[1]
    producers = {out: n for n in nodes for out in n.output}
    while logits in producers and ROUTING_MARK in producers[logits].name:  # back to the router's logits
        logits = producers[logits].input[0]
    return [block.input[0], logits], [block.output[0]]


def extract_first_block(graph: Path, out: Path) -> Path:
    """A model of `graph`'s first MoE block alone (written once to `out`, weights inside)."""
    import onnx
    from onnx.utils import Extractor

    if not out.exists():
        model = onnx.load(str(graph))
        inputs, outputs = _block_io(model)
        onnx.save(Extractor(model).extract_model(inputs, outputs), str(out))
    return out


def time_blocks(blocks: dict[str, tuple[Path, int]], hidden: int, experts: int, threads: int, rounds: int,
                calls: int, seed: int = 0) -> dict[str, np.ndarray]:
    """ms per call (one token) of every block model: name -> (model, the session's MatMulNBits accuracy level;
    QMoE nodes carry their own), alternating rounds."""
    import onnxruntime as ort

    from benchmarks._latency import session_options
    from mcsmoe_deploy.runtime.ort_session import MATMUL_ACCURACY_KEY

    rng = np.random.default_rng(seed)
    sessions = {}
    for name, (path, level) in blocks.items():
        options = session_options(threads)
        options.add_session_config_entry(MATMUL_ACCURACY_KEY, str(level))
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = [(rng.standard_normal((1, hidden), dtype=np.float32), rng.standard_normal((1, experts), dtype=np.float32))
             for _ in range(calls)]
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, session in sessions.items():
            names = [i.name for i in session.get_inputs()]
            for hidden_state, logits in feeds:
                start = time.perf_counter()
                session.run(None, dict(zip(names, (hidden_state, logits))))
                if round_index:
                    samples[name].append(time.perf_counter() - start)
    return {name: 1000 * np.asarray(values) for name, values in samples.items()}


__all__ = ["extract_first_block", "time_blocks"]
