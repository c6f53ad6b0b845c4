"""Quantized input embeddings (`--quantize-scope all+embeddings`): exact lookups, one table with a tied LM
head in the checkpoint and in the graph, graphs matching `load_compressed`, one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

import mcsmoe_deploy as m
from mcsmoe_deploy.contract import DOMAIN
from mcsmoe_deploy.demo import embedded_model_dir
from mcsmoe_deploy.errors import UserError
from mcsmoe_deploy.exporters.passes.metadata import TRACE_METADATA_PREFIXES
from mcsmoe_deploy.models import load_model
from mcsmoe_deploy.quantization import QuantSpec, dequantize, quantize

EMBEDDINGS = "all+embeddings"
FAST = dict(max_calib_tokens=1024, calib_seq_len=32, quant_block=16, quantize="int4")


def _table(vocab: int = 12, hidden: int = 32) -> torch.Tensor:
    table = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0))
    table[3] = 0.0  # a row of zeros
    table[5] = -table[5].abs() - 0.1  # an all-negative row
    return table


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_lookup_is_the_dequantized_rows_exactly(bits, symmetric):
    spec = QuantSpec(bits, 16, symmetric)
    table = _table()
    module = m.QuantizedEmbedding.from_embedding(torch.nn.Embedding.from_pretrained(table), spec)
    ids = torch.tensor([[3, 5, 0, 11], [5, 5, 7, 3]])
    expected = dequantize(quantize(table, spec))[ids]
    assert torch.equal(module(ids), expected)
    assert torch.equal(module(ids)[0, 0], torch.zeros(32))  # zeros stay exact
    assert (module(ids)[0, 1] <= 0).all()


def test_tied_table_is_the_heads_codes_and_is_stored_once(tmp_path):
    source = embedded_model_dir()
    model, adapter = load_model(source)
    assert m.tied_output_embeddings(model) == "lm_head"
    m.quantize_model(model, adapter, QuantSpec(4, 16, False), EMBEDDINGS)
    embedding, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(embedding, m.QuantizedEmbedding) and embedding.shares_codes_with == "lm_head"
    assert embedding.weight_codes is head.weight_codes and embedding.weight_scales is head.weight_scales
    ids = torch.tensor([[1, 2, 3, 2047]])
    assert torch.equal(embedding(ids), head.dequantized_weight()[ids])

    out = tmp_path / "c"
    m.compress_model(source, out, m.CompressionRecipe(experts=4, quant_scope=EMBEDDINGS, **FAST), progress=False)
    section = json.loads((out / "config.json").read_text())["mcsmoe"]
    assert section["quantized_embeddings"] == {"model.embed_tokens": {"bits": 4, "block": 16, "symmetric": False,
                                                                      "shares_codes_with": "lm_head"}}
    with safe_open(str(out / "model.safetensors"), "pt") as stored:
        names = set(stored.keys())
    assert "lm_head.weight_codes" in names and not any(name.startswith("model.embed_tokens") for name in names)
    reloaded = m.load_compressed(out)
    assert reloaded.get_input_embeddings().weight_codes is reloaded.lm_head.weight_codes
    plain = tmp_path / "plain"
    m.compress_model(source, plain, m.CompressionRecipe(experts=4, **FAST), progress=False)
    # the float table (1 MiB) replaced by nothing: its codes are the head's
    assert (out / "model.safetensors").stat().st_size < (plain / "model.safetensors").stat().st_size - 1_000_000


def test_untied_table_is_quantized_on_its_own(tiny_dirs):
    model, adapter = load_model(tiny_dirs["qwen3_moe"])
    assert m.tied_output_embeddings(model) is None
    table = model.get_input_embeddings().weight.detach().clone()
    spec = QuantSpec(4, 16, False)
    m.quantize_model(model, adapter, spec, EMBEDDINGS)
    embedding = model.get_input_embeddings()
    assert embedding.shares_codes_with is None and embedding.weight_codes is not model.lm_head.weight_codes
    assert torch.equal(embedding.dequantized_weight(), dequantize(quantize(table, spec)))


@pytest.mark.parametrize("family", ["embedded", "qwen2_moe"])
def test_graphs_match_load_compressed_and_share_the_tied_table(family, tiny_dirs, tmp_path):
    source = embedded_model_dir() if family == "embedded" else tiny_dirs[family]
    model_dir = tmp_path / "c"
    m.compress_model(source, model_dir, m.CompressionRecipe(experts=4, quant_scope=EMBEDDINGS, **FAST), progress=False)
    reference = m.load_compressed(model_dir)
    for target in ("ort", "portable"):
        out = tmp_path / f"{target}.onnx"
        report = m.export_model(model_dir, out, target=target, inline=target == "portable")
        assert report.parity and all(check.max_rel_error < 1e-4 for check in report.parity), report.parity
        graph = onnx.load(str(out), load_external_data=False)
        names = {t.name for t in graph.graph.initializer}
        assert not any(t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [reference.config.vocab_size,
                       reference.config.hidden_size] for t in graph.graph.initializer)  # no float table
        tied = family == "embedded" and target == "ort"
        assert any(name.endswith(".gather_codes") for name in names) != tied  # tied: the head's MatMulNBits B
        lookups = [node for node in graph.graph.node if node.op_type == "GatherBlockQuantized"]
        assert len(lookups) == (1 if target == "ort" else 0)
        assert not any(key.startswith(TRACE_METADATA_PREFIXES) for node in graph.graph.node
                       for key in (p.key for p in node.metadata_props))
    inlined = onnx.load(report.inlined_path, load_external_data=False)
    assert DOMAIN not in {i.domain for i in inlined.opset_import}


def test_export_quantizes_the_table_of_a_dense_checkpoint(tmp_path):
    report = m.export_model(embedded_model_dir(), tmp_path / "q.onnx", quantize="int4", quant_block=16,
                            quant_scope=EMBEDDINGS)
    assert all(check.max_rel_error < 1e-4 for check in report.parity)
    graph = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    assert max(int(np.prod(t.dims)) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT) < 2048 * 128


def test_block_not_dividing_the_hidden_size_is_one_error(tiny_dirs, tmp_path):
    model, adapter = load_model(tiny_dirs["mixtral"])
    with pytest.raises(UserError, match="quant_block 64 does not divide the input size 32 of "):
        m.quantize_model(model, adapter, QuantSpec(4, 64, False), EMBEDDINGS)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)  # nothing changed


def test_switch_refuses_embedding_quantization(tiny_dirs, tmp_path):
    with pytest.raises(UserError, match="all\\+embeddings is for decoder-only families"):
        m.compress_model(tiny_dirs["switch_transformers"], tmp_path / "s",
                         m.CompressionRecipe(experts=4, quant_scope=EMBEDDINGS, **FAST), progress=False)
    assert not (tmp_path / "s").exists()
