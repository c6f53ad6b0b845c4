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
        nodes.append(helper.make_node("RotaryEmbedding", [f"{name}_lin", "pos", "cos", "sin"], [f"{name}_rot"],
                                      domain="com.microsoft", num_heads=heads, interleaved=0))
    nodes.append(helper.make_node(
        "GroupQueryAttention",
        ["q_rot", "k_rot", "v_lin", "past_k", "past_v", "seqlens", "total", "", "", "", "bias", "", "", "", "", "",
         "qlens"], ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV,
        scale=0.25, local_window_size=-1))
    floats = {"x": ["B", "S", HIDDEN], "past_k": ["B", KV, "P", HEAD], "past_v": ["B", KV, "P", HEAD],
              "bias": ["B", 1, "S", "T"]}
    inputs = [helper.make_tensor_value_info(n, TP.FLOAT, s) for n, s in floats.items()]
    inputs += [helper.make_tensor_value_info("pos", TP.INT64, ["B", "S"]),
               helper.make_tensor_value_info("seqlens", TP.INT32, ["B"]),
               helper.make_tensor_value_info("total", TP.INT32, []),
               helper.make_tensor_value_info("qlens", TP.INT32, ["B"])]
    outputs = [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("out", "present_k", "present_v")]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _feeds(mask: np.ndarray, new: int, seed: int) -> dict[str, np.ndarray]:
    """A step of `new` tokens after a past of mask.shape[1] - new, rows left-padded as `mask` says."""
    rng = np.random.default_rng(seed)
    batch, total = mask.shape
    past = total - new
    return {"x": rng.standard_normal((batch, new, HIDDEN)).astype(np.float32),
            "past_k": rng.standard_normal((batch, KV, past, HEAD)).astype(np.float32),
            "past_v": rng.standard_normal((batch, KV, past, HEAD)).astype(np.float32),
            "bias": np.broadcast_to(((1 - mask) * np.finfo(np.float32).min)[:, None, None, :],
                                    (batch, 1, new, total)).astype(np.float32),
            "pos": np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, past:].astype(np.int64),
            "seqlens": np.full(batch, total - 1, np.int32), "total": np.array(total, np.int32),
            "qlens": np.full(batch, new, np.int32)}


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


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
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # a left-padded row: its positions restart at 0
    for new in (6, 1):  # a prefill after a past, a decode step
        feeds = _feeds(mask, new, seed=new)
        expected, got = _run(before, feeds), _run(after, feeds)
        real = mask[:, -new:].astype(bool)
        scale = np.abs(expected[0]).max()
        assert np.abs(got[0] - expected[0])[real].max() <= 1e-5 * scale
        for e, g in zip(expected[1:], got[1:]):
            assert np.abs(g - e).max() <= 1e-5 * np.abs(e).max()


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
    ops = Counter(n.op_type for n in onnx.load(str(root / "ort.onnx")).graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 0
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
