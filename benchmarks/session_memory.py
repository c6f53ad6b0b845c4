"""Peak and steady RSS of an onnxruntime session against the graph's bytes on disk (issue 12).

    python benchmarks/session_memory.py GRAPH [GRAPH ...] [--levels all basic ...] [--steps 32]
    python benchmarks/session_memory.py --build WORK [--variants ours-fp32 ours-int4-all ...]

Each (graph, optimisation level) is measured in a fresh Python subprocess, so nothing another
session allocated (or glibc kept) counts: after importing onnxruntime and the package, the child
reads VmHWM / VmRSS (/proc/self/status), opens a one-node session and reads them again (what the
first onnxruntime session of a process costs whatever its graph: 10-16 MiB, most of it file-backed
code pages of onnxruntime's library, which processes share; reported on its own), opens the graph
(`mcsmoe_deploy.open_session`, or the onnxruntime-genai builder's folder through
benchmarks/_genai_peer.py), runs a 16-token prefill and `--steps` greedy decode steps, and reads them
again. Peak = VmHWM after - VmHWM before (the session's high-water mark over the baseline); steady =
VmRSS after - VmRSS before; the graph's peak = VmHWM after - VmHWM after the one-node session. The
table gives each as MiB and as a ratio to the bytes on disk (graph file + external data), the quantity
issue 12 bounds (peak <= 1.5x). A second table says where the graph's resident memory is after the run, over what was
resident after the one-node session, by mapping (`/proc/self/smaps`): heap and anonymous memory (packed weights,
session state, activations), onnxruntime's shared library (code of the kernels the graph runs), the graph's own
files (weights read in place), other files. Memory does not depend on machine load, so one run is enough.

--external-data also measures a copy of each graph file with its weights in external data (a
`.onnx.data` file beside it, written to a temporary folder): onnxruntime memory-maps external data,
so the pages of weights it repacks (MatMulNBits, QMoE) are dropped instead of kept.

--build builds the named variants of benchmarks/quantized_decode.py (the ~330 MB random Mixtral,
its int4 and merged graphs, the builder's) into WORK when missing, and measures them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_VARIANTS = ("ours-fp32", "ours-int4-all", "ours-G4-int4-all", "ours-int4-all-qmoe", "builder-int4")
PROMPT_TOKENS = 16


def _status_kb(field: str) -> int:
    """A `/proc/self/status` field (VmHWM, VmRSS) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


RESIDENT_KINDS = ("heap and anonymous", "onnxruntime library", "graph files", "other files")


def _resident_kb(graph: Path) -> dict[str, int]:
    """Resident kB of this process per kind of mapping (`/proc/self/smaps`): the heap and anonymous memory,
    onnxruntime's shared library, files of `graph` (its .onnx and data files, or a builder folder's), others."""
    import re

    kb = dict.fromkeys(RESIDENT_KINDS, 0)
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        fields = block.split("\n", 1)[0].split()
        mapped = fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
        rss = re.search(r"\nRss:\s+(\d+)", block)
        if rss is None:
            continue
        if mapped is None:
            kind = "heap and anonymous"
        elif "onnxruntime" in Path(mapped).name:
            kind = "onnxruntime library"
        elif mapped.startswith(str(graph)) or Path(mapped).parent == graph:
            kind = "graph files"
        else:
            kind = "other files"
        kb[kind] += int(rss.group(1))
    return kb


def _child(graph: Path, level: str, steps: int, threads: int) -> dict[str, float]:
    """Open `graph` at optimisation `level`, prefill and decode `steps` tokens; memory deltas in MB."""
    import onnxruntime as ort

    import mcsmoe_deploy as mc
    from benchmarks._latency import decode_seconds, random_prompt
    from mcsmoe_deploy.runtime.ort_session import OPT_LEVELS

    hwm0, rss0 = _status_kb("VmHWM"), _status_kb("VmRSS")
    first = _first_session()  # onnxruntime's own cost, the same for every graph: its code pages
    hwm1, resident1 = _status_kb("VmHWM"), _resident_kb(graph)
    if graph.is_dir():  # the onnxruntime-genai builder's folder
        from benchmarks._genai_peer import open_peer_lm
        from benchmarks._latency import session_options

        options = session_options(threads)
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
        lm = open_peer_lm(graph.name, graph, options)
    else:
        lm = mc.open_session(graph, threads=threads, opt_level=level)
    hwm_open = _status_kb("VmHWM")
    vocab = 2048 if graph.is_dir() else lm.vocab_size
    decode_seconds(lm, random_prompt(PROMPT_TOKENS, vocab, 0), steps)
    mb = lambda kb: kb / 1024  # noqa: E731
    hwm, rss, resident = _status_kb("VmHWM"), _status_kb("VmRSS"), _resident_kb(graph)
    del first
    return {"peak_open_mb": mb(hwm_open - hwm0), "peak_mb": mb(hwm - hwm0), "steady_mb": mb(rss - rss0),
            "runtime_mb": mb(hwm1 - hwm0), "graph_peak_mb": mb(hwm - hwm1),
            "resident_mb": {kind: mb(resident[kind] - resident1[kind]) for kind in RESIDENT_KINDS}}


def _first_session():
    """A session of a one-node graph (Add): what any first onnxruntime session costs a process, whatever
    its graph (mostly file-backed pages of onnxruntime's shared library, which processes share)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def bytes_on_disk(path: Path) -> int:
    """Bytes of a graph file and its external data (files named after it), or of a folder's model.onnx*."""
    from benchmarks.quantized_decode import _bytes

    return _bytes(path)


def measure(graph: Path, level: str, steps: int, threads: int) -> dict[str, float]:
    """`_child`'s numbers for `graph` at `level`, measured in a fresh subprocess."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, __file__, "--child", str(graph), "--levels", level, "--steps", str(steps),
                          "--threads", str(threads)], capture_output=True, text=True, cwd=root, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {graph} at {level} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="*", type=Path, help="ONNX graphs (or builder folders) to measure")
    parser.add_argument("--build", type=Path, help="build (when missing) and measure --variants in this folder")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="benchmarks/quantized_decode.py contestants to build with --build")
    parser.add_argument("--levels", nargs="+", default=["all"], choices=["disable", "basic", "extended", "all"])
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps after a 16-token prefill")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--external-data", action="store_true",
                        help="also measure each graph file with its weights as external data")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.levels[0], args.steps, args.threads)))
        return
    graphs = {f"{path.parent.name}/{path.name}": path for path in args.graphs}
    if args.build is not None:
        from benchmarks.quantized_decode import build_all

        args.build.mkdir(parents=True, exist_ok=True)
        graphs.update(build_all(args.build, args.variants))
    if not graphs:
        parser.error("name graphs to measure, or --build WORK")
    with tempfile.TemporaryDirectory() as scratch:
        if args.external_data:
            for i, (name, path) in enumerate(list(graphs.items())):
                if path.is_file():
                    folder = Path(scratch) / str(i)
                    folder.mkdir()
                    graphs[f"{name} (external data)"] = external_copy(path, folder)
        _table(graphs, args)


def external_copy(path: Path, folder: Path) -> Path:
    """A copy of graph `path` in `folder` with every weight over 1 kB in `<name>.data` beside it."""
    import onnx

    out = folder / path.name
    onnx.save_model(onnx.load(str(path)), str(out), save_as_external_data=True, location=out.name + ".data",
                    size_threshold=1024)
    return out


def _table(graphs: dict[str, Path], args: argparse.Namespace) -> None:
    print("| graph | level | on disk MiB | peak MiB (after open) | peak / disk | steady / disk "
          "| onnxruntime's first session MiB | graph's peak MiB | graph's peak / disk |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    resident = {}
    for name, path in graphs.items():
        disk = bytes_on_disk(path) / 2**20
        for level in args.levels:
            r = measure(path, level, args.steps, args.threads)
            resident[(name, level)] = r["resident_mb"]
            print(f"| {name} | {level} | {disk:.1f} | {r['peak_mb']:.0f} ({r['peak_open_mb']:.0f}) | "
                  f"{r['peak_mb'] / disk:.2f}x | {r['steady_mb'] / disk:.2f}x | {r['runtime_mb']:.0f} | "
                  f"{r['graph_peak_mb']:.0f} | {r['graph_peak_mb'] / disk:.2f}x |", flush=True)
    print("\nResident after the run over resident after the one-node session, MiB, by mapping (/proc/self/smaps):")
    print("| graph | level | " + " | ".join(RESIDENT_KINDS) + " |")
    print("|---|---|" + "---:|" * len(RESIDENT_KINDS))
    for (name, level), by_kind in resident.items():
        print(f"| {name} | {level} | " + " | ".join(f"{by_kind[kind]:.1f}" for kind in RESIDENT_KINDS) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
    main()
