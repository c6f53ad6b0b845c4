"""A bf16 model held in bf16 computes as the fp32-loaded one, a layer at a time (models/fp32_compute.py), so
`compress_model` of a merge or low-rank recipe holds it in bf16 (half the memory) and writes the very
checkpoint the fp32 path writes: every tensor equal bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mcsmoe_deploy as m
from hub_layout import save_hub_layout
from mcsmoe_deploy.compress import CalibratedModel
from mcsmoe_deploy.compress.stats import forward_inputs
from mcsmoe_deploy.models.fp32_compute import computed_in_fp32

CALIBRATION = dict(max_calib_tokens=512, calib_seq_len=32)
FAMILIES = ("mixtral", "qwen2_moe", "switch_transformers")


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("held")
    return {family: save_hub_layout(family, root / family, shards=2) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_computed_in_fp32_gives_the_fp32_logits(family, hub_dirs):
    fp32, adapter = m.load_model(hub_dirs[family], device="cpu")
    held, _ = m.load_model(hub_dirs[family], device="cpu", dtype=torch.bfloat16)
    assert not fp32.use_kernels and not held.use_kernels  # no hub kernels swapped in (fetched at run time)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    dtypes = {name: p.dtype for name, p in held.named_parameters()}  # bf16 (Switch keeps its `wo` in fp32)
    with torch.no_grad():
        expected = fp32(**forward_inputs(fp32, adapter, ids)).logits
        with computed_in_fp32(held):
            got = held(**forward_inputs(held, adapter, ids)).logits
        assert {name: p.dtype for name, p in held.named_parameters()} == dtypes  # only upcast for a part's forward
        plain = held(**forward_inputs(held, adapter, ids)).logits  # hooks gone: bf16 arithmetic again
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert plain.dtype == torch.bfloat16 and not torch.equal(plain.float(), expected)
    assert torch.bfloat16 in dtypes.values()


def _fp32_path(source, out, recipe):
    """What compress_model wrote before holding models in their stored dtype: load in fp32, compress, cast, save."""
    calibrated = CalibratedModel(source, recipe, device="cpu", progress=False)
    assert calibrated.held_dtype == torch.float32
    compressed = calibrated.compress(recipe, in_place=True)
    calibrated.to_stored_dtype(compressed)
    calibrated.save(compressed, out)


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(path)).items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rank_ratio", (1.0, 0.5))
def test_held_in_bf16_compression_writes_the_fp32_paths_checkpoint(family, rank_ratio, hub_dirs, tmp_path):
    recipe = m.CompressionRecipe(experts=2, rank_ratio=rank_ratio, **CALIBRATION)
    m.compress_model(hub_dirs[family], tmp_path / "held", recipe, device="cpu", progress=False)
    _fp32_path(hub_dirs[family], tmp_path / "fp32", recipe)
    held, reference = _tensors(tmp_path / "held"), _tensors(tmp_path / "fp32")
    assert sorted(held) == sorted(reference)
    assert any(".experts." in name for name in held)
    for name, tensor in reference.items():
        assert held[name].dtype == tensor.dtype and torch.equal(held[name], tensor), name
    assert {t.dtype for t in held.values() if t.is_floating_point()} == {torch.bfloat16}


def test_training_recipe_refuses_a_held_model(hub_dirs):
    with pytest.raises(ValueError, match="fp32"):
        CalibratedModel(hub_dirs["mixtral"], m.CompressionRecipe(experts=2, distill_steps=1, **CALIBRATION),
                        hold_stored_dtype=True)
