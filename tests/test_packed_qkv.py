"""PackedQKVPass: q/k/v projections packed into one, rotary inside GroupQueryAttention (target 'ort')."""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import byte_tokenizer
from padded_batches import padded_batch_errors
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mcsmoe_deploy as m
from mcsmoe_deploy.exporters.passes.packed_qkv import PackedQKVPass
from mcsmoe_deploy.runtime import GenerationConfig, generate, open_session


HEADS, KV, HEAD, HIDDEN, MAX_POS = 4, 2, 16, 64, 64


def _layer(kind: str, seed: int = 0) -> onnx.ModelProto:
    """x [B, S, H] -> three projections of `kind` (float | dq | nbits) -> RotaryEmbedding on q, k -> GQA."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    half = rng.standard_normal((MAX_POS, HEAD // 2)).astype(np.float32)
    inits += [numpy_helper.from_array(np.cos(half), "cos"), numpy_helper.from_array(np.sin(half), "sin")]
    for name, out in (("q", HEADS * HEAD), ("k", KV * HEAD), ("v", KV * HEAD)):
        if kind == "float":
            weight = rng.standard_normal((HIDDEN, out)).astype(np.float32) / 8
            inits.append(numpy_helper.from_array(weight, f"{name}_w"))
            nodes.append(helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_lin"]))
        elif kind == "dq":
            codes = rng.integers(-8, 8, (HIDDEN, out)).astype(ml_dtypes.int4)
            inits += [numpy_helper.from_array(codes, f"{name}_q"),
                      numpy_helper.from_array(rng.random((HIDDEN // 16, out)).astype(np.float32) / 20, f"{name}_s")]
            nodes += [helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [f"{name}_w"], axis=0,
                                       block_size=16),
                      helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_lin"])]
        else:  # MatMulNBits, 4 bits, blocks of 16: B [N, K / 16, 8] bytes, scales [N * K / 16], zero points
            blocks = HIDDEN // 16
            inits += [numpy_helper.from_array(rng.integers(0, 256, (out, blocks, 8)).astype(np.uint8), f"{name}_b"),
                      numpy_helper.from_array(rng.random(out * blocks).astype(np.float32) / 20, f"{name}_s"),
                      numpy_helper.from_array(rng.integers(0, 256, (out, (blocks + 1) // 2)).astype(np.uint8),
                                              f"{name}_z")]
            nodes.append(helper.make_node("MatMulNBits", ["x", f"{name}_b", f"{name}_s", f"{name}_z"],
                                          [f"{name}_lin"], domain="com.microsoft", K=HIDDEN, N=out, bits=4,
                                          block_size=16))
    for name, heads in (("q", HEADS), ("k", KV)):
        nodes.append(helper.make_node("RotaryEmbedding", [f"{name}_lin", "position_ids", "cos", "sin"], [f"{name}_rot"],
                                      domain="com.microsoft", num_heads=heads, interleaved=0))
    nodes.append(helper.make_node(
        "GroupQueryAttention", ["q_rot", "k_rot", "v_lin", "past_k", "past_v", "seqlens", "total"],
        ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV, scale=0.25,
        local_window_size=-1))
    floats = {"x": ["B", "S", HIDDEN], "past_k": ["B", KV, "P", HEAD], "past_v": ["B", KV, "P", HEAD]}
    inputs = [helper.make_tensor_value_info(n, TP.FLOAT, s) for n, s in floats.items()]
    inputs += [helper.make_tensor_value_info("position_ids", TP.INT64, ["B", "S"]),
               helper.make_tensor_value_info("seqlens", TP.INT32, ["B"]),
               helper.make_tensor_value_info("total", TP.INT32, [])]
    outputs = [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("out", "present_k", "present_v")]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _feeds(lengths: list[int], total: int, new: int, seed: int) -> dict[str, np.ndarray]:
    """A step of `new` tokens after a past buffer of total - new positions, rows right-padded: row b holds
    lengths[b] real positions after the step (its past's first lengths[b] - new, then the new ones; after an
    empty past, the first lengths[b] of the new ones)."""
    rng = np.random.default_rng(seed)
    batch, past = len(lengths), total - new
    starts = np.array(lengths)[:, None] - new if past else np.zeros((batch, 1), np.int64)
    return {"x": rng.standard_normal((batch, new, HIDDEN)).astype(np.float32),
            "past_k": rng.standard_normal((batch, KV, past, HEAD)).astype(np.float32),
            "past_v": rng.standard_normal((batch, KV, past, HEAD)).astype(np.float32),
            "position_ids": (starts + np.arange(new)[None, :]).astype(np.int64),
            "seqlens": np.array(lengths, np.int32) - 1, "total": np.array(total, np.int32)}


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {name: value for name, value in feeds.items() if name in names})


@pytest.mark.parametrize("kind", ["float", "dq", "nbits"])
def test_packed_layer_computes_what_the_three_projections_do(kind):
    before = _layer(kind)
    model = ir.from_proto(before)
    assert PackedQKVPass()(model).modified
    after = ir.to_proto(model)
    ops = Counter(n.op_type for n in after.graph.node)
    assert ops["RotaryEmbedding"] == 0 and ops["MatMul"] + ops["MatMulNBits"] == 1
    gqa = next(n for n in after.graph.node if n.op_type == "GroupQueryAttention")
    assert {a.name: a.i for a in gqa.attribute}["do_rotary"] == 1 and list(gqa.input[1:3]) == ["", ""]
    assert len(after.graph.initializer) == 2 + (1 if kind == "float" else 2 if kind == "dq" else 3)  # old ones gone
    # the kernel rotates at the rows' own positions: the graph input of positions is read no more, and goes
    inputs = [i.name for i in after.graph.input]
    assert "position_ids" not in inputs and len(inputs) == len(before.graph.input) - 1
    # a prompt of two right-padded rows (2 of the second's 9 positions are padding), a decode step after a past,
    # and a step of several tokens after a past (onnxruntime's kernel takes those one row at a time)
    for lengths, total, new in (([9, 7], 9, 9), ([9, 7], 9, 1), ([9], 9, 6)):
        feeds = _feeds(lengths, total, new, seed=new)
        expected, got = _run(before, feeds), _run(after, feeds)
        for row, length in enumerate(lengths):  # the real queries, and each row's real positions in presents
            queries = slice(0, length if total == new else new)
            assert np.abs(got[0][row, queries] - expected[0][row, queries]).max() <= 1e-5 * np.abs(expected[0]).max()
            for e, g in zip(expected[1:], got[1:]):
                assert np.abs(g[row, :, :length] - e[row, :, :length]).max() <= 1e-5 * np.abs(e).max()


def test_head_size_not_a_multiple_of_16_is_left_alone():
    model = ir.from_proto(_layer("float"))
    for value in model.graph.initializers.values():
        if value.name in ("cos", "sin"):  # as if the head size were 8
            value.const_value = ir.Tensor(value.const_value.numpy()[:, :4].copy(), name=value.name)
            value.shape = value.const_value.shape
    assert not PackedQKVPass()(model).modified


@pytest.fixture(scope="module")
def head16(tmp_path_factory):
    """A tiny Mixtral with head size 16 (the pass's kernel needs a multiple of 16), exported 'ort' and 'portable'."""
    import transformers as tf

    root = tmp_path_factory.mktemp("packed")
    torch.manual_seed(0)
    config = tf.MixtralConfig(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, vocab_size=320,
                              num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=128,
                              num_local_experts=4, num_experts_per_tok=2, initializer_range=0.2)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(root / "src")
    byte_tokenizer().save_pretrained(root / "src")
    report = m.export_model(root / "src", root / "ort.onnx")  # validated against torch: 1e-4 relative
    m.export_model(root / "src", root / "portable.onnx", validate=False, target="portable")
    return root, model, report


def test_export_packs_every_layer_and_matches_torch(head16):
    root, model, report = head16
    assert report.max_rel_error <= 1e-4
    graph = onnx.load(str(root / "ort.onnx")).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 0
    assert "position_ids" not in {i.name for i in graph.input}  # the builder's inputs: ids, mask, past
    session = open_session(root / "ort.onnx", "ort", threads=1)
    assert session.padding_side == "right"
    prefill, decode = padded_batch_errors(session, model)
    assert prefill <= 1e-4 and decode <= 1e-4


def test_greedy_tokens_equal_the_portable_graphs(head16):
    root, _, _ = head16
    config = GenerationConfig(max_new_tokens=8)
    for prompt in ([5, 17, 99, 3, 250, 41], [7, 8, 9]):
        tokens = [generate(open_session(root / name, "ort", threads=1), [prompt], config).tokens
                  for name in ("ort.onnx", "portable.onnx")]
        assert tokens[0] == tokens[1]


def test_quantized_projections_are_packed_and_match_the_checkpoint(head16, tmp_path):
    root, _, _ = head16
    report = m.export_model(root / "src", tmp_path / "int4.onnx", quantize="int4", quant_block=16)
    assert all(check.max_rel_error < 1e-4 for check in report.parity), report.parity
    graph = onnx.load(str(tmp_path / "int4.onnx"), load_external_data=False).graph
    assert Counter(n.op_type for n in graph.node)["RotaryEmbedding"] == 0
    names = {i.name for i in graph.initializer}
    assert any("qkv_proj.weight.q" in name for name in names)
    assert not any("self_attn.q_proj" in name for name in names)
