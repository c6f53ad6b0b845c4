"""Calibration and evaluation text: the built-in corpus, text/JSONL readers, token blocks.

The built-in corpus is the Python documentation that ships with every CPython
(`pydoc_data.topics`, about 465 KB of English prose and code), so nothing is
downloaded. Topics are split deterministically: every tenth topic, in sorted
order, is held out for evaluation and never used for calibration or training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError

HELDOUT_EVERY = 10
# files any Hugging Face tokenizer is saved with (one of them at least)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
# the files a tokenizer may need beside those
TOKENIZER_SIDE_FILES = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja")


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copy the tokenizer files of folder `source` (regular files only, not links) into `destination`."""
    import shutil

    copied = []
    for name in (*TOKENIZER_FILES, *TOKENIZER_SIDE_FILES):
        item = Path(source) / name
        if item.is_file() and not item.is_symlink():
            shutil.copyfile(item, Path(destination) / name)
            copied.append(name)
    return copied


def load_tokenizer_from(directory: str | Path, why: str):
    """The tokenizer in `directory`; one UserError line saying `why` one is needed when there is none."""
    from transformers import AutoTokenizer

    # transformers 5 returns an empty tokenizer for a folder without one, rather than failing
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"no tokenizer in {directory} ({why}): none of {', '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"no usable tokenizer in {directory} ({why}): {str(exc).splitlines()[0]}") from None
    if len(tokenizer) == 0:
        raise UserError(f"the tokenizer in {directory} has an empty vocabulary ({why})")
    return tokenizer


def builtin_corpus(split: str = "train") -> str:
    """Return the built-in corpus text for `split` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout")]
    return "\n\n".join(topics[k] for k in chosen)


# share of characters that must be printable text (letters, digits, punctuation, whitespace)
MIN_TEXT_SHARE = 0.9


def _decoded_text(path: Path) -> str:
    """The file as UTF-8 text; UserError when it is not UTF-8 or is mostly not text (binary data)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"calibration file {path} is not UTF-8 text (byte {exc.start}: "
                        f"{data[exc.start:exc.start + 1]!r}); convert it to UTF-8") from None
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
    if text and printable / len(text) < MIN_TEXT_SHARE:
        raise UserError(f"calibration file {path} is mostly not text ({printable / len(text):.0%} printable "
                        f"characters, at least {MIN_TEXT_SHARE:.0%} needed)")
    return text


def read_text(path: str | Path) -> str:
    """Read calibration text from a plain text file or a JSONL file.

    JSONL lines are objects with a "text" field (the convention of HF datasets
    dumps); other lines are rejected with the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file not found: {path}" if not path.exists()
                        else f"calibration file {path} is not a file (give a .txt or .jsonl file)")
    raw = _decoded_text(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f'{path}:{number}: expected an object with a "text" string')
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise UserError(f"calibration file is empty: {path}")
    return raw


def calibration_text(source: str | Path | None) -> str:
    """Text for calibration: a file path, or None / "builtin" for the built-in corpus."""
    if source is None or str(source) == "builtin":
        return builtin_corpus("train")
    return read_text(source)


def token_blocks(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise `text` and cut it into full blocks of `seq_len` tokens.

    Returns a LongTensor [num_blocks, seq_len]. With `max_tokens`, at most that
    many tokens (rounded down to whole blocks, at least one block) are kept.
    """
    # verbose=False: the text is longer than the model maximum on purpose, it is cut into blocks below
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: max(seq_len, max_tokens)]
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)
