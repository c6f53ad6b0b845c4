"""The method sweep shared by every quality setting, and the embedded Mixtral-family LM setting.

`sweep` applies each merging method to a fresh copy of a dense model, from one
routing-statistics pass, and scores it with a setting-specific `score` function.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import mcsmoe_deploy as mc
from mcsmoe_deploy.demo import EVAL_SEQ_LEN, embedded_model_dir

from _quality_noise import calibration_sample, detailed_score

BASELINES = {
    "msmoe": {},
    "hc": {"grouping": "hc"},
    "reap": {"grouping": "reap"},
    "uniform": {"weighting": "uniform"},
    "random": {"grouping": "random"},
    "prune-frequency": {"grouping": "drop"},
    "no-permute": {"permute": False},
}
# quantized rows (experts only, int4/int8 after recovery): the uncompressed model as G = E groups,
# M-SMoE, and MC-SMoE at each rank ratio; round to nearest, and "-gptq" with GPTQ (compress/gptq.py)
GPTQ, RTN = {"quant_method": "gptq"}, {"quant_method": "rtn"}
EXPERTS_ONLY, ALL, SYM = {"quant_scope": "experts"}, {"quant_scope": "all"}, {"quant_symmetric": True}
EMB = {"quant_scope": "all+embeddings"}  # every linear layer and the input embeddings (one table with a tied head)
DENSE_QUANTIZED = {"dense-int8": {"quantize": "int8", **RTN, **EXPERTS_ONLY},
                   "dense-int4": {"quantize": "int4", **RTN, **EXPERTS_ONLY},
                   "dense-int8-gptq": {"quantize": "int8", **GPTQ, **EXPERTS_ONLY},
                   "dense-int4-gptq": {"quantize": "int4", **GPTQ, **EXPERTS_ONLY},
                   # every linear layer but the routers (`mcsmoe compress --quantize`'s default scope)
                   "dense-int4-all": {"quantize": "int4", **RTN, **ALL},
                   "dense-int4-all-sym": {"quantize": "int4", **RTN, **ALL, **SYM},
                   "dense-int4-all-gptq": {"quantize": "int4", **GPTQ, **ALL},
                   "dense-int8-all": {"quantize": "int8", **RTN, **ALL},
                   "dense-int4-emb": {"quantize": "int4", **RTN, **EMB},
                   "dense-int4-emb-gptq": {"quantize": "int4", **GPTQ, **EMB}}
MERGED_QUANTIZED = ("msmoe-int4", "msmoe-int4-gptq", "mcsmoe-int4", "mcsmoe-int4-gptq")
# merged, then every linear layer quantized (scope all), by method and grouping
MERGED_ALL_QUANTIZED = {"msmoe-int4-all": {**RTN}, "msmoe-int4-all-sym": {**RTN, **SYM},
                        "msmoe-int4-all-gptq": {**GPTQ}, "hc-int4-all-gptq": {**GPTQ, "grouping": "hc"},
                        "msmoe-int4-emb": {**RTN, **EMB}, "msmoe-int4-emb-gptq": {**GPTQ, **EMB}}
# a method's row after router calibration is named "<method>+router" (merge-only methods)
ROUTER_SUFFIX = "+router"
# low rank with one basis per layer and projection shared by the merged experts (--low-rank-basis shared), at the
# same bytes as the per-expert rows of the same rank ratio; plain joint SVD, and whitened (activation-aware); and
# with one full-rank base per layer and projection plus per-expert low-rank deltas (--low-rank-basis base-delta)
AWARE = {"low_rank": "activation-aware"}
SHARED_BASIS = {"mcsmoe-shared": {"low_rank_basis": "shared"},
                "mcsmoe-shared-activation-aware": {"low_rank_basis": "shared", **AWARE},
                "mcsmoe-base-delta": {"low_rank_basis": "base-delta"},
                "mcsmoe-base-delta-activation-aware": {"low_rank_basis": "base-delta", **AWARE}}
# a merge-only method followed by the closed-form output refit (compress/output_refit.py), "<method>+refit"
REFIT_SUFFIX = "+refit"
REFITTED = {name + REFIT_SUFFIX: {**overrides, "output_refit": True} for name, overrides in BASELINES.items()
            if name != "no-permute"}
METHODS = ("dense", *BASELINES, *REFITTED, "mcsmoe", "mcsmoe-activation-aware", *SHARED_BASIS, *DENSE_QUANTIZED,
           *MERGED_QUANTIZED, *MERGED_ALL_QUANTIZED)


def chosen(method: str, methods: list[str] | None) -> bool:
    """Whether `method` runs: one of `methods`, or by default every method but the "-gptq" ones (a
    calibration pass per layer each), the shared-basis ones (measured at their own rank ratios,
    benchmarks/results/quality-shared-basis.md) and the "-emb" ones (decoder-only: asked for with
    --settings lm) and the "+refit" ones: asked for by name."""
    if methods is not None:
        return method in methods
    return (not method.endswith("-gptq") and "-int4-emb" not in method and method not in SHARED_BASIS
            and method not in REFITTED)


def _applies(adapter: mc.FamilyAdapter, overrides: dict) -> bool:
    """Whether a recipe's overrides apply to the family: embeddings are quantized in decoder-only models only."""
    return not (adapter.encoder_decoder and overrides.get("quant_scope") == EMB["quant_scope"])


def quant_block_for(layout: mc.ExpertLayout) -> int | None:
    """The largest of 32 and 16 dividing every expert projection's input size (None: neither)."""
    sizes = [layout.projection_shape(name)[1] for name in layout.projections]
    return next((block for block in (32, 16) if all(size % block == 0 for size in sizes)), None)


def sweep(
    setting: str,
    metric: str,
    score: Callable[[nn.Module], float | dict],
    dense: nn.Module,
    adapter: mc.FamilyAdapter,
    calib: torch.Tensor,
    recover: Callable[[nn.Module, int, float], object],
    experts_list: list[int],
    rank_ratios: list[float],
    distill_steps_list: list[int],
    sparse_keep: float,
    distill_lr: float | None = None,
    methods: list[str] | None = None,
    router_steps: int = 0,
    calibrate: Callable[[nn.Module, int], object] | None = None,
    seed: int = 0,
) -> list[dict]:
    """One row per (method, G, rank ratio, distillation steps), after the dense rows.

    score(model): the metric's value, or a dict of "value" and more fields for the row.
    seed: the recipes' seed (random grouping).
    Dense rows: the model itself, and for each nonzero step count the same recovery applied to it
    uncompressed (a control for what recovery adds as extra training).

    calib: token blocks [N, S] for routing statistics (encoder-decoders are teacher-forced on
    the same blocks, see compress/stats.py).
    recover(model, steps, lr): the setting's distillation of a compressed model from `dense`, at peak
    rate `distill_lr`, or by default the recipe's (`CompressionRecipe.distill_learning_rate`).
    router_steps, calibrate(model, steps): with router_steps > 0, each merge-only baseline (refitted or not)
    also gets a row "<method>+router" after `calibrate` trained its routers alone (after any recovery).
    Rows: {"setting", "method", "experts", "rank_ratio", "distill_steps", "expert_memory_ratio", "bytes", "metric",
    "value"} (bytes: the whole model's, size_report's total: codes, scales, zero points, float tensors),
    and for quantized methods "quantize_seconds": wall time of the quantization step alone (GPTQ's
    calibration passes included).
    """
    recipe = mc.CompressionRecipe()
    refit = any(chosen(name, methods) for name in REFITTED)
    keep = max(recipe.activation_samples, recipe.refit_tokens if refit else 0)
    stats = mc.collect_routing_stats(dense, adapter, calib, progress=False, keep_inputs=keep, expert_outputs=True)
    dense_bytes = mc.size_report(dense, adapter).expert_bytes
    num_experts = adapter.num_experts(dense.config)

    def row(method: str, model: nn.Module, experts: int, rank_ratio: float, steps: int) -> dict:
        scored = score(model)
        scored = scored if isinstance(scored, dict) else {"value": scored}
        return {
            "setting": setting, "method": method, "experts": experts, "rank_ratio": rank_ratio,
            "distill_steps": steps,
            "expert_memory_ratio": round(mc.size_report(model, adapter).expert_bytes / dense_bytes, 4),
            "bytes": mc.size_report(model, adapter).total_bytes,
            "metric": metric, **scored, "value": round(scored["value"], 4),
        }

    rows = [row("dense", dense, num_experts, 1.0, 0)]
    print(f"[{setting}] dense {metric}={rows[0]['value']:.4f}", flush=True)
    # a control: the same recovery of the uncompressed model (G = E groups of one expert each, rank 1),
    # which tells what recovery adds by itself, as extra training, from what it restores
    control = mc.CompressionRecipe(experts=num_experts, distill_lr=distill_lr)
    for steps in [steps for steps in distill_steps_list if steps]:
        model = copy.deepcopy(dense)
        mc.apply_plan(model, adapter, mc.plan_compression(stats, num_experts, control, adapter.family), control,
                      progress=False)
        recover(model, steps, control.distill_learning_rate)
        rows.append(row("dense", model, num_experts, 1.0, steps))
        print(f"[{setting}] dense after {steps} steps of recovery {metric}={rows[-1]['value']:.4f}", flush=True)
    block = quant_block_for(adapter.expert_layout(dense.config))
    quantized = {"quantize": "int4", "quant_block": block, **EXPERTS_ONLY}
    runs = [(name, overrides, 1.0) for name, overrides in {**BASELINES, **REFITTED}.items()]
    runs += [("mcsmoe", {"rank_ratio": r, "sparse_keep": sparse_keep}, r) for r in rank_ratios]
    aware = {"sparse_keep": sparse_keep, "low_rank": "activation-aware"}
    runs += [("mcsmoe-activation-aware", {"rank_ratio": r, **aware}, r) for r in rank_ratios]
    runs += [(name, {"rank_ratio": r, "sparse_keep": sparse_keep, **fit}, r)
             for name, fit in SHARED_BASIS.items() for r in rank_ratios]
    if block is not None:
        for suffix, method in (("", RTN), ("-gptq", GPTQ)):
            runs += [(f"msmoe-int4{suffix}", {**quantized, **method}, 1.0)]
            runs += [(f"mcsmoe-int4{suffix}", {"rank_ratio": r, "sparse_keep": sparse_keep, **quantized, **method}, r)
                     for r in rank_ratios]
        runs += [(name, {**quantized, **ALL, **overrides}, 1.0) for name, overrides in MERGED_ALL_QUANTIZED.items()]
    runs = [run for run in runs if chosen(run[0], methods) and _applies(adapter, run[1])]
    plans = [(experts, method, overrides, rank_ratio) for experts in experts_list
             for method, overrides, rank_ratio in runs]
    if block is not None:  # the uncompressed experts quantized: G = E groups of one expert each
        plans = [(num_experts, name, {**overrides, "quant_block": block}, 1.0)
                 for name, overrides in DENSE_QUANTIZED.items() if chosen(name, methods) and _applies(adapter, overrides)
                 ] + plans
    for experts, method, overrides, rank_ratio in plans:
        if overrides.get("low_rank_basis") == "base-delta" and rank_ratio * experts <= 1:
            # the base alone takes the budget (base_delta_rank_for_ratio refuses it): no row
            print(f"[{setting}] {method:24s} G={experts} r={rank_ratio:<5g} skipped: needs rank ratio > 1/G", flush=True)
            continue
        recipe = mc.CompressionRecipe(experts=experts, distill_lr=distill_lr, seed=seed, **overrides)
        plan = mc.plan_compression(stats, num_experts, recipe, adapter.family)
        for steps in distill_steps_list:
            start = time.perf_counter()
            model = copy.deepcopy(dense)
            applied = mc.apply_plan(model, adapter, plan, recipe, progress=False)
            if steps:
                recover(model, steps, recipe.distill_learning_rate)
            quantize_seconds = None
            if recipe.quant_spec is not None:  # last, as `mcsmoe compress` does: after recovery
                quantize_start = time.perf_counter()
                gptq = recipe.quant_method == "gptq"
                moments = (mc.ExpertInputMoments(model, adapter, calib, progress=False,
                                                   max_tokens=recipe.activation_samples) if gptq else None)
                linear_moments = (mc.LinearInputMoments(model, adapter, calib, progress=False,
                                                        max_tokens=recipe.activation_samples) if gptq else None)
                mc.quantize_model(model, adapter, recipe.quant_spec, recipe.quant_scope, input_moments=moments,
                                  linear_moments=linear_moments)
                quantize_seconds = round(time.perf_counter() - quantize_start, 2)
            rows.append(row(method, model, experts, rank_ratio, steps))
            if quantize_seconds is not None:
                rows[-1]["quantize_seconds"] = quantize_seconds
            print(f"[{setting}] {method:24s} G={experts} r={rank_ratio:<5g} distill={steps:<4d} "
                  f"{metric}={rows[-1]['value']:8.4f} mem={rows[-1]['expert_memory_ratio']:.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            if router_steps and calibrate is not None and (method in BASELINES or method in REFITTED):
                start = time.perf_counter()
                calibrate(model, router_steps)
                rows.append(row(method + ROUTER_SUFFIX, model, experts, rank_ratio, steps))
                print(f"[{setting}] {method + ROUTER_SUFFIX:24s} G={experts} r={rank_ratio:<5g} distill={steps:<4d} "
                      f"{metric}={rows[-1]['value']:8.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return rows


# what the neuron-shuffled LM measures: alignment, and merging without it
SHUFFLED_METHODS = ("msmoe", "no-permute")


@torch.no_grad()
def shuffle_expert_neurons(model: nn.Module, adapter: mc.FamilyAdapter, seed: int = 0) -> None:
    """Reorder every expert's hidden neurons at random, in place: the same function, another storage order.

    Upcycled experts keep their common ancestor's neuron order, so merging them needs no alignment;
    experts trained apart share no order. Stacked layouts only (Mixtral, Qwen-MoE, OLMoE):
    gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I].
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in adapter.moe_layers(model):
        experts = layer.block.experts
        num_experts, _, intermediate = experts.down_proj.shape
        for e in range(num_experts):
            order = torch.randperm(intermediate, generator=generator)
            gate_up = experts.gate_up_proj[e]
            gate_up.copy_(torch.cat([gate_up[:intermediate][order], gate_up[intermediate:][order]]))
            experts.down_proj[e].copy_(experts.down_proj[e][:, order])


def lm_rows(
    experts_list: list[int],
    rank_ratios: list[float],
    distill_steps_list: list[int],
    sparse_keep: float,
    model_dir: str | Path | None = None,
    distill_lr: float | None = None,
    methods: list[str] | None = None,
    shuffled: bool = False,
    router_steps: int = 0,
    router_lr: float = mc.CompressionRecipe().router_lr,
    setting: str = "lm",
    calib_seed: int | None = None,
    calib_tokens: int | None = None,
) -> list[dict]:
    """The "lm" setting: held-out perplexity of the embedded Mixtral-family model (or `model_dir`).

    setting: the rows' setting name ("lm2": `model_dir` is the lm2 model).
    calib_seed: None calibrates on the recipe's text (the first 32768 training tokens); a seed draws
    as many training blocks at random (`calibration_sample`), seeds the recipes and router calibration,
    and adds to each row "calib_seed", next-word "accuracy" and per held-out block "block_nll"
    (`detailed_score`), so that the spread over seeds and a bootstrap over blocks can be reported.
    shuffled: the "lm-shuffled" setting instead: the same model with each expert's neurons
    reordered (`shuffle_expert_neurons`), measured with SHUFFLED_METHODS only.
    router_steps, router_lr: router calibration of the merge-only methods (rows "<method>+router").
    calib_tokens: without a seed, calibrate and recover on the first `calib_tokens` training tokens (the
    recipe's `max_calib_tokens`, `mcsmoe compress --max-calib-tokens`) instead of the recipe's default.
    """
    model_dir = model_dir or embedded_model_dir()
    dense, adapter = mc.load_model(model_dir)
    for groups in experts_list:  # a G the model cannot take: one error line now, not after the dense scores
        mc.CompressionRecipe(experts=groups).check_model(adapter.num_experts(dense.config))
    if shuffled:
        shuffle_expert_neurons(dense, adapter)
        methods = [m for m in SHUFFLED_METHODS if methods is None or m in methods]
    tokenizer = mc.load_tokenizer(model_dir)
    heldout = mc.token_blocks(tokenizer, mc.builtin_corpus("heldout"), EVAL_SEQ_LEN)
    budget = {} if calib_tokens is None else {"max_calib_tokens": calib_tokens}
    mc.CompressionRecipe(**budget).validate()  # a budget under one block: one error line naming --calib-tokens
    calib = (mc.calibration_blocks(tokenizer, mc.CompressionRecipe(**budget)) if calib_seed is None
             else calibration_sample(tokenizer, calib_seed))
    score: Callable[[nn.Module], float | dict] = lambda model: mc.perplexity(model, heldout)  # noqa: E731
    if calib_seed is not None:
        score = detailed_score(tokenizer, heldout, {"calib_seed": calib_seed})

    def recover(student: nn.Module, steps: int, lr: float) -> None:
        mc.distill(student, dense, adapter, calib, steps, lr=lr, progress=False)

    def calibrate(student: nn.Module, steps: int) -> None:
        mc.calibrate_routers(student, dense, adapter, calib, steps, lr=router_lr, seed=calib_seed or 0,
                             progress=False)

    return sweep(
        "lm-shuffled" if shuffled else setting, "perplexity", score, dense,
        adapter, calib, recover, experts_list, rank_ratios, distill_steps_list, sparse_keep, distill_lr, methods,
        router_steps, calibrate, calib_seed or 0,
    )
