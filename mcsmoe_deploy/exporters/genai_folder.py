"""An onnxruntime-genai model folder around an exported decoder graph.

onnxruntime-genai (the generation library of the onnxruntime ecosystem) loads a folder with
the graph, a `genai_config.json` that maps its decoder inputs and outputs to the graph's names
and gives the KV geometry, special tokens and search defaults, and the tokenizer files. Our
decoder graph is already what genai's decoder-only path feeds (input_ids, attention_mask,
[position_ids,] past_key_values.N.key/value -> logits, present.N.key/value; see contract.py), so
the folder is the graph plus two kinds of files written here.

`past_present_share_buffer` is false: our presents are the pasts with the new keys appended
([B, kv_heads, P + S, head_dim]), not a preallocated buffer of the context length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..contract import (
    ATTENTION_MASK, INPUT_IDS, LOGITS, PAST_PREFIX, POSITION_IDS, PRESENT_PREFIX,
    geometry_from_graph, read_graph,
)
from ..corpus import copy_tokenizer_files
from ..errors import UserError
from ..models import adapter_for_config, read_config_dict

GENAI_CONFIG = "genai_config.json"
GRAPH_FILE = "model.onnx"
# genai's own model types with the plain decoder-only path, one per family (genai 0.18 does not
# know the MoE names; the type selects input handling, not kernels: the graph carries those)
GENAI_MODEL_TYPES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "olmoe": "olmo"}
# generation_config.json keys genai's "search" section takes under the same name
_SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams", "length_penalty",
                "no_repeat_ngram_size", "min_length", "diversity_penalty", "num_return_sequences",
                "early_stopping")


def check_genai_source(model_dir: str | Path) -> str:
    """The genai model type for checkpoint `model_dir`; UserError when genai cannot run its export.

    Decoder-only families only (Switch Transformers is an encoder-decoder); the folder needs
    `tokenizer.json`, the one tokenizer format genai reads, and special tokens inside the vocabulary.
    """
    family = adapter_for_config(read_config_dict(model_dir)).family
    if family not in GENAI_MODEL_TYPES:
        raise UserError(f"onnxruntime-genai runs decoder-only graphs with a KV cache; {family} is not one "
                        f"(--genai takes {', '.join(GENAI_MODEL_TYPES)})")
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise UserError(f"onnxruntime-genai reads tokenizer.json, and {model_dir} has none; "
                        "save the tokenizer with transformers' save_pretrained first")
    special_tokens(model_dir, int(read_config_dict(model_dir).get("vocab_size", 0)))
    return GENAI_MODEL_TYPES[family]


def special_tokens(model_dir: str | Path, vocab_size: int) -> dict[str, Any]:
    """bos/eos/pad token ids (an id or a list of ids) from generation_config.json, else config.json, else 0;
    UserError when one is outside the vocabulary (genai refuses such a folder when it loads it)."""
    config = read_config_dict(model_dir)
    generation = _read_json(Path(model_dir) / "generation_config.json")
    tokens = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = generation.get(name, config.get(name))
        value = 0 if value is None else value
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
            raise UserError(f"{name} {value} of {model_dir} is outside the vocabulary of {vocab_size} tokens; "
                            "fix it in generation_config.json or config.json")
        tokens[name] = value
    return tokens


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def genai_config(model_dir: str | Path, graph_path: str | Path) -> dict[str, Any]:
    """The `genai_config.json` contents for `graph_path`, our decoder graph of checkpoint `model_dir`.

    The KV geometry and vocabulary come from the graph's own inputs and outputs, heads and
    hidden size from the checkpoint's config; bos/eos/pad from generation_config.json, else config.json; search
    defaults are greedy unless generation_config.json says otherwise; `max_length` is the
    context length (`max_position_embeddings`).
    """
    model_dir = Path(model_dir)
    model_type = check_genai_source(model_dir)
    config = read_config_dict(model_dir)
    generation = _read_json(model_dir / "generation_config.json")
    (num_layers, kv_heads, head_dim), vocab_size = geometry_from_graph(graph_path)
    context = int(config.get("max_position_embeddings", 4096))
    # a target-ort graph whose attention rotates inside GroupQueryAttention reads no position_ids
    positions = {"position_ids": POSITION_IDS} if POSITION_IDS in {
        i.name for i in read_graph(graph_path, weight_bytes=False).graph.input} else {}

    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
              "max_length": context, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
              "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True}
    search.update({key: generation[key] for key in _SEARCH_KEYS if generation.get(key) is not None})
    if generation.get("max_length") is not None:
        search["max_length"] = min(int(generation["max_length"]), context)
    search["past_present_share_buffer"] = False
    return {
        "model": {
            "type": model_type,
            **special_tokens(model_dir, vocab_size),
            "context_length": context,
            "vocab_size": vocab_size,
            "decoder": {
                "filename": Path(graph_path).name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": int(config["hidden_size"]),
                "head_size": head_dim,
                "num_attention_heads": int(config["num_attention_heads"]),
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": num_layers,
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, **positions,
                           "past_key_names": f"{PAST_PREFIX}%d.key", "past_value_names": f"{PAST_PREFIX}%d.value"},
                "outputs": {"logits": LOGITS, "present_key_names": f"{PRESENT_PREFIX}%d.key",
                            "present_value_names": f"{PRESENT_PREFIX}%d.value"},
            },
        },
        "search": search,
    }


def write_genai_files(model_dir: str | Path, graph_path: str | Path) -> list[Path]:
    """Write `genai_config.json` and copy the tokenizer files of checkpoint `model_dir` beside
    `graph_path`, our decoder graph of it. Returns the paths written."""
    folder = Path(graph_path).parent
    config_path = folder / GENAI_CONFIG
    config_path.write_text(json.dumps(genai_config(model_dir, graph_path), indent=2) + "\n", encoding="utf-8")
    return [config_path, *(folder / name for name in copy_tokenizer_files(model_dir, folder))]


__all__ = ["GENAI_CONFIG", "GENAI_MODEL_TYPES", "check_genai_source", "genai_config", "special_tokens",
           "write_genai_files"]
