"""Tiny models of every supported family, built from configs with fixed seeds (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, LAYERS, VOCAB = 32, 48, 8, 2, 2, 320
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers")


def tiny_config(family: str):
    import transformers as tf

    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # a large init spreads router logits so routing is not uniform
    )
    moe = dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K)
    if family == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common, **moe, moe_intermediate_size=INTERMEDIATE, shared_expert_intermediate_size=INTERMEDIATE,
            decoder_sparse_step=1, mlp_only_layers=[],
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common, **moe, head_dim=8, moe_intermediate_size=INTERMEDIATE, decoder_sparse_step=1, mlp_only_layers=[]
        )
    if family == "olmoe":
        return tf.OlmoeConfig(**common, **moe)
    if family == "switch_transformers":
        return tf.SwitchTransformersConfig(
            d_model=HIDDEN, d_ff=INTERMEDIATE, d_kv=8, num_heads=4, num_layers=LAYERS, num_decoder_layers=LAYERS,
            num_experts=EXPERTS, vocab_size=VOCAB, num_sparse_encoder_layers=LAYERS, num_sparse_decoder_layers=LAYERS,
            expert_capacity=64, router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0,
            initializer_factor=4.0,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family)
    cls = tf.SwitchTransformersForConditionalGeneration if family == "switch_transformers" else tf.AutoModelForCausalLM
    model = cls.from_config(config) if cls is tf.AutoModelForCausalLM else cls(config)
    return model.float().eval()


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + end of text), built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_tiny(family: str, path, seed: int = 0):
    model = tiny_model(family, seed)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A saved tiny checkpoint (with tokenizer) per family."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


def model_inputs(family: str, batch: int = 2, seq: int = 12, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (batch, seq), generator=generator)
    if family == "switch_transformers":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 256, (batch, seq // 2), generator=generator)}
    return {"input_ids": ids}


@pytest.fixture
def returned_by(monkeypatch):
    """returned_by(module, name) -> a list that receives every value the real `module.name` returns.

    CLI tests read the report objects a command printed, not numbers parsed back out of its text.
    """

    def spy(module, name: str) -> list:
        real, values = getattr(module, name), []

        def wrapper(*args, **kwargs):
            values.append(real(*args, **kwargs))
            return values[-1]

        monkeypatch.setattr(module, name, wrapper)
        return values

    return spy
