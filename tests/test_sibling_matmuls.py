"""FuseSiblingMatMulNBitsPass: MatMulNBits nodes of one activation become one node and a Split, bit for bit."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mcsmoe_deploy.exporters.passes.sibling_matmuls import FuseSiblingMatMulNBitsPass
from mcsmoe_deploy.quantization import QuantSpec, quantize

K, BLOCK = 64, 16


def _nbits(name: str, x: str, rows: int, spec: QuantSpec, seed: int, accuracy: int):
    """A MatMulNBits node computing x @ W.T for a random W [rows, K], and its initializers."""
    weight = quantize(torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)), spec)
    codes = weight.packed_codes().numpy().reshape(rows, K // BLOCK, BLOCK * spec.bits // 8)
    inits = [numpy_helper.from_array(codes, f"{name}.B"), numpy_helper.from_array(weight.scales.numpy(), f"{name}.S")]
    if not spec.symmetric:
        zero = weight.zero_points.numpy()
        packed = zero[:, 0::2] | (zero[:, 1::2] << 4) if spec.bits == 4 else zero
        inits.append(numpy_helper.from_array(packed.astype(np.uint8), f"{name}.Z"))
    node = helper.make_node("MatMulNBits", [x, *[i.name for i in inits]], [f"{name}.y"], domain="com.microsoft",
                            name=name, K=K, N=rows, bits=spec.bits, block_size=BLOCK, accuracy_level=accuracy)
    return node, inits


def _model(spec: QuantSpec, accuracy: int) -> onnx.ModelProto:
    """gate and up of x (siblings), down of another activation (alone)."""
    gate, gate_inits = _nbits("gate", "x", 48, spec, 0, accuracy)
    up, up_inits = _nbits("up", "x", 32, spec, 1, accuracy)
    down, down_inits = _nbits("down", "h", 16, spec, 2, accuracy)
    product = helper.make_node("Concat", ["gate.y", "up.y"], ["gu"], axis=-1)
    graph = helper.make_graph(
        [gate, up, down, product], "siblings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["m", K])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("gu", "down.y")],
        gate_inits + up_inits + down_inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("bits,symmetric,accuracy", [(4, True, 4), (4, False, 4), (4, False, 0), (8, False, 4)])
def test_siblings_fuse_and_compute_the_same_bits(bits, symmetric, accuracy):
    model = _model(QuantSpec(bits, BLOCK, symmetric), accuracy)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, K)).astype(np.float32), "h": rng.standard_normal((3, K)).astype(np.float32)}
    before = _run(model, feeds)

    ir_model = ir.serde.deserialize_model(model)
    assert FuseSiblingMatMulNBitsPass()(ir_model).modified
    fused = ir.serde.serialize_model(ir_model)
    ops = Counter(node.op_type for node in fused.graph.node)
    assert ops["MatMulNBits"] == 2 and ops["Split"] == 1  # gate + up as one, down alone
    assert _initializer_bytes(fused) == _initializer_bytes(model)  # concatenated, the parts dropped
    names = {t.name for t in fused.graph.initializer}
    assert "down.B" in names and not names & {"gate.B", "up.B", "gate.S", "up.S"}
    for want, got in zip(before, _run(fused, feeds)):
        assert np.array_equal(want, got)


def test_nothing_to_fuse_is_a_no_op():
    spec = QuantSpec(4, BLOCK, True)
    down, inits = _nbits("down", "h", 16, spec, 2, 4)
    graph = helper.make_graph([down], "one", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("down.y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    assert not FuseSiblingMatMulNBitsPass()(ir.serde.deserialize_model(model)).modified
