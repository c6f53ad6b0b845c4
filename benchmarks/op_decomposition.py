"""Latency of GroupedLowRankMoE function bodies on onnxruntime CPU (benchmark-size layers).

Each body strategy of `mcsmoe_deploy.exporters.moe_body` runs as a one-node model
whose weights are initializers (as in an exported model; onnxruntime folds and
prepacks constant weights) and whose only inputs are hidden [T, H] and
router_logits [T, E]:

    dense_all       every group's expert on every token (the original body)
    gather_tokens   per group (unrolled): gather its tokens, run its expert, scatter-add back
    loop_tokens     the same as an ONNX Loop over groups (weights sliced at run time)
    gather_weights  gather the picked groups' factors per (token, pick), batched MatMul
    floor           no routing: k groups' experts on all T tokens (the MatMuls alone); a
                    lower bound at T=1, optimistic beyond (tokens then hit more groups:
                    column "hit")

Layers: Mixtral-like hidden 1024, intermediate 2816, E=8, top-2 renormalised, gated
silu; dense (G=8, identity grouping), and compressed to G=4 (paired or random
grouping) with rank 0.25 * out*in/(out+in) per projection and 5% sparse rows
(or none). Times are interleaved across strategies; ratios are to dense_all in the
same run. gather_weights is skipped where its weight copies would pass --max-gather-gib.

    python benchmarks/op_decomposition.py [--quick] [--tokens 1 16 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from mcsmoe_deploy.exporters import MoEOpSpec, standalone_model
from mcsmoe_deploy.exporters.moe_body import STRATEGIES, Body, build_body, group_expert
from mcsmoe_deploy.grouped_experts import ProjectionSpec
from mcsmoe_deploy.models.base import ExpertLayout

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 1024, 2816, 8, 2
FLOOR = "floor"


@dataclass(frozen=True)
class Case:
    """One layer to time: its op structure and expert -> group map."""

    name: str
    spec: MoEOpSpec
    expert_to_group: tuple[int, ...]


@dataclass
class Row:
    """Latency of one strategy on one case at one token count (milliseconds)."""

    case: str
    tokens: int
    strategy: str
    p50_ms: float
    p90_ms: float
    over_dense_all: float  # p50 / dense_all's p50 in the same run
    over_floor: float  # p50 / floor's p50 in the same run
    groups_hit: int  # distinct groups the tokens are routed to (weights a body must read at least)


def make_case(name: str, groups: int, expert_to_group: list[int], rank_ratio: float | None, row_ratio: float) -> Case:
    """rank_ratio None: dense projections; else rank = rank_ratio * out*in/(out+in), rows = row_ratio * out."""
    layout = ExpertLayout(True, "silu", HIDDEN, INTERMEDIATE)
    projections = []
    for proj in layout.projections:
        out_f, in_f = layout.projection_shape(proj)
        if rank_ratio is None:
            projections.append((proj, ProjectionSpec(out_f, in_f)))
            continue
        rank = round(rank_ratio * out_f * in_f / (out_f + in_f))
        projections.append((proj, ProjectionSpec(out_f, in_f, rank, round(row_ratio * out_f))))
    routing = "softmax_topk_norm"
    spec = MoEOpSpec(EXPERTS, groups, HIDDEN, INTERMEDIATE, TOP_K, True, "silu", routing, tuple(projections))
    return Case(name, spec, tuple(expert_to_group))


def cases(seed: int, quick: bool) -> list[Case]:
    paired = [0, 0, 1, 1, 2, 2, 3, 3]
    shuffled = [int(g) for g in np.random.default_rng(seed).permutation(paired)]
    found = [
        make_case("dense G=8", 8, list(range(EXPERTS)), None, 0.0),
        make_case("lowrank+sparse G=4", 4, paired, 0.25, 0.05),
        make_case("lowrank+sparse G=4 random", 4, shuffled, 0.25, 0.05),
        make_case("lowrank G=4", 4, paired, 0.25, 0.0),
    ]
    return found[:2] if quick else found


def random_weights(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Initializers for every op input but hidden and router_logits; unit-scale activations (no denormals)."""
    shapes = case.spec.input_shapes()
    weights: dict[str, np.ndarray] = {"expert_to_group": np.array(case.expert_to_group, dtype=np.int64)}
    for name, proj in case.spec.projections:
        for input_name in case.spec.projection_inputs(name):
            shape = shapes[input_name]
            if input_name.endswith("_sparse_rows"):
                weights[input_name] = rng.integers(0, proj.out_features, shape, dtype=np.int64)
                continue
            fan_in = shape[-1]
            weights[input_name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return weights


def op_model(case: Case, weights: dict[str, np.ndarray], strategy: str) -> onnx.ModelProto:
    """The one-node model with `strategy`'s body, weights moved from graph inputs to initializers."""
    model = standalone_model(case.spec)
    function = model.functions[0]
    del function.node[:]  # same signature and overload, another body
    function.node.extend(build_body(case.spec, strategy))
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    return model


def floor_model(case: Case, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """No routing: the first k groups' experts on every token, averaged (at T=1, the MatMuls no body avoids)."""
    b = Body()
    outs = [group_expert(b, case.spec, g, "hidden") for g in range(case.spec.top_k)]
    total = outs[0]
    for out in outs[1:]:
        total = b("Add", total, out)
    b.output(b("Mul", total, b.float_like(1.0 / case.spec.top_k, total)))
    used = {i for node in b.nodes for i in node.input}
    float_type = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        b.nodes,
        "floor",
        [helper.make_tensor_value_info("hidden", float_type, ["T", HIDDEN])],
        [helper.make_tensor_value_info("output", float_type, ["T", HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in weights.items() if k in used],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def gathered_gib(case: Case, tokens: int) -> float:
    """Bytes gather_weights copies per call: every pick's factors (fp32), in GiB."""
    per_group = sum(p.parameters_per_group() for _, p in case.spec.projections)
    return tokens * case.spec.top_k * per_group * 4 / 2**30


def groups_hit(case: Case, logits: np.ndarray) -> int:
    picks = np.argsort(-logits, axis=1)[:, : case.spec.top_k]  # softmax keeps the order
    groups = np.asarray(case.expert_to_group)[picks]
    return len(set(groups[groups >= 0].tolist()))


def session(model: onnx.ModelProto, threads: int, spin: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # spinning workers lose their core on a loaded machine and then stall every parallel op
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def interleaved_ms(sessions: dict[str, ort.InferenceSession], feeds: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times of `repeats` runs per session, the order rotated every round (drift hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            sess = sessions[name]
            feed = {i.name: feeds[i.name] for i in sess.get_inputs()}
            start = time.perf_counter()
            sess.run(None, feed)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def time_case(case: Case, tokens: list[int], strategies: list[str], args: argparse.Namespace) -> list[Row]:
    rng = np.random.default_rng(args.seed)
    weights = random_weights(case, rng)
    built = {s: session(op_model(case, weights, s), args.threads, args.spin) for s in strategies}
    built[FLOOR] = session(floor_model(case, weights), args.threads, args.spin)
    rows = []
    for t in tokens:
        feeds = {
            "hidden": rng.standard_normal((t, HIDDEN)).astype(np.float32),
            "router_logits": rng.standard_normal((t, EXPERTS)).astype(np.float32),
        }
        sessions = dict(built)
        if "gather_weights" in sessions and gathered_gib(case, t) > args.max_gather_gib:
            del sessions["gather_weights"]
            print(f"# {case.name} T={t}: gather_weights skipped, it would copy {gathered_gib(case, t):.1f} GiB")
        outputs = {}
        for name, sess in sessions.items():
            feed = {i.name: feeds[i.name] for i in sess.get_inputs()}
            for _ in range(args.warmup):
                outputs[name] = sess.run(None, feed)[0]
        reference = outputs.get("dense_all")
        for name in strategies:  # the bodies must agree before their times mean anything
            if reference is not None and name in outputs:
                assert np.abs(outputs[name] - reference).max() <= 1e-4 * np.abs(reference).max(), (case.name, t, name)
        repeats = args.repeats if t <= 16 else max(5, args.repeats // 2)  # long runs: fewer
        samples = interleaved_ms(sessions, feeds, repeats)
        p50 = {name: statistics.median(v) for name, v in samples.items()}
        base, floor, hit = p50.get("dense_all", float("nan")), p50[FLOOR], groups_hit(case, feeds["router_logits"])
        found = [
            Row(case.name, t, name, p50[name], float(np.percentile(v, 90)), p50[name] / base, p50[name] / floor, hit)
            for name, v in samples.items()
        ]
        print_rows(found)
        rows += found
    return rows


HEADER = (
    f"{'case':28} {'T':>4} {'hit':>3} {'strategy':15} {'p50 ms':>9} {'p90 ms':>9} {'/dense_all':>10} {'/floor':>7}"
)


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        print(
            f"{r.case:28} {r.tokens:>4} {r.groups_hit:>3} {r.strategy:15} {r.p50_ms:9.3f} {r.p90_ms:9.3f}"
            f" {r.over_dense_all:10.3f} {r.over_floor:7.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two cases, T in {1, 512}, fewer repeats")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 1 16 512)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per strategy at T <= 16 (default 40)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--max-gather-gib", type=float, default=1.0, help="skip gather_weights beyond this copy")
    parser.add_argument("--spin", action="store_true", help="let idle onnxruntime workers spin (off: shared machines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    args.tokens = args.tokens or ([1, 512] if args.quick else [1, 16, 512])
    args.repeats = args.repeats or (12 if args.quick else 40)
    spin = "spinning" if args.spin else "no spinning"
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads ({spin}), sequential, ORT_ENABLE_ALL, fp32")
    print(HEADER)
    rows: list[Row] = []
    for case in cases(args.seed, args.quick):
        rows += time_case(case, args.tokens, list(args.strategies), args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
