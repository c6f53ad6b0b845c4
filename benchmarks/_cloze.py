"""A next-word multiple-choice set from the held-out Python documentation, and its accuracy.

Each item is a held-out passage cut just before a word (lower-case, 4+ letters, one token of the
model's vocabulary with its leading space) and four candidate next words: the true one and three
distractors of about the same corpus frequency (drawn among the words nearest to it in frequency
rank), so that knowing which words are common does not give the answer. A model picks the candidate
of highest probability as the next token of the passage (one forward pass per item). Chance is 25%.
The text ships with CPython (`mcsmoe_deploy.builtin_corpus("heldout")`, never used to train or
calibrate); items are drawn with a fixed seed, so every model sees the same set.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

WORD = re.compile(r"(?<= )[a-z]{4,}\b")
NEIGHBOURS = 10  # distractors come from the words this close in frequency rank


@dataclass(frozen=True)
class ClozeItem:
    """A context (token ids) and candidate next words (a token id each); `answer` indexes the true one."""

    context: tuple[int, ...]
    candidates: tuple[int, ...]
    answer: int


def cloze_items(tokenizer, text: str, vocabulary_text: str, count: int = 300, context_tokens: int = 48,
                choices: int = 4, seed: int = 0) -> list[ClozeItem]:
    """`count` items cut from `text`; candidate words and their frequencies come from `vocabulary_text`.

    Only single-token words seen at least 3 times in `vocabulary_text` are asked (and offered), and only
    where at least `context_tokens` tokens precede them; the context is those last `context_tokens` tokens.
    """
    frequency = Counter(WORD.findall(vocabulary_text))
    token_of = {w: ids[0] for w in frequency
                if len(ids := tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1}
    ranked = [word for word, seen in frequency.most_common() if seen >= 3 and word in token_of]
    rank = {word: i for i, word in enumerate(ranked)}
    rng = random.Random(seed)
    places = [m for m in WORD.finditer(text) if m.group() in rank and m.start() > 8 * context_tokens]
    items = []
    for match in rng.sample(places, min(count, len(places))):
        word = match.group()
        near = [w for w in ranked[max(0, rank[word] - NEIGHBOURS): rank[word] + NEIGHBOURS + 1] if w != word]
        options = [word, *rng.sample(near, choices - 1)]
        rng.shuffle(options)
        # the passage ends before the space: " word" is then one pre-token of the byte-level BPE
        context = tokenizer(text[: match.start() - 1], add_special_tokens=False)["input_ids"][-context_tokens:]
        if len(context) < context_tokens:
            continue
        candidates = tuple(token_of[w] for w in options)
        items.append(ClozeItem(tuple(context), candidates, options.index(word)))
    return items


@torch.no_grad()
def cloze_accuracy(model: nn.Module, items: list[ClozeItem], batch_size: int = 64) -> float:
    """Share of `items` whose true word is, of its candidates, the most probable next token under `model`."""
    model.eval()
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        last = model(input_ids=torch.tensor([item.context for item in chunk])).logits[:, -1].float()
        candidates = torch.tensor([item.candidates for item in chunk])
        picked = last.gather(1, candidates).argmax(dim=1)
        correct += (picked == torch.tensor([item.answer for item in chunk])).sum().item()
    return correct / len(items)
