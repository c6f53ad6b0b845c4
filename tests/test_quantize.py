"""Blockwise int4/int8 quantization: exact against an independent reference, and the same numbers in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mcsmoe_deploy.quantization import QuantSpec, dequantize, pack_codes, quantize, unpack_codes
from mcsmoe_deploy.errors import UserError

BLOCK = 16


def reference_quantize(weight: np.ndarray, bits: int, block: int, symmetric: bool):
    """Element by element, as the definition reads (float32 scales); returns (codes, scales, zero points)."""
    out, inp = weight.shape
    codes = np.zeros((out, inp), dtype=np.int64)
    scales = np.zeros((out, inp // block), dtype=np.float32)
    zeros = np.zeros((out, inp // block), dtype=np.int64)
    top = 2**bits - 1
    for r in range(out):
        for b in range(inp // block):
            values = weight[r, b * block:(b + 1) * block].astype(np.float32)
            if symmetric:
                half = 2 ** (bits - 1) - 1
                scale = np.float32(np.abs(values).max() / np.float32(half))
                zero = 2 ** (bits - 1)
                q = np.round(values / (scale if scale else 1)).clip(-half, half) + zero
            else:
                low, high = min(values.min(), 0.0), max(values.max(), 0.0)
                scale = np.float32((high - low) / np.float32(top))
                zero = int(np.clip(np.round(-low / (scale if scale else 1)), 0, top))
                q = (np.round(values / (scale if scale else 1)) + zero).clip(0, top)
            codes[r, b * block:(b + 1) * block] = q
            scales[r, b], zeros[r, b] = scale, zero
    return codes, scales, zeros


def hand_made_weight() -> torch.Tensor:
    """Four rows x three blocks: ordinary values, a block of zeros, an all-negative block, a lone spike, ties."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3 * BLOCK)).astype(np.float32)
    weight[0, BLOCK:2 * BLOCK] = 0.0  # a block of zeros
    weight[1, :BLOCK] = -np.abs(weight[1, :BLOCK]) - 0.5  # all negative
    weight[2, 2 * BLOCK:] = 0.0
    weight[2, 2 * BLOCK + 3] = 5.0  # one spike, the rest zero
    weight[3, :BLOCK] = np.linspace(-7, 7, BLOCK) / 7  # values on and between grid points
    return torch.from_numpy(weight)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_matches_the_reference_exactly(bits, symmetric):
    weight = hand_made_weight()
    quantized = quantize(weight, QuantSpec(bits, BLOCK, symmetric))
    codes, scales, zeros = reference_quantize(weight.numpy(), bits, BLOCK, symmetric)
    np.testing.assert_array_equal(quantized.codes.numpy(), codes)
    np.testing.assert_array_equal(quantized.scales.numpy(), scales)
    if symmetric:
        assert quantized.zero_points is None
    else:
        np.testing.assert_array_equal(quantized.zero_points.numpy(), zeros)
    restored = dequantize(quantized).numpy()
    expected = ((codes - np.repeat(zeros, BLOCK, axis=1)) * np.repeat(scales, BLOCK, axis=1)).astype(np.float32)
    np.testing.assert_array_equal(restored, expected)
    # the block of zeros (and the zeros around the spike) come back exactly 0
    assert not restored[0, BLOCK:2 * BLOCK].any() and not np.delete(restored[2, 2 * BLOCK:], 3).any()
    # all-negative block: asymmetric puts 0.0 at the top code and the minimum at code 0
    if not symmetric:
        assert zeros[1, 0] == 2**bits - 1 and codes[1, :BLOCK].min() == 0
    # error bound: half a step per value
    step = np.repeat(scales, BLOCK, axis=1)
    assert np.all(np.abs(restored - weight.numpy()) <= step / 2 + 1e-6)


def test_pack_round_trips_and_uses_the_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_codes(packed, 4), codes)
    assert torch.equal(pack_codes(codes, 8), codes)


def test_bad_specs_are_one_line():
    with pytest.raises(UserError, match="bits must be one of 4, 8, not 3"):
        QuantSpec(bits=3)
    with pytest.raises(UserError, match="power of two"):
        QuantSpec(block=24)
    with pytest.raises(UserError, match="block 32 does not divide its input size 48"):
        quantize(torch.zeros(4, 48), QuantSpec(4, 32))


def _code_tensor(name: str, codes: torch.Tensor, bits: int) -> TensorProto:
    """uint4 (packed two per byte over the flattened tensor, low nibble first) or uint8 initializer."""
    if bits == 8:
        return numpy_helper.from_array(codes.numpy(), name)
    flat = codes.flatten()
    flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
    return helper.make_tensor(name, TensorProto.UINT4, list(codes.shape), pack_codes(flat, 4).numpy().tobytes(), raw=True)


def _dequantize_linear_model(quantized, bits: int) -> onnx.ModelProto:
    """ONNX opset 21 blocked DequantizeLinear of the uint4 / uint8 codes."""
    out, inp = quantized.shape
    zero_points = (quantized.zero_points if quantized.zero_points is not None
                   else torch.full(quantized.scales.shape, 1 << (bits - 1), dtype=torch.uint8))
    inits = [_code_tensor("codes", quantized.codes, bits), numpy_helper.from_array(quantized.scales.numpy(), "scales"),
             _code_tensor("zeros", zero_points, bits)]
    node = helper.make_node("DequantizeLinear", ["codes", "scales", "zeros"], ["weight"], axis=1,
                            block_size=quantized.spec.block)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("weight", TensorProto.FLOAT, [out, inp])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_dequantize_linear_computes_the_same_weights(bits, symmetric):
    import onnxruntime as ort

    quantized = quantize(hand_made_weight(), QuantSpec(bits, BLOCK, symmetric))
    model = _dequantize_linear_model(quantized, bits)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (weight,) = session.run(["weight"], {})
    np.testing.assert_array_equal(weight, dequantize(quantized).numpy())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_computes_x_times_the_dequantized_weight(bits, symmetric):
    import onnxruntime as ort

    quantized = quantize(hand_made_weight(), QuantSpec(bits, BLOCK, symmetric))
    out, inp = quantized.shape
    blocks = inp // BLOCK
    b = pack_codes(quantized.codes, bits).reshape(out, blocks, BLOCK * bits // 8)
    inits = [numpy_helper.from_array(b.numpy(), "b"), numpy_helper.from_array(quantized.scales.numpy().reshape(-1), "scales")]
    inputs = ["x", "b", "scales"]
    if not symmetric:
        zero_rows = quantized.zero_points
        if bits == 4:
            zero_rows = torch.cat([zero_rows, zero_rows.new_zeros(out, blocks % 2)], dim=1)
        inits.append(numpy_helper.from_array(pack_codes(zero_rows, bits).numpy().reshape(-1), "zeros"))
        inputs.append("zeros")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=inp, N=out, bits=bits,
                            block_size=BLOCK)
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, inp])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, inp)).astype(np.float32)
    (y,) = session.run(["y"], {"x": x})
    expected = x @ dequantize(quantized).numpy().T
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
