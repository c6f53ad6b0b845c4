"""The lm2 benchmark setting's parts: Drop-Upcycling, the next-word multiple choice, the noise helpers."""

import math
import sys
from pathlib import Path

import pytest
import torch

import mcsmoe_deploy as mc
from mcsmoe_deploy.demo import embedded_model_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

from _cloze import cloze_accuracy, cloze_items  # noqa: E402
from _quality_noise import bootstrap_ratio, calibration_sample  # noqa: E402
from train_embedded_model import continued_moe  # noqa: E402


def test_drop_upcycling_redraws_the_given_share_of_each_experts_neurons_and_nothing_else():
    before, _ = mc.load_model(embedded_model_dir())
    after = continued_moe(embedded_model_dir(), seed=0, reinit_ratio=0.5, aux_coef=0.1)
    assert after.config.router_aux_loss_coef == 0.1
    changed_sets = []
    for old, new in zip(before.model.layers, after.model.layers):
        old_experts, new_experts = old.mlp.experts, new.mlp.experts
        intermediate = old_experts.down_proj.shape[2]  # 144
        for e in range(old_experts.down_proj.shape[0]):
            gate = (old_experts.gate_up_proj[e, :intermediate] != new_experts.gate_up_proj[e, :intermediate]).any(1)
            up = (old_experts.gate_up_proj[e, intermediate:] != new_experts.gate_up_proj[e, intermediate:]).any(1)
            down = (old_experts.down_proj[e] != new_experts.down_proj[e]).any(0)
            assert torch.equal(gate, up) and torch.equal(gate, down)  # whole neurons, in all three matrices
            assert int(gate.sum()) == intermediate // 2
            changed_sets.append(frozenset(gate.nonzero().flatten().tolist()))
        assert torch.equal(old.mlp.gate.weight, new.mlp.gate.weight)
        assert torch.equal(old.self_attn.q_proj.weight, new.self_attn.q_proj.weight)
    assert len(set(changed_sets)) == len(changed_sets)  # a different half per expert


def test_next_word_items_are_fixed_fair_and_the_embedded_lm_beats_chance():
    tokenizer = mc.load_tokenizer(embedded_model_dir())
    text, vocabulary = mc.builtin_corpus("heldout"), mc.builtin_corpus("train")
    items = cloze_items(tokenizer, text, vocabulary, count=64)
    assert items == cloze_items(tokenizer, text, vocabulary, count=64)
    assert len(items) == 64
    for item in items:
        assert len(item.context) == 48 and len(set(item.candidates)) == 4 and 0 <= item.answer < 4
    answers = [item.answer for item in items]
    assert max(answers.count(i) for i in range(4)) < 32  # the answer's position is shuffled
    model, _ = mc.load_model(embedded_model_dir())
    accuracy = cloze_accuracy(model, items)
    assert 0.6 < accuracy <= 1.0  # chance is 0.25; the embedded LM scores about 0.83 on the full set
    # a model that always prefers the same candidate slot's token cannot do better than that slot's share
    flipped = [type(item)(item.context, item.candidates, (item.answer + 1) % 4) for item in items]
    assert cloze_accuracy(model, flipped) == pytest.approx(0.0, abs=0.2)


def test_calibration_draws_differ_by_seed_and_repeat_for_a_seed():
    tokenizer = mc.load_tokenizer(embedded_model_dir())
    one, again, other = (calibration_sample(tokenizer, seed) for seed in (1, 1, 2))
    assert one.shape == (256, 128) and torch.equal(one, again)
    assert not torch.equal(one, other)


def test_bootstrap_interval_of_a_constant_shift_is_that_ratio():
    nll = [2.0 + 0.01 * i for i in range(50)]
    low, high = bootstrap_ratio([v + 0.1 for v in nll], nll)
    assert low == pytest.approx(math.exp(0.1)) and high == pytest.approx(math.exp(0.1))
    low, high = bootstrap_ratio(nll, nll[::-1])  # same blocks reordered: the interval straddles 1
    assert low < 1.0 < high


def test_lm2_mild_differs_from_lm2_only_in_the_redrawn_share():
    from _lm2 import LM2_MILD_TRAINING, LM2_TRAINING, lm2_folder

    assert {k: v for k, v in LM2_MILD_TRAINING.items() if LM2_TRAINING[k] != v} == {"reinit_ratio": 0.25}
    assert lm2_folder(LM2_MILD_TRAINING).name == "lm2-aux_coef0.1-moe_lr0.002-reinit_ratio0.25-seed0-steps600"


def test_refit_gain_pairs_each_refitted_row_with_its_plain_method():
    from refit_gain import refit_table

    nll = [2.0 + 0.01 * i for i in range(20)]

    def row(method, seed, shift, value):
        return {"setting": "lm2", "method": method, "experts": 4, "distill_steps": 0, "calib_seed": seed,
                "value": value, "block_nll": [v + shift for v in nll]}

    rows = [row("dense", 0, 0.0, 10.0), row("reap", 0, 0.2, 30.0), row("reap+refit", 0, 0.1, 24.0),
            row("reap", 1, 0.2, 32.0), row("reap+refit", 1, 0.1, 24.0), row("msmoe", 0, 0.3, 40.0)]
    lines = refit_table(rows).splitlines()
    assert len(lines) == 3  # header, rule, reap only (msmoe has no refitted row)
    ratio = f"{math.exp(-0.1):.3f}"
    assert lines[2] == f"| lm2 | 4 | reap | 3.100 | 2.400 | 0.775 ± 0.035 | 0.800 [{ratio}, {ratio}] |"
