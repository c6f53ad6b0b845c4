"""The benchmark peer (benchmarks/_genai_peer.py): onnxruntime-genai's builder on the embedded Mixtral.

fp32: the builder's graph (GroupQueryAttention, SkipSimplifiedLayerNorm, com.microsoft.MoE) is the
model: prefill logits within 1e-4 relative of transformers, greedy tokens equal to `generate`.
int4 (MatMulNBits, QMoE, round-to-nearest, blocks of 32, everything quantized: attention, routers,
experts, embeddings, head): a different model, so only agreement is asserted, loosely.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "onnxruntime_genai",
    reason="onnxruntime-genai (benchmark/test-only dependency, the `test` extra) is not installed",
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of scripts, not part of the package

from benchmarks._genai_peer import (  # noqa: E402
    GenaiPeerSession,
    build_genai_peer,
    decode_ms,
    folder_bytes,
    greedy_tokens,
    open_peer_lm,
)
from mcsmoe_deploy.demo import embedded_model_dir  # noqa: E402

PROMPTS = ("The market opened higher today as", "Scientists announced a new", "In the second half, the team")
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference():
    """transformers' embedded model and tokenizer, and per prompt: ids, prefill logits, greedy continuation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cases = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            logits = model(ids).logits.numpy()
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
            cases.append((ids.numpy(), logits, generated))
    return model.config, cases


@pytest.fixture(scope="module")
def peer_fp32(tmp_path_factory) -> Path:
    return build_genai_peer(embedded_model_dir(), tmp_path_factory.mktemp("peer") / "fp32", "fp32")


@pytest.fixture(scope="module")
def peer_int4(tmp_path_factory) -> Path:
    return build_genai_peer(embedded_model_dir(), tmp_path_factory.mktemp("peer") / "int4", "int4", block_size=32)


def _op_types(folder: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


def test_package_never_imports_genai():
    """onnxruntime-genai is a benchmark dependency: no module of the shipped package may name it."""
    offenders = [str(p) for p in (ROOT / "mcsmoe_deploy").rglob("*.py") if "onnxruntime_genai" in p.read_text()]
    assert offenders == []


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        build_genai_peer(embedded_model_dir(), tmp_path / "x", "int3")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match="MixtralForCausalLM"):
        build_genai_peer(other, tmp_path / "y", "fp32")


def test_fp32_folder_and_graph(peer_fp32):
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {
        p.name for p in peer_fp32.iterdir()
    }
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MoE"} <= _op_types(peer_fp32)
    session = GenaiPeerSession(peer_fp32)
    assert "position_ids" not in session.input_names  # positions come from the mask (GroupQueryAttention)
    assert session.geometry == (4, 2, 32)


def test_fp32_prefill_logits_match_transformers(peer_fp32, reference):
    session = GenaiPeerSession(peer_fp32)
    for ids, expected, _ in reference[1]:
        out = session.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], session.empty_past(1))
        assert out.logits.dtype == np.float32 and out.logits.shape == expected.shape
        assert np.abs(out.logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_fp32_greedy_equals_generate(peer_fp32, reference):
    config, cases = reference
    session = GenaiPeerSession(peer_fp32)
    for ids, _, generated in cases:
        tokens = greedy_tokens(session, ids[0], NEW_TOKENS)
        # generate stops after an end-of-sequence token; greedy_tokens always runs NEW_TOKENS
        assert len(generated) == NEW_TOKENS or generated[-1] == config.eos_token_id
        assert tokens[: len(generated)] == generated


def test_latency_driver_decodes_like_the_session(peer_fp32, reference):
    """The benchmark's timing loops (`benchmarks._latency`) drive the peer's graph to the same tokens."""
    from benchmarks._latency import greedy, session_options

    lm = open_peer_lm("builder-fp32", peer_fp32, session_options(1))
    ids, _, generated = reference[1][0]
    assert greedy(lm, ids, len(generated)) == generated


def test_measurement_smoke(peer_fp32, peer_int4):
    """The one-off measurement (`python benchmarks/_genai_peer.py MODEL OUT`) runs: samples per graph, int4 smaller."""
    times = decode_ms({"fp32": peer_fp32, "int4": peer_int4}, threads=1, steps=2, rounds=1)
    assert {name: len(values) for name, values in times.items()} == {"fp32": 2, "int4": 2}
    assert all((values > 0).all() for values in times.values())
    assert folder_bytes(peer_int4) < 0.25 * folder_bytes(peer_fp32)


def test_fp32_folder_runs_in_the_genai_runtime(peer_fp32, reference):
    """The adapter's folder is a regular builder folder: onnxruntime-genai's own generator decodes it alike."""
    import onnxruntime_genai as og

    ids, _, generated = reference[1][0]
    model = og.Model(str(peer_fp32))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + len(generated), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[0].tolist())
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens[: len(generated)] == generated


def test_int4_graph_and_agreement(peer_int4, reference):
    """int4: quantized ops, finite logits, and top-1 agreement with transformers' greedy continuation.

    Measured (onnxruntime 1.32, onnxruntime-genai 0.18): teacher-forced top-1 agreement 39/48 (0.81),
    free-running greedy agreement 9/48 (a first flip changes the rest of a continuation). The int4
    graph matches a torch round-to-nearest fake-quantisation of the same weights to about 1% of
    the logit range, so the gap is int4 noise on a 128-wide model, not the adapter. The bound only
    catches a broken int4 path (chance agreement is ~0).
    """
    assert {"MatMulNBits", "QMoE"} <= _op_types(peer_int4)
    assert "MoE" not in _op_types(peer_int4)
    session = GenaiPeerSession(peer_int4)
    agree = total = 0
    for ids, expected, generated in reference[1]:
        sequence = np.concatenate([ids, np.asarray([generated])], axis=1)
        logits = session.step(sequence, np.ones_like(sequence), None, session.empty_past(1)).logits[0]
        assert np.isfinite(logits).all()
        predicted = logits[ids.shape[1] - 1 : -1].argmax(-1)
        agree += int((predicted == np.asarray(generated)).sum())
        total += len(generated)
        assert np.isfinite(greedy_tokens(session, ids[0], 4)).all()
    print(f"int4 teacher-forced top-1 agreement {agree}/{total}")
    assert agree >= 0.6 * total
