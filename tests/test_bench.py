"""mcsmoe bench / compare: one run measures every contestant; the JSON round-trips; compare catches regressions."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.runtime.active_bytes import active_weight_bytes
from mcsmoe_deploy.runtime.bench import BenchConfig, Contestant
from mcsmoe_deploy.runtime.bench_report import SCHEMA, BenchReport, run_bench
from mcsmoe_deploy.runtime.compare import compare_reports, parse_threshold
from mcsmoe_deploy.runtime.timing import LatencyStats

RECIPE = dict(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)


@pytest.fixture(scope="module")
def graphs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    m.compress_model(tiny_dirs["mixtral"], root / "compressed", m.CompressionRecipe(**RECIPE), progress=False)
    m.export_model(tiny_dirs["mixtral"], root / "dense.onnx", validate=False)
    m.export_model(root / "compressed", root / "compressed.onnx", validate=False)
    return root


@pytest.fixture(scope="module")
def report(graphs):
    config = BenchConfig(prompt_len=8, decode_tokens=3, warmup=1, iterations=2, threads=1)
    contestants = [Contestant(str(graphs / "dense.onnx"), "ort"), Contestant(str(graphs / "compressed.onnx"), "ort")]
    return run_bench(contestants, config)


def test_report_has_every_number_and_round_trips(report, tmp_path):
    assert [r.name for r in report.results] == ["dense.onnx@ort", "compressed.onnx@ort"]
    for result in report.results:
        assert result.prefill.count == 2 and result.decode.count == 2 * 3
        assert 0 < result.decode.min_ms <= result.decode.p50_ms <= result.decode.p99_ms <= result.decode.max_ms
        assert result.peak_rss_bytes > 50e6 and result.bytes_on_disk > 0 and result.decode_vs_floor > 0
        assert result.decode_tokens_per_second == pytest.approx(1e3 / result.decode.p50_ms)
    dense, compressed = report.results
    assert compressed.active_weight_bytes < dense.active_weight_bytes
    assert report.ratios()["dense.onnx@ort"] == {k: 1.0 for k in report.ratios()["dense.onnx@ort"]}
    path = report.save(tmp_path / "run.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["baseline"] == "dense.onnx@ort"
    assert set(data["versions"]) >= {"python", "onnxruntime", "torch", "transformers"}
    loaded = BenchReport.load(path)
    assert loaded.to_dict() == report.to_dict()


def _scaled(report: BenchReport, name: str, factor: float) -> BenchReport:
    """A copy whose result `name` has every latency multiplied by `factor`."""
    changed = copy.deepcopy(report)

    def scale(stats: LatencyStats) -> LatencyStats:
        return LatencyStats(stats.count, *(factor * v for v in list(vars(stats).values())[1:]))

    for i, r in enumerate(changed.results):
        if r.name == name:
            changed.results[i] = replace(r, prefill=scale(r.prefill), decode=scale(r.decode),
                                         decode_tokens_per_second=r.decode_tokens_per_second / factor)
    return changed


def test_compare_passes_identical_and_fails_doubled_latencies(report):
    assert not compare_reports(report, copy.deepcopy(report)).failed
    everything_slower = _scaled(_scaled(report, "dense.onnx@ort", 2.0), "compressed.onnx@ort", 2.0)
    absolute = compare_reports(report, everything_slower, 0.10)
    assert absolute.failed
    regressed = {(c.result, c.kind, c.metric) for c in absolute.changes if c.regressed}
    assert ("compressed.onnx@ort", "absolute", "decode_p50") in regressed
    assert all(kind == "absolute" for _, kind, _ in regressed)  # the in-run ratios did not move
    # a slower machine alone does not fail the CI gate; a slower compressed model does
    assert not compare_reports(report, everything_slower, 0.10, ratios_only=True).failed
    compressed_slower = compare_reports(report, _scaled(report, "compressed.onnx@ort", 2.0), 0.10, ratios_only=True)
    assert compressed_slower.failed
    worst = max(c.worse_by for c in compressed_slower.changes)
    assert worst == pytest.approx(1.0)  # 2x = 100% worse


def test_compare_cli_exit_codes(report, tmp_path, capsys):
    base = report.save(tmp_path / "base.json")
    slower = _scaled(report, "compressed.onnx@ort", 1.5).save(tmp_path / "slow.json")
    assert main(["compare", str(base), str(base)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["compare", str(base), str(slower), "--ratios-only", "--max-regression", "60%"]) == 0
    assert main(["compare", str(base), str(slower), "--ratios-only", "--max-regression", "20%"]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    assert main(["compare", str(base), str(tmp_path / "bad.json")]) == 2
    assert "not a report from `mcsmoe bench --json`" in capsys.readouterr().err


def test_threshold_parsing():
    assert parse_threshold("10%") == pytest.approx(0.1) and parse_threshold("0.25") == 0.25
    with pytest.raises(m.UserError, match="not a number"):
        parse_threshold("ten")


def test_active_bytes_agree_between_graph_and_checkpoint(tiny_dirs, graphs):
    # the same dense weights counted from the safetensors header and from the ONNX initializers
    graph = active_weight_bytes(graphs / "dense.onnx", "ort")
    checkpoint = active_weight_bytes(tiny_dirs["mixtral"], "torch")
    assert graph == pytest.approx(checkpoint, rel=0.02)
    # experts: 2 layers x 8 experts x 3 projections x 32 x 48 fp32, of which top-2 of 8 are read
    experts = 2 * 8 * 3 * 32 * 48 * 4
    total_dense = sum(p.stat().st_size for p in tiny_dirs["mixtral"].glob("*.safetensors"))
    assert checkpoint < total_dense - 0.75 * experts + 1e4


def test_active_bytes_do_not_depend_on_the_expert_input_layout(graphs, tmp_path):
    # target ort passes a merged low-rank block's factors one input per group (op version 3), portable stacks
    # them [G, ...]: the same weights, so the same share read per token
    m.export_model(graphs / "compressed", tmp_path / "stacked.onnx", validate=False, target="portable")
    per_group = active_weight_bytes(graphs / "compressed.onnx", "ort")
    stacked = active_weight_bytes(tmp_path / "stacked.onnx", "ort")
    assert per_group == pytest.approx(stacked, rel=0.01)
    assert per_group == pytest.approx(active_weight_bytes(graphs / "compressed", "torch"), rel=0.05)


def test_contestants_with_the_same_file_name_get_distinct_names(tmp_path):
    from mcsmoe_deploy.runtime.bench_report import _distinct_names

    paths = [tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx", tmp_path / "c.onnx"]
    named = _distinct_names([Contestant(str(path), "ort") for path in paths])
    assert [c.name for c in named] == ["a/m.onnx@ort", "b/m.onnx@ort", "c.onnx@ort"]


def test_resident_memory_by_mapping_counts_a_graphs_mapped_files(tmp_path):
    """benchmarks/session_memory._resident_kb: the kinds add up to the process's RSS, and pages of a file in the
    graph's folder count as the graph's (here a 2 MiB file mapped and read through numpy)."""
    import numpy as np

    from benchmarks.session_memory import RESIDENT_KINDS, _resident_kb, _status_kb

    weights = tmp_path / "model.onnx.data"
    weights.write_bytes(np.arange(512 * 1024, dtype=np.float32).tobytes())
    mapped = np.memmap(weights, dtype=np.float32, mode="r")
    assert float(mapped.sum()) > 0  # reads every page
    resident = _resident_kb(tmp_path)
    assert set(resident) == set(RESIDENT_KINDS) and min(resident.values()) >= 0
    assert resident["graph files"] >= 2048 - 8
    assert abs(sum(resident.values()) - _status_kb("VmRSS")) < 0.05 * _status_kb("VmRSS")
    del mapped
