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


def build_model(
    tokenizer: PreTrainedTokenizerFast, num_experts: int = 8, top_k: int = 2, aux_coef: float = 0.02
) -> MixtralForCausalLM:
    """The tiny Mixtral of this script; aux_coef weighs the per-layer load-balancing loss in `train`."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=144, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts, num_experts_per_tok=top_k,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=aux_coef,
        attention_dropout=ATTENTION_DROPOUT, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return MixtralForCausalLM(config)


@torch.no_grad()
def upcycle(
    dense: MixtralForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int, reinit_ratio: float = 0.0,
    aux_coef: float = 0.02,
) -> MixtralForCausalLM:
    """Sparse upcycling: every expert starts as a copy of the dense model's one FFN; routers start random.

    reinit_ratio > 0 is Drop-Upcycling (Nakamura et al., ICLR 2025): in each expert that share of the
    hidden neurons (gate and up rows, down columns) is drawn afresh, from a normal with each matrix's own
    mean and std, a different subset per expert, so that experts start apart and specialise.
    """
    torch.manual_seed(seed + 1)
    moe = build_model(tokenizer, aux_coef=aux_coef)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    moe.load_state_dict(state, strict=False)
    generator = torch.Generator().manual_seed(seed + 2)
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
        experts = moe_layer.mlp.experts
        experts.gate_up_proj.copy_(dense_layer.mlp.experts.gate_up_proj.expand_as(experts.gate_up_proj))
        experts.down_proj.copy_(dense_layer.mlp.experts.down_proj.expand_as(experts.down_proj))
        if reinit_ratio > 0:
            reinitialise_neurons(experts, reinit_ratio, generator)
    return moe


@torch.no_grad()
def reinitialise_neurons(experts: torch.nn.Module, ratio: float, generator: torch.Generator) -> None:
    """Redraw round(ratio x I) random hidden neurons of each expert, in place (Drop-Upcycling).

    experts: Mixtral's stacked experts, gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I].
    """
    num_experts, hidden, intermediate = experts.down_proj.shape
    count = round(ratio * intermediate)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    stats = [(part.mean().item(), part.std().item()) for part in (gate_up[0, :intermediate],
                                                                    gate_up[0, intermediate:], down[0])]
    for e in range(num_experts):
        neurons = torch.randperm(intermediate, generator=generator)[:count]
        (gate_mean, gate_std), (up_mean, up_std), (down_mean, down_std) = stats
        gate_up[e, neurons] = torch.randn(count, hidden, generator=generator) * gate_std + gate_mean
        gate_up[e, intermediate + neurons] = torch.randn(count, hidden, generator=generator) * up_std + up_mean
        down[e, :, neurons] = torch.randn(hidden, count, generator=generator) * down_std + down_mean


@torch.no_grad()
def continued_moe(directory: Path, seed: int, reinit_ratio: float, aux_coef: float) -> MixtralForCausalLM:
    """This script's MoE from `directory`, ready to train on: balance loss weighted `aux_coef`,
    `reinit_ratio` of each expert's neurons redrawn (`reinitialise_neurons`, a seeded draw)."""
    model = MixtralForCausalLM.from_pretrained(directory)
    model.config.router_aux_loss_coef, model.config.output_router_logits = aux_coef, True
    generator = torch.Generator().manual_seed(seed + 2)
    for layer in model.model.layers:
        reinitialise_neurons(layer.mlp.experts, reinit_ratio, generator)
    return model


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


def train_model(
    out: Path, steps: int = 500, seed: int = 0, moe_lr: float = 1e-3, dense_steps: int = 1000,
    reinit_ratio: float = 0.0, aux_coef: float = 0.02, init_from: Path | None = None,
) -> dict:
    """Train the tokenizer, the dense model and its upcycled MoE (see the module docstring); save to `out`.

    init_from: instead, continue from this script's MoE saved there (its tokenizer too): redraw
    `reinit_ratio` of each expert's neurons, as `upcycle` does, then train `steps` more MoE steps at
    `moe_lr`; dense_steps is ignored. A second model whose experts differ, without pretraining again.

    Deterministic for given arguments and torch thread count (fixed seeds).
    Returns a summary: parameters, size_mb, untrained_ppl, trained_ppl, train_seconds, routing
    (per layer, the share of held-out top-k assignments of each expert).
    """
    torch.manual_seed(seed)
    train_text, heldout_text = builtin_corpus("train"), builtin_corpus("heldout")
    tokenizer = train_tokenizer(train_text) if init_from is None else PreTrainedTokenizerFast.from_pretrained(init_from)
    train_ids = token_blocks(tokenizer, train_text, 1).flatten()
    heldout_blocks = token_blocks(tokenizer, heldout_text, SEQ_LEN)
    print(f"tokenizer: vocab {len(tokenizer)}, train tokens {len(train_ids)}, "
          f"held-out blocks {len(heldout_blocks)} x {SEQ_LEN}")

    model = build_model(tokenizer, aux_coef=aux_coef)
    num_params = sum(p.numel() for p in model.parameters())
    untrained_ppl = perplexity(model, heldout_blocks)
    print(f"parameters: {num_params:,}  untrained held-out ppl: {untrained_ppl:.1f}")

    start = time.perf_counter()
    if init_from is not None:
        model = continued_moe(init_from, seed, reinit_ratio, aux_coef)
        print(f"{init_from} with {reinit_ratio:.0%} of each expert redrawn: "
              f"held-out ppl {perplexity(model, heldout_blocks):.2f}")
    elif dense_steps:
        torch.manual_seed(seed)
        dense = build_model(tokenizer, num_experts=1, top_k=1)
        train(dense, train_ids, heldout_blocks, dense_steps, seed)
        print(f"dense held-out ppl: {perplexity(dense, heldout_blocks):.2f}")
        model = upcycle(dense, tokenizer, seed, reinit_ratio, aux_coef)
        print(f"upcycled held-out ppl: {perplexity(model, heldout_blocks):.2f}")
    train(model, train_ids, heldout_blocks, steps, seed + 1, moe_lr if dense_steps or init_from else PEAK_LR)
    train_seconds = time.perf_counter() - start
    trained_ppl, frequencies = perplexity_and_routing(model, heldout_blocks)

    save_atomically(model, tokenizer, out)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    return {"parameters": num_params, "size_mb": round(size_mb, 2), "untrained_ppl": untrained_ppl,
            "trained_ppl": trained_ppl, "train_seconds": round(train_seconds, 1), "routing": frequencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=500, help="MoE steps after upcycling (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--moe-lr", type=float, default=1e-3,
                        help="peak learning rate after upcycling (default: %(default)s)")
    parser.add_argument("--dense-steps", type=int, default=1000,
                        help="dense steps before upcycling; 0 trains the MoE from scratch (default: %(default)s)")
    parser.add_argument("--reinit-ratio", type=float, default=0.0,
                        help="Drop-Upcycling: share of each expert's neurons drawn afresh (default: %(default)s)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from this script's MoE in this folder instead of pretraining (default: none)")
    parser.add_argument("--aux-coef", type=float, default=0.02,
                        help="weight of the per-layer load-balancing loss (default: %(default)s)")
    args = parser.parse_args()
    if not 0.0 <= args.reinit_ratio <= 1.0:
        parser.error("--reinit-ratio must be in [0, 1]")
    summary = train_model(args.out, args.steps, args.seed, args.moe_lr, args.dense_steps, args.reinit_ratio,
                          args.aux_coef, args.init_from)

    print(f"\nsaved to {args.out}")
    print(f"parameters:            {summary['parameters']:,}")
    print(f"asset size on disk:    {summary['size_mb']:.2f} MB")
    print(f"untrained held-out ppl: {summary['untrained_ppl']:.1f}")
    print(f"trained held-out ppl:   {summary['trained_ppl']:.2f}")
    print(f"train time:            {summary['train_seconds']:.0f} s ({args.steps} steps, batch {BATCH_SIZE} x {SEQ_LEN})")
    print("held-out routing share per expert (top-2 assignments):")
    for i, shares in enumerate(summary["routing"]):
        print(f"  layer {i}: " + " ".join(f"{s:.3f}" for s in shares) + f"  (min {min(shares):.3f})")


if __name__ == "__main__":
    main()
