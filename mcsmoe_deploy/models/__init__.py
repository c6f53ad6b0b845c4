"""Architecture adapters: find a model's MoE layers, read or write its experts, and answer the family
facts other stages need (routing, shared expert, KV geometry, exportability, what a token reads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..memory import read_weights_without_mmap, return_large_frees_to_os
from .base import ExpertLayout, ExpertWeights, FamilyAdapter, MoELayer, Routing
from .families import ADAPTERS
from .safetensors_header import read_header

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SUPPORTED_FAMILIES = ", ".join(a.family for a in ADAPTERS)
# config attributes that mark a mixture-of-experts model of a family we do not support
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def adapter_for_config(config) -> FamilyAdapter:
    """The adapter for a transformers config (or a config.json dict); UserError if unsupported."""
    as_dict = config if isinstance(config, dict) else config.to_dict()
    model_type = as_dict.get("model_type", "")
    if not model_type:
        raise UserError("config.json has no model_type; it is not a Hugging Face model config "
                        f"(supported families: {SUPPORTED_FAMILIES})")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if any(as_dict.get(key) for key in _MOE_CONFIG_KEYS):
        raise UserError(f"unsupported mixture-of-experts model type {model_type!r}; supported families: {SUPPORTED_FAMILIES}")
    raise UserError(f"not a mixture-of-experts model (model type {model_type!r}); supported families: {SUPPORTED_FAMILIES}")


def read_config_dict(model_dir: str | Path) -> dict:
    """config.json of a model directory, with clear errors for a missing or broken one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"no config.json in {model_dir}: not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{config_path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} holds a JSON {type(config).__name__}, not an object of settings")
    return config


def check_config_values(adapter: FamilyAdapter, config: dict, where: str | Path) -> None:
    """UserError unless the sizes the adapter reads from `config` (a config.json dict) are positive
    integers and a token picks no more experts than there are; checked before transformers reads them."""
    from transformers import CONFIG_MAPPING

    try:  # the values transformers will use (its defaults, the file's own over them); it checks types itself
        view = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    except Exception as exc:  # transformers' own validation errors have no common base class
        raise UserError(f"{where}: {' '.join(str(exc).split())}") from None
    layout = adapter.expert_layout(view)
    sizes = {"experts": adapter.num_experts(view), "experts per token": adapter.top_k(view),
             "hidden size": layout.hidden_size, "expert intermediate size": layout.intermediate_size}
    for what, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: {what} must be a positive integer, not {value!r}")
    if sizes["experts per token"] > sizes["experts"]:
        raise UserError(f"{where}: {sizes['experts per token']} experts per token, but the model has "
                        f"{sizes['experts']} experts")


def check_weights(model_dir: str | Path) -> None:
    """Fail with one clear line if the safetensors weights are missing, truncated, corrupt or lie in their
    headers (models/safetensors_header.py), before any tensor is read. Pickled weights (.bin, .pt) are never
    opened: a folder with only those is told to convert them."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise UserError(f"{model_dir} holds pickled weights ({', '.join(pickled[:3])}), which are never loaded "
                            "(unpickling runs code): convert them to safetensors first")
        raise UserError(f"no *.safetensors weights in {model_dir}")
    for path in files:
        read_header(path)


# safetensors names of the floating dtypes a checkpoint is stored in, as torch dtypes
_STORED_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float32}


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The floating dtype most of the checkpoint's weight bytes are stored in (bf16, fp16 or fp32; fp64 counts as
    fp32), read from the safetensors headers: what a compressed checkpoint of it is written in."""
    stored: dict[str, int] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for entry in read_header(path).values():
            if entry["dtype"] in _STORED_FLOAT_DTYPES:
                begin, end = entry["data_offsets"]
                stored[entry["dtype"]] = stored.get(entry["dtype"], 0) + end - begin
    return _STORED_FLOAT_DTYPES[max(stored, key=stored.get)] if stored else torch.float32


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """`device` if this machine has it: "cpu", "auto", "cuda" or "cuda:N" with CUDA present; else UserError."""
    if device in ("cpu", "auto"):
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if parsed.type != "cuda":
        raise UserError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but this machine has no CUDA GPU (torch {torch.__version__}); "
                        "use cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = torch.float32):
    """Load a supported MoE checkpoint directory with transformers.

    device: "cpu", "cuda", "cuda:N", "auto" (accelerate's device_map, for a
    model larger than one device), or None for the GPU when there is one.
    Returns (model in eval mode, adapter).
    """
    device = check_device(device or default_device())
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    config_dict = read_config_dict(model_dir)
    adapter = adapter_for_config(config_dict)
    check_config_values(adapter, config_dict, Path(model_dir) / "config.json")
    check_weights(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    return_large_frees_to_os()
    # use_kernels=False: transformers 5.25's from_pretrained defaults it to True when the `kernels` package is
    # installed (read in its source); on a GPU that swaps layers for hub kernels fetched at run time (its
    # documented behaviour, not run here: no GPU session loads models). We compute, patch for export and
    # compare the modules transformers defines
    try:
        if device == "auto":
            auto_class = AutoModelForSeq2SeqLM if adapter.encoder_decoder else AutoModelForCausalLM
            model, info = auto_class.from_pretrained(model_dir, config=config, dtype=dtype, device_map="auto",
                                                     use_safetensors=True,  # never a pickle beside them
                                                     use_kernels=False, output_loading_info=True)
        else:
            # our own pread-backed state dict: one copy of the weights in memory, not two (see memory.py)
            mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if adapter.encoder_decoder else MODEL_FOR_CAUSAL_LM_MAPPING
            weights = read_weights_without_mmap(model_dir)
            model, info = mapping[type(config)].from_pretrained(None, config=config, state_dict=weights, dtype=dtype,
                                                                use_kernels=False, output_loading_info=True)
            del weights
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load {model_dir}: {str(exc).splitlines()[0]}") from None
    # transformers fills weights the files lack with random values: a decoy or partial file would be
    # compressed and exported as if it were the model
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UserError(f"the safetensors weights in {model_dir} lack {len(missing)} of the model's tensors "
                        f"(first: {missing[0]}); they do not hold this model")
    if device != "auto":
        model.to(device)
    return model.eval(), adapter


__all__ = [
    "ADAPTERS",
    "SUPPORTED_FAMILIES",
    "ExpertLayout",
    "ExpertWeights",
    "FamilyAdapter",
    "MoELayer",
    "Routing",
    "adapter_for_config",
    "check_config_values",
    "check_device",
    "check_weights",
    "stored_dtype",
    "default_device",
    "load_model",
    "read_config_dict",
]
