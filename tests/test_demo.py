"""The embedded model is a trained MoE, and the demo compresses it and measures the result."""

import torch
from transformers import AutoModelForCausalLM

from mcsmoe_deploy import builtin_corpus, load_tokenizer, perplexity, token_blocks
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.demo import EMBEDDED_MODEL, EVAL_SEQ_LEN, run_demo
from mcsmoe_deploy.summary import format_demo


def test_embedded_model_is_small_trained_and_mixtral():
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL.iterdir())
    assert size < 10_500_000
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL).eval()
    assert model.config.model_type == "mixtral"
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (8, 2)
    heldout = token_blocks(load_tokenizer(EMBEDDED_MODEL), builtin_corpus("heldout"), EVAL_SEQ_LEN)
    trained = perplexity(model, heldout)
    torch.manual_seed(0)
    untrained = perplexity(AutoModelForCausalLM.from_config(model.config).eval(), heldout)
    assert trained < 0.05 * untrained, (trained, untrained)


def test_demo_reports_sizes_and_quality():
    result = run_demo(experts=4, rank_ratio=0.5, sparse_keep=0.05, distill_steps=0, progress=False, serve=False)
    dense, merged, quantized, compressed = result.rows
    assert merged.expert_parameters * 2 == dense.expert_parameters
    assert compressed.expert_parameters < 0.3 * dense.expert_parameters
    assert compressed.bytes < merged.bytes < dense.bytes
    # merging half of the experts of the (upcycled) embedded model costs little; see the issue notes
    assert dense.perplexity < merged.perplexity < 1.15 * dense.perplexity
    # int4 of every layer and the embeddings (blocks of 16): an eighth of the bytes for a few % more (21.29, 1.126x)
    assert (quantized.parameters, quantized.expert_parameters) == (merged.parameters, merged.expert_parameters)
    assert quantized.bytes < 0.13 * dense.bytes
    assert merged.perplexity < quantized.perplexity < 1.15 * dense.perplexity
    assert quantized.name == "merged + int4 (all layers, embeddings)"
    # rank 0.5 without recovery is lossy on a model this small (about 6x); distillation recovers most of it
    assert merged.perplexity < compressed.perplexity < 10 * dense.perplexity


def test_demo_command_prints_the_table(capsys, tmp_path, returned_by):
    import mcsmoe_deploy.demo as demo

    results = returned_by(demo, "run_demo")
    assert main(["demo", "--quiet", "--experts", "2", "--distill-steps", "5", "--out", str(tmp_path / "small")]) == 0
    out = capsys.readouterr().out
    assert "held-out ppl" in out and "merged (M-SMoE, 2 experts)" in out and "distillation (5 steps)" in out
    assert (tmp_path / "small" / "config.json").is_file()
    # the serving half: dense, merged + int4 and compressed exported, validated, timed in onnxruntime, and sampled
    assert "served with onnxruntime" in out and "decode ms/token" in out
    (result,) = results
    assert format_demo(result) in out
    parity = [export.max_rel_error for export in result.serving.exports]
    assert len(parity) == 3 and max(parity) < 1e-4, out
    assert [r.name for r in result.serving.bench.results] == [
        "dense (onnxruntime)", "merged+int4 (onnxruntime)", "compressed (onnxruntime)"]
    # the int4 graph holds QMoE and MatMulNBits kernels, an eighth of the dense graph's bytes
    dense_export, int4_export, _ = result.serving.exports
    assert set(int4_export.accuracy_levels) == {"QMoE", "MatMulNBits"}
    assert int4_export.file_bytes < 0.2 * dense_export.file_bytes
    samples = [line for line in out.splitlines() if line.startswith(("dense:", "merged+int4:", "compressed:"))]
    assert len(samples) == 3 and all("The def statement" in line and len(line) > 40 for line in samples)


def test_demo_without_quantized_row(capsys):
    assert main(["demo", "--quiet", "--quantize", "none", "--distill-steps", "0", "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert "merged (M-SMoE, 4 experts)" in out and "compressed (MC-SMoE" in out and "int4" not in out


def test_summary_reads_report_dataclasses_only():
    import ast
    import inspect

    import mcsmoe_deploy.demo as demo
    import mcsmoe_deploy.summary as summary

    def runtime_imports(module) -> set[str]:
        names = set()
        for node in ast.parse(inspect.getsource(module)).body:  # top level only: TYPE_CHECKING blocks are ast.If
            if isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        return names

    assert runtime_imports(summary) == {"__future__", "pathlib", "typing", ".report"}
    # the demo is built on the public compression API, not on the pipeline's steps
    assert ".compress" in runtime_imports(demo)
    assert not {".compress.plan", ".compress.pipeline", ".compress.stats"} & runtime_imports(demo)
