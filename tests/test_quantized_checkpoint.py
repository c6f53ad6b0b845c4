"""Quantization as a compression stage: what the checkpoint stores is what `load_compressed` computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mcsmoe_deploy import CompressionRecipe, compress_model, load_compressed
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.compress import quantizable_rank
from mcsmoe_deploy.grouped_experts import GroupedLowRankExperts, GroupedProjection, ProjectionSpec
from mcsmoe_deploy.quantization import QuantSpec, dequantize, quantize

from conftest import model_inputs

FAST = dict(max_calib_tokens=1024, calib_seq_len=32)


def test_a_quantized_projection_computes_with_exactly_the_dequantized_weights():
    torch.manual_seed(0)
    spec = ProjectionSpec(48, 32, rank=16, sparse_rows=3)
    projection = GroupedProjection(2, spec)
    with torch.no_grad():
        for tensor in (projection.left, projection.right, projection.sparse_values):
            tensor.normal_()
        projection.sparse_rows.copy_(torch.tensor([[0, 5, 5], [47, 1, 2]]))
    quant = QuantSpec(4, 16, symmetric=False)
    quantized = projection.quantized(quant)
    x = torch.randn(7, 32)
    for group in range(2):
        left = dequantize(quantize(projection.left[group].detach(), quant))
        right = dequantize(quantize(projection.right[group].detach(), quant))
        expected = (x @ right.T) @ left.T
        expected = expected.index_add(1, projection.sparse_rows[group], x @ projection.sparse_values[group].detach().T)
        assert torch.equal(quantized(x, group), expected)
        assert torch.equal(quantized.factor("left", group), left)
    # stored: int4 codes two per byte, a scale and a zero point per block of 16
    assert tuple(quantized.left_codes.shape) == (2, 48, 8) and quantized.left_codes.dtype == torch.uint8
    assert tuple(quantized.right_scales.shape) == (2, 16, 2) and tuple(quantized.right_zero_points.shape) == (2, 16, 2)


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_quantized_checkpoint_reloads_to_the_same_logits_and_is_smaller(family, tiny_dirs, tmp_path):
    plain = compress_model(tiny_dirs[family], tmp_path / "plain", CompressionRecipe(experts=4, **FAST), progress=False)
    # experts only: what every quantized checkpoint was before quant_scope (tests/test_quantized_linear.py: "all")
    recipe = CompressionRecipe(experts=4, quantize="int4", quant_block=16, quant_scope="experts", quant_symmetric=True,
                               **FAST)
    result = compress_model(tiny_dirs[family], tmp_path / "int4", recipe, progress=False)
    section = json.loads((tmp_path / "int4" / "config.json").read_text())["mcsmoe"]
    assert "quantized_linears" not in section  # readable by earlier versions
    specs = [spec for layer in section["layers"].values() for spec in layer["projections"].values()]
    assert specs and all(spec["quant"] == {"bits": 4, "block": 16, "symmetric": True} for spec in specs)
    # int4 codes plus fp32 scales per 16 weights: 0.75 bytes a weight instead of 4
    assert result.after.expert_bytes == pytest.approx(plain.after.expert_bytes * 0.75 / 4, rel=0.01)
    with safe_open(str(tmp_path / "int4" / "model.safetensors"), "pt") as weights:
        codes = [name for name in weights.keys() if name.endswith("weight_codes")]
        assert codes and all(weights.get_tensor(name).dtype == torch.uint8 for name in codes)

    merged, quantized = load_compressed(tmp_path / "plain"), load_compressed(tmp_path / "int4")
    # the quantized model is the merged one with every expert weight replaced by its dequantized codes
    reference = load_compressed(tmp_path / "plain")
    for module in (m for m in reference.modules() if isinstance(m, GroupedLowRankExperts)):
        with torch.no_grad():
            for projection in module.projections.values():
                for g in range(projection.num_groups):
                    projection.weight[g] = dequantize(quantize(projection.weight[g], QuantSpec(4, 16)))
    inputs = model_inputs(family)
    with torch.no_grad():
        got, want, before = (m(**inputs).logits for m in (quantized, reference, merged))
    assert torch.equal(got, want)
    assert not torch.equal(got, before)  # quantization did change the weights (quality: benchmarks, not tiny random models)


def test_low_rank_ranks_round_to_whole_blocks():
    assert quantizable_rank(17, 48, 16) == 32
    assert quantizable_rank(32, 48, 16) == 32
    assert quantizable_rank(40, 40, 16) == 32  # rounding up would pass the full rank
    assert quantizable_rank(5, 12, 16) is None  # no block fits: stored dense


def test_quantized_low_rank_checkpoint(tiny_dirs, tmp_path):
    recipe = CompressionRecipe(experts=4, rank_ratio=0.3, sparse_keep=0.1, quantize="int8", quant_block=16, **FAST)
    result = compress_model(tiny_dirs["mixtral"], tmp_path / "out", recipe, progress=False)
    ranks = {spec.rank for layer in result.applied.layers for spec in layer.projections.values()}
    assert ranks and all(rank is not None and rank % 16 == 0 for rank in ranks)
    model = load_compressed(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs("mixtral")).logits).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "int3"], "argument --quantize: invalid choice: 'int3'"),
        (["--quantize", "int4", "--quant-block", "32"],
         "--quant-block 32 does not divide the input size 48 of the down projection; 16 divides every projection's"),
        (["--quantize", "int4", "--quant-block", "24"], "--quant-block must be a power of two >= 16, not 24"),
    ],
)
def test_bad_quantization_options_are_one_line_and_write_nothing(extra, message, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", str(tiny_dirs["mixtral"]), str(out), "--experts", "4", "--quiet", *extra]
    if "invalid choice" in message:  # argparse refuses it while parsing
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_exporting_a_quantized_checkpoint_is_one_line(tiny_dirs, tmp_path, capsys):
    # decoder-only families export quantized checkpoints (tests/test_quantized_export.py); Switch does not yet
    recipe = CompressionRecipe(experts=4, quantize="int4", quant_block=16, **FAST)
    compress_model(tiny_dirs["switch_transformers"], tmp_path / "int4", recipe, progress=False)
    assert main(["export", str(tmp_path / "int4"), str(tmp_path / "out.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stores quantized experts" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]
