"""The compressed checkpoint: an ordinary Hugging Face directory with G experts per layer.

    config.json        the model's own config plus an "mcsmoe" section (format, family,
                       per layer: G, expert_to_group, dominant experts, frequencies and
                       per-projection rank / sparse rows and quantization; the recipe;
                       calibration facts; "quantized_linears": {module: quantization} of
                       linear layers stored as QuantizedLinear, when any; "quantized_embeddings":
                       {module: quantization[, "shares_codes_with": head]} of input embeddings
                       stored as QuantizedEmbedding, when quantized)
    model.safetensors  every tensor, experts as `<layer>.experts.projections.<name>.{weight|left|right|
                       sparse_rows|sparse_values}` and `<layer>.experts.expert_to_group`
    tokenizer files    copied from the source model

Writing goes through files.staged_output: a staging folder beside the target, swapped in at the end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .files import staged_output
from .grouped_experts import GroupedLowRankExperts, ProjectionSpec
from .memory import read_weights_without_mmap, return_large_frees_to_os
from .quantization import QuantSpec
from .quantized_embedding import (QuantizedEmbedding, install_quantized_embeddings, quantized_embedding_specs,
                                  share_quantized_tables, shared_table_buffers)
from .quantized_linear import install_quantized_linears, quantized_linear_specs
from .models import FamilyAdapter, adapter_for_config, check_weights, read_config_dict

# the newest format this reader knows. 2: some projection has a shared factor ("shared" in its entry,
# stored without the group axis); 3: some projection has a shared full-rank base ("shared": "base", a
# tensor a format-2 reader does not know); checkpoints without either are still written as 1, unchanged
FORMAT_VERSION = 3
SHARED_BASIS_FORMAT = 2
BASE_DELTA_FORMAT = 3
# the "mcsmoe" section's {module name: QuantSpec dict} of linear layers stored as QuantizedLinear
QUANTIZED_LINEARS = "quantized_linears"
# the "mcsmoe" section's {module name: QuantSpec dict[, "shares_codes_with": head]} of quantized input embeddings
QUANTIZED_EMBEDDINGS = "quantized_embeddings"
WEIGHTS_NAME = "model.safetensors"
# files of a source model directory that describe weights we rewrite, so they are not copied
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx.data")


def save_compressed(
    model: nn.Module,
    mcsmoe_section: dict,
    out_dir: str | Path,
    source_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write `model` (with GroupedLowRankExperts installed) as a compressed checkpoint directory.

    `mcsmoe_section` goes into config.json under "mcsmoe". Tokenizer and other
    small files of `source_dir` are copied. Returns the written directory.
    """
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        config = model.config.to_dict()
        config["mcsmoe"] = {"format_version": written_format_version(mcsmoe_section), **mcsmoe_section}
        linears = quantized_linear_specs(model)
        if linears:  # absent when only experts (or nothing) are quantized: older readers see what they know
            config["mcsmoe"][QUANTIZED_LINEARS] = {name: spec.to_dict() for name, spec in linears.items()}
        embeddings = quantized_embedding_specs(model)
        if embeddings:
            config["mcsmoe"][QUANTIZED_EMBEDDINGS] = embeddings
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(weights_to_save(model), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})

    return write_model_dir(write, out_dir, source_dir, force)


def written_format_version(mcsmoe_section: dict) -> int:
    """The format a checkpoint is written in: the oldest that holds it, so older readers refuse (in one
    line) only the checkpoints they would misread."""
    shared = {spec.get("shared") for layer in mcsmoe_section.get("layers", {}).values()
              for spec in layer.get("projections", {}).values()} - {None}
    return BASE_DELTA_FORMAT if "base" in shared else SHARED_BASIS_FORMAT if shared else 1


def save_standard(model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None,
                  force: bool = False) -> Path:
    """Write an ordinary transformers model (no compressed experts) with `save_pretrained`: the family's
    own config and tensor names, loadable by `AutoModelForCausalLM.from_pretrained` without this
    package. Tokenizer and other small files of `source_dir` are copied. Returns the written directory."""
    return write_model_dir(lambda staging: model.save_pretrained(staging), out_dir, source_dir, force)


def write_model_dir(write: Callable[[Path], None], out_dir: str | Path, source_dir: str | Path | None = None,
                    force: bool = False) -> Path:
    """Make the model directory `out_dir` through `staged_output`: the small files of `source_dir`
    (tokenizer ...) copied, then `write(folder)` adds config and weights."""
    out_dir = Path(out_dir)
    with staged_output(out_dir, force=force, inputs=() if source_dir is None else (source_dir,)) as staging:
        if source_dir is not None:
            for item in Path(source_dir).iterdir():
                if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(_NOT_COPIED_SUFFIXES):
                    shutil.copy2(item, staging / item.name)
        write(staging)
    return out_dir


def cast_to_stored_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating tensors `model` saves to `dtype` (the source checkpoint's, see models.stored_dtype),
    in place, and record it in `model.config.dtype`.

    Compression computes in fp32; the checkpoint it writes is in its source's dtype, so a bf16
    model does not come out twice its size per expert kept. Kept as they are: quantization scales
    (`*_scales`: fp32, what MatMulNBits and DequantizeLinear take in an fp32 graph, 1/16 of the
    codes' size at int4 blocks of 32) and buffers that are not saved (rotary tables).
    """
    cast_saved_tensors(model, dtype)
    model.config.dtype = dtype
    return model


def cast_saved_tensors(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and saved buffers of `module` (and its children) to `dtype`, in place,
    but for quantization scales and unsaved buffers (see cast_to_stored_dtype). Returns `module`."""
    for child in module.modules():
        if isinstance(child, QuantizedEmbedding):  # its rows come out in the model's dtype
            child.output_dtype = dtype
        for name, param in child.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in child.named_buffers(recurse=False):
            if (buffer.is_floating_point() and buffer.dtype != dtype and not name.endswith("_scales")
                    and name not in child._non_persistent_buffers_set):
                setattr(child, name, buffer.to(dtype))
    return module


def weights_to_save(model: nn.Module) -> dict:
    """The state dict without tied copies (lm_head tied to the embeddings, say; a quantized table that is
    its head's codes): their sources are kept."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | shared_table_buffers(model)
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name not in tied}


def load_compressed(model_dir: str | Path, device: str = "cpu") -> nn.Module:
    """Load a compressed checkpoint as a torch model whose MoE blocks compute the compressed semantics.

    The router of each layer is the original one (E experts); its experts module
    is a GroupedLowRankExperts with the layer's G merged experts. This model is
    the reference every exported graph is checked against.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config_dict = read_config_dict(model_dir)
    section = config_dict.get("mcsmoe")
    if section is None:
        raise UserError(f"{model_dir} is not a compressed checkpoint (config.json has no 'mcsmoe' section)")
    if section.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{model_dir} was written by a newer mcsmoe-deploy (format {section['format_version']})")
    adapter = adapter_for_config(config_dict)
    check_weights(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    auto_class = AutoModelForSeq2SeqLM if adapter.encoder_decoder else AutoModelForCausalLM
    # parameters on the meta device (no memory); buffers such as rotary tables built for real
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config)
    # the compressed experts on the meta device too: the checkpoint's tensors replace them (assign), and
    # allocating them first (fp32 zeros) held the expert weights three times over while loading
    with torch.device("meta"):
        install_compressed_experts(model, adapter, section)
    linears = {name: QuantSpec.from_dict(spec) for name, spec in section.get(QUANTIZED_LINEARS, {}).items()}
    install_quantized_linears(model, linears)
    install_quantized_embeddings(model, section.get(QUANTIZED_EMBEDDINGS, {}))
    return_large_frees_to_os()
    state = {name: tensor_slice[:] for name, tensor_slice in read_weights_without_mmap(model_dir).items()}
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    share_quantized_tables(model)
    missing = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise UserError(f"{model_dir}/{WEIGHTS_NAME} lacks {len(missing)} tensors, e.g. {missing[0]}")
    return model.to(device).eval()


def install_compressed_experts(model: nn.Module, adapter: FamilyAdapter, section: dict) -> None:
    """Give every MoE block of `model` an empty GroupedLowRankExperts shaped as `section` describes."""
    layout = adapter.expert_layout(model.config)
    layers = section["layers"]
    for layer in adapter.moe_layers(model):
        if layer.name not in layers:
            raise UserError(f"compressed checkpoint describes no layer {layer.name!r}")
        described = layers[layer.name]
        specs = {name: ProjectionSpec.from_dict(spec) for name, spec in described["projections"].items()}
        if described.get("router_rows") is not None:  # removed experts took their router rows with them
            adapter.keep_router_rows(layer.block, described["router_rows"])
        module = GroupedLowRankExperts(layout, described["expert_to_group"], specs, adapter.one_hot_dispatch)
        adapter.install_experts(layer.block, module)


def is_compressed_checkpoint(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a compressed checkpoint (config.json with an "mcsmoe" section)."""
    return "mcsmoe" in read_config_dict(model_dir)


def is_quantized_checkpoint(model_dir: str | Path) -> bool:
    """Whether a compressed checkpoint stores any weight quantized (`--quantize`): an expert projection,
    or a linear layer or embedding table listed under "quantized_linears" / "quantized_embeddings"."""
    section = read_config_dict(model_dir).get("mcsmoe") or {}
    if section.get(QUANTIZED_LINEARS) or section.get(QUANTIZED_EMBEDDINGS):
        return True
    return any(spec.get("quant") for layer in section.get("layers", {}).values()
               for spec in layer.get("projections", {}).values())


def compressed_layers(model: nn.Module) -> list[GroupedLowRankExperts]:
    """The GroupedLowRankExperts modules of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, GroupedLowRankExperts)]


__all__ = [
    "FORMAT_VERSION",
    "cast_saved_tensors",
    "cast_to_stored_dtype",
    "QUANTIZED_EMBEDDINGS",
    "QUANTIZED_LINEARS",
    "compressed_layers",
    "is_compressed_checkpoint",
    "is_quantized_checkpoint",
    "load_compressed",
    "save_compressed",
    "save_standard",
    "write_model_dir",
]
