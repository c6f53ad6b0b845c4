"""GPTQ of the linear layers outside the experts (compress/gptq_linears.py): the moments it fits to,
its exact property, and a scope-all checkpoint whose attention and LM head carry GPTQ codes; and the
quantization symmetry options (asymmetric by default, --quant-symmetric, the two refused together)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mcsmoe_deploy as m
from mcsmoe_deploy.cli import main
from mcsmoe_deploy.compress import LinearInputMoments, gptq_weight_for, linears_to_quantize
from mcsmoe_deploy.quantization import QuantSpec, quantize

from conftest import model_inputs

FAST = dict(experts=4, max_calib_tokens=1024, calib_seq_len=32, quant_block=16)


def test_linear_moments_are_the_sum_of_x_xT_of_the_layer_inputs(tiny_dirs):
    model, adapter = m.load_model(tiny_dirs["mixtral"])
    blocks = torch.randint(1, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    moments = LinearInputMoments(model, adapter, blocks, batch_size=2, progress=False)(["lm_head"])
    with torch.no_grad():  # the LM head's input is the last hidden state (after the final norm)
        hidden = model(input_ids=blocks, output_hidden_states=True).hidden_states[-1]
    hidden = hidden.reshape(-1, model.config.hidden_size)
    want = hidden.double().T @ hidden.double()
    assert float((moments["lm_head"] - want).abs().max()) <= 1e-5 * float(want.abs().max())
    # max_tokens keeps whole blocks: 20 tokens of blocks of 16 -> 2 blocks
    assert LinearInputMoments(model, adapter, blocks, max_tokens=20, progress=False).blocks.shape == (2, 16)


@pytest.mark.parametrize("spec", [QuantSpec(4, 16, True), QuantSpec(4, 16, False)], ids=["sym", "asym"])
def test_gptq_weight_is_round_to_nearest_for_uncorrelated_inputs_and_better_for_correlated(spec):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=generator)
    diagonal = gptq_weight_for(torch.diag(torch.rand(64, generator=generator) + 0.5))(weight, spec)
    rtn = quantize(weight, spec)
    assert torch.equal(diagonal.codes, rtn.codes) and torch.equal(diagonal.scales, rtn.scales)
    x = torch.randn(512, 6, generator=generator) @ torch.randn(6, 64, generator=generator)
    x += 0.05 * torch.randn(512, 64, generator=generator)
    fitted = gptq_weight_for(x.double().T @ x.double())(weight, spec)

    def error(q) -> float:
        return float((x @ (weight - q.dequantize()).T).norm())

    assert error(fitted) < 0.7 * error(rtn)  # measured 0.3-0.4x on these inputs


def test_gptq_scope_all_fits_attention_and_head_and_reloads_exactly(tiny_dirs, tmp_path):
    recipe = m.CompressionRecipe(quantize="int4", quant_method="gptq", **FAST)
    source = m.CalibratedModel(tiny_dirs["mixtral"], recipe, progress=False)
    compressed = source.compress()
    rtn = copy.deepcopy(compressed)
    source.quantize(compressed)
    out = source.save(compressed, tmp_path / "gptq")
    m.quantize_model(rtn.model, source.adapter, recipe.quant_spec, "all")  # round to nearest everywhere
    names = linears_to_quantize(m.load_model(tiny_dirs["mixtral"])[0], source.adapter)
    assert "lm_head" in names and "model.layers.0.self_attn.q_proj" in names
    for name in names:  # every linear layer has its own GPTQ codes, not round to nearest's
        assert not torch.equal(compressed.model.get_submodule(name).weight_codes,
                               rtn.model.get_submodule(name).weight_codes), name
    reloaded = m.load_compressed(out)
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, compressed.model(**inputs).logits)


def _quantized_linears(out) -> set:
    section = json.loads((out / "config.json").read_text())["mcsmoe"]
    return {json.dumps(spec, sort_keys=True) for spec in section["quantized_linears"].values()}


def test_codes_are_asymmetric_by_default_and_symmetric_on_request(tiny_dirs, tmp_path, capsys):
    argv = ["compress", str(tiny_dirs["mixtral"]), "--experts", "4", "--max-calib-tokens", "1024",
            "--quantize", "int4", "--quant-block", "16", "--quiet"]
    assert main(argv[:2] + [str(tmp_path / "default")] + argv[2:]) == 0
    assert _quantized_linears(tmp_path / "default") == {'{"bits": 4, "block": 16, "symmetric": false}'}
    assert main(argv[:2] + [str(tmp_path / "sym")] + argv[2:] + ["--quant-symmetric"]) == 0
    assert _quantized_linears(tmp_path / "sym") == {'{"bits": 4, "block": 16, "symmetric": true}'}
    capsys.readouterr()
    for command in (argv[:2] + [str(tmp_path / "both")] + argv[2:],
                    ["export", str(tiny_dirs["mixtral"]), str(tmp_path / "both.onnx"), "--quantize", "int4"]):
        with pytest.raises(SystemExit) as exited:
            main(command + ["--quant-symmetric", "--quant-asymmetric"])
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith("argument --quant-asymmetric: not allowed with argument --quant-symmetric")
        assert not (tmp_path / "both").exists() and not (tmp_path / "both.onnx").exists()
