"""Train the tiny Mixtral-style MoE model embedded in the package as its default model.

Everything is built from scratch and offline from the built-in corpus (the CPython
documentation, see `mcsmoe_deploy.corpus`):

1. a byte-level BPE tokenizer (vocab 2048, `<|endoftext|>` as bos/eos/pad), trained
   on the train split only;
2. a dense model (a Mixtral with one expert) trained for --dense-steps;
3. sparse upcycling, as Mixtral-style and Qwen-MoE models are made: each of the 8
   experts starts as a copy of the dense FFN, routers start random; then --steps of
   MoE training (top-2, per-layer load-balancing loss) let the experts specialise.
   Experts trained independently from random inits share no structure and cannot be
   merged without heavy recovery (measured: 8 -> 4 experts took held-out perplexity
   from 15 to 200-370); upcycled experts are what real checkpoints look like.

About 2.2M parameters, 9 MB in fp32 (hidden 128, 4 layers, experts of 144).
The result is written to `mcsmoe_deploy/assets/tiny-mixtral/` (a standard Hugging Face
directory) through a temporary directory renamed into place. At the end the script
prints the parameter count, size on disk, held-out perplexity before and after
training, train time and per-layer expert routing frequencies on held-out text.

Usage:  cd <repo> && PYTHONPATH=. python scripts/train_embedded_model.py
The defaults take about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mcsmoe_deploy.corpus import builtin_corpus, token_blocks
from mcsmoe_deploy.evaluate import perplexity

ASSET_DIR = Path(__file__).resolve().parent.parent / "mcsmoe_deploy" / "assets" / "tiny-mixtral"
EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH_SIZE = 16
PEAK_LR = 3e-3
WARMUP_STEPS = 100
EVAL_EVERY = 250
ATTENTION_DROPOUT = 0.2  # the corpus is small (~127k tokens): without it the model overfits early


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `text`, wrapped for transformers; checks that it round-trips."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        model_max_length=512, clean_up_tokenization_spaces=False,
    )
    sample = text[:2000] + "\n  Unicode: héllo wörld → ∑ 日本\t\n"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != sample:
        raise RuntimeError("tokenizer does not round-trip text")
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, num_experts: int = 8, top_k: int = 2) -> MixtralForCausalLM:
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=144, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts, num_experts_per_tok=top_k,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.02,
        attention_dropout=ATTENTION_DROPOUT, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return MixtralForCausalLM(config)


@torch.no_grad()
def upcycle(dense: MixtralForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int) -> MixtralForCausalLM:
    """Sparse upcycling: every expert starts as a copy of the dense model's one FFN; routers start random."""
    torch.manual_seed(seed + 1)
    moe = build_model(tokenizer)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    moe.load_state_dict(state, strict=False)
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
        experts = moe_layer.mlp.experts
        experts.gate_up_proj.copy_(dense_layer.mlp.experts.gate_up_proj.expand_as(experts.gate_up_proj))
        experts.down_proj.copy_(dense_layer.mlp.experts.down_proj.expand_as(experts.down_proj))
    return moe


def lr_at(step: int, total: int, peak: float = PEAK_LR) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], config: MixtralConfig) -> torch.Tensor:
    """Mixtral load-balancing loss averaged over layers (1.0 = balanced).

    transformers' built-in aux loss concatenates all layers before counting, so it only
    balances each expert index summed over layers and lets an expert die in one layer;
    applying it layer by layer keeps every expert of every layer in use.
    """
    k = config.num_experts_per_tok
    losses = [load_balancing_loss_func((logits,), config.num_local_experts, k) for logits in router_logits]
    return torch.stack(losses).mean() / k


def train(
    model: MixtralForCausalLM, train_ids: torch.Tensor, heldout: torch.Tensor, steps: int, seed: int, peak_lr: float = PEAK_LR
) -> None:
    """AdamW on random SEQ_LEN windows of `train_ids`, drawn from a seeded generator."""
    params = list(model.parameters())  # no weight decay on norms (1-D)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(SEQ_LEN)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN, (BATCH_SIZE,), generator=generator)
        batch = train_ids[starts[:, None] + offsets]
        out = model(input_ids=batch, output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        aux_loss = per_layer_balance_loss(out.router_logits, model.config)
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + model.config.router_aux_loss_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1:5d}/{steps}  loss {lm_loss.item():.3f}  aux {aux_loss.item():.3f}"
                  f"  lr {lr_at(step, steps, peak_lr):.2e}  {elapsed:6.0f}s  ({elapsed / (step + 1):.2f} s/step)", flush=True)
        if (step + 1) % EVAL_EVERY == 0:
            print(f"  held-out ppl {perplexity(model, heldout):.2f}", flush=True)
            model.train()
    model.eval()


@torch.no_grad()
def perplexity_and_routing(model: MixtralForCausalLM, blocks: torch.Tensor) -> tuple[float, list[list[float]]]:
    """Perplexity on `blocks` and, per layer, the share of top-k assignments going to each expert."""
    layers = model.model.layers
    counts = [torch.zeros(model.config.num_local_experts) for _ in layers]

    def make_hook(layer_counts: torch.Tensor):
        def hook(_module, _inputs, output) -> None:  # output: (router_logits, scores, indices)
            layer_counts.add_(torch.bincount(output[2].flatten(), minlength=len(layer_counts)).float())

        return hook

    hooks = [layer.mlp.gate.register_forward_hook(make_hook(c)) for layer, c in zip(layers, counts)]
    try:
        ppl = perplexity(model, blocks)
    finally:
        for hook in hooks:
            hook.remove()
    return ppl, [(c / c.sum()).tolist() for c in counts]


def save_atomically(model: MixtralForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write into a temporary sibling directory, then rename it to `out` (replacing any old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.output_router_logits = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; assets must be readable once installed
        for file in tmp.iterdir():
            file.chmod(0o644)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=500, help="MoE steps after upcycling (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--moe-lr", type=float, default=1e-3,
                        help="peak learning rate after upcycling (default: %(default)s)")
    parser.add_argument("--dense-steps", type=int, default=1000,
                        help="dense steps before upcycling; 0 trains the MoE from scratch (default: %(default)s)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_text, heldout_text = builtin_corpus("train"), builtin_corpus("heldout")
    tokenizer = train_tokenizer(train_text)
    train_ids = token_blocks(tokenizer, train_text, 1).flatten()
    heldout_blocks = token_blocks(tokenizer, heldout_text, SEQ_LEN)
    print(f"tokenizer: vocab {len(tokenizer)}, train tokens {len(train_ids)}, "
          f"held-out blocks {len(heldout_blocks)} x {SEQ_LEN}")

    model = build_model(tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    untrained_ppl = perplexity(model, heldout_blocks)
    print(f"parameters: {num_params:,}  untrained held-out ppl: {untrained_ppl:.1f}")

    start = time.perf_counter()
    if args.dense_steps:
        torch.manual_seed(args.seed)
        dense = build_model(tokenizer, num_experts=1, top_k=1)
        train(dense, train_ids, heldout_blocks, args.dense_steps, args.seed)
        print(f"dense held-out ppl: {perplexity(dense, heldout_blocks):.2f}")
        model = upcycle(dense, tokenizer, args.seed)
        print(f"upcycled held-out ppl: {perplexity(model, heldout_blocks):.2f}")
    train(model, train_ids, heldout_blocks, args.steps, args.seed + 1, args.moe_lr if args.dense_steps else PEAK_LR)
    train_seconds = time.perf_counter() - start
    trained_ppl, frequencies = perplexity_and_routing(model, heldout_blocks)

    save_atomically(model, tokenizer, args.out)
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6

    print(f"\nsaved to {args.out}")
    print(f"parameters:            {num_params:,}")
    print(f"asset size on disk:    {size_mb:.2f} MB")
    print(f"untrained held-out ppl: {untrained_ppl:.1f}")
    print(f"trained held-out ppl:   {trained_ppl:.2f}")
    print(f"train time:            {train_seconds:.0f} s ({args.steps} steps, batch {BATCH_SIZE} x {SEQ_LEN})")
    print("held-out routing share per expert (top-2 assignments):")
    for i, shares in enumerate(frequencies):
        print(f"  layer {i}: " + " ".join(f"{s:.3f}" for s in shares) + f"  (min {min(shares):.3f})")


if __name__ == "__main__":
    main()
