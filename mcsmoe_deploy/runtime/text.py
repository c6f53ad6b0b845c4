"""Text in, text out: `mcsmoe run` as a function."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


from ..contract import ENCODER_FILE, read_graph
from ..corpus import TOKENIZER_FILES, load_tokenizer_from
from ..errors import UserError
from .generation import GenerationConfig, GenerationResult, generate, left_pad
from .session import DecoderSession, Seq2SeqSession, check_model_path, is_seq2seq_export, open_session


def tokenizer_dir_for(model: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Where the tokenizer of `model` lives: `tokenizer` if given; a checkpoint directory itself; for an
    encoder-decoder export folder, the folder when it holds tokenizer files; for an ONNX file (or an
    older export folder), the checkpoint it was exported from (`mcsmoe.source_model` metadata), else
    the file's own folder."""
    if tokenizer is not None:
        return Path(tokenizer)
    model = Path(model)
    if model.is_dir() and is_seq2seq_export(model):
        if any((model / name).is_file() for name in TOKENIZER_FILES):  # copied in by the export
            return model
        model = model / ENCODER_FILE
    if model.is_dir():
        return model
    props = {p.key: p.value for p in read_graph(model).metadata_props}
    source = props.get("mcsmoe.source_model")
    return Path(source) if source and Path(source).is_dir() else model.parent


@dataclass
class TextGeneration:
    """Prompts, their continuations, and the generation timings."""

    prompts: list[str]
    completions: list[str]
    result: GenerationResult
    session: dict


def generate_text(
    model: str | Path,
    prompts: list[str],
    backend: str = "ort",
    config: GenerationConfig | None = None,
    tokenizer: str | Path | None = None,
    session: DecoderSession | Seq2SeqSession | None = None,
    **session_options,
) -> TextGeneration:
    """Tokenize `prompts`, generate with `backend` (see `open_session`), decode the new tokens.

    Stop tokens default to the tokenizer's end-of-text token; padding uses its pad token
    (or end-of-text). Pass an open `session` to reuse it. An encoder-decoder session encodes
    the prompts (left-padded) and generates from its decoder's start token.
    """
    if session is None:
        check_model_path(model, backend)  # before the tokenizer: a wrong model is named as such
    tok = load_tokenizer_from(tokenizer_dir_for(model, tokenizer), "pass --tokenizer DIR, the checkpoint directory")
    eos = tok.eos_token_id
    config = config or GenerationConfig()
    if not config.stop_token_ids and eos is not None:
        config = replace(config, stop_token_ids=(eos,))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    config = replace(config, pad_token_id=pad)
    encoded = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise UserError("a prompt is empty after tokenization; give some text")
    session = session or open_session(model, backend, **session_options)
    if session.vocab_size and max(max(ids) for ids in encoded) >= session.vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_dir_for(model, tokenizer)} does not match the model "
                        f"(token ids beyond its vocabulary of {session.vocab_size})")
    if isinstance(session, Seq2SeqSession):
        ids, mask, _ = left_pad(encoded, pad)
        decoder = session.decoder(session.encode(ids, mask))
        result = generate(decoder, [[session.decoder_start_token_id]] * len(encoded), config)
    else:
        result = generate(session, encoded, config)
    completions = [tok.decode(tokens, skip_special_tokens=True) for tokens in result.tokens]
    return TextGeneration(list(prompts), completions, result, session.describe())


__all__ = ["TextGeneration", "generate_text", "tokenizer_dir_for"]
