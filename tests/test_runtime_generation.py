"""Sessions and generation: onnxruntime and torch produce the same tokens; padding, stops and sampling behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mcsmoe_deploy as m
from mcsmoe_deploy.runtime import GenerationConfig, generate, open_session, pick_tokens
from mcsmoe_deploy.runtime.generation import left_pad, right_pad
from mcsmoe_deploy.runtime.parity import decoder_logits

RECIPE = dict(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)
PROMPTS = [[5, 17, 99, 3, 250, 41], [7, 8, 9]]


@pytest.fixture(scope="module", params=["dense", "compressed"])
def model_pair(request, tiny_dirs, tmp_path_factory):
    """(checkpoint dir, exported KV-cache graph) of the tiny Mixtral, dense or compressed."""
    root = tmp_path_factory.mktemp(f"runtime_{request.param}")
    model_dir = tiny_dirs["mixtral"]
    if request.param == "compressed":
        model_dir = root / "compressed"
        m.compress_model(tiny_dirs["mixtral"], model_dir, m.CompressionRecipe(**RECIPE), progress=False)
    graph = root / "model.onnx"
    m.export_model(model_dir, graph, validate=False)
    return model_dir, graph


def test_ort_greedy_equals_torch_greedy_with_padding(model_pair):
    model_dir, graph = model_pair
    config = GenerationConfig(max_new_tokens=12)
    ort_session = open_session(graph, "ort", threads=1)
    torch_session = open_session(model_dir, "torch")
    assert ort_session.geometry == torch_session.geometry and ort_session.vocab_size == torch_session.vocab_size
    batched = generate(ort_session, PROMPTS, config).tokens
    assert batched == generate(torch_session, PROMPTS, config).tokens
    # each padded row equals its prompt alone
    assert batched == [generate(ort_session, [p], config).tokens[0] for p in PROMPTS]
    assert all(len(t) == 12 for t in batched)


def test_torch_session_matches_transformers_generate(tiny_dirs):
    session = open_session(tiny_dirs["mixtral"], "torch")
    model, _ = m.load_model(tiny_dirs["mixtral"], device="cpu")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
    assert generate(session, [PROMPTS[0]], GenerationConfig(max_new_tokens=16)).tokens[0] == expected


def test_stop_tokens_end_a_row_and_pad_it(model_pair):
    _, graph = model_pair
    session = open_session(graph, "ort", threads=1)
    free = generate(session, PROMPTS, GenerationConfig(max_new_tokens=8)).tokens
    stop = free[0][2]  # row 0 stops at its third token; row 1 only if it meets the same token
    stopped = generate(session, PROMPTS, GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,))).tokens
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    expected_1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == expected_1


def test_sampling_is_seeded_and_greedy_at_tiny_top_p(model_pair):
    _, graph = model_pair
    session = open_session(graph, "ort", threads=1)
    sampled = GenerationConfig(max_new_tokens=10, temperature=1.5, seed=3)
    assert generate(session, PROMPTS, sampled).tokens == generate(session, PROMPTS, sampled).tokens
    nucleus_of_one = GenerationConfig(max_new_tokens=10, temperature=1.5, top_p=1e-9, seed=3)
    greedy = GenerationConfig(max_new_tokens=10)
    assert generate(session, PROMPTS, nucleus_of_one).tokens == generate(session, PROMPTS, greedy).tokens


def test_top_p_sampling_frequencies():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two, renormalised to 5/8 and 3/8
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    rng = np.random.default_rng(0)
    picks = pick_tokens(logits, GenerationConfig(temperature=1.0, top_p=0.7), rng)
    counts = np.bincount(picks, minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 5 / 8) < 0.03  # about 4 standard deviations
    full = np.bincount(pick_tokens(logits, GenerationConfig(temperature=1.0), rng), minlength=4) / 4000
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_left_pad_positions_count_real_tokens():
    ids, mask, positions = left_pad([[4, 5, 6], [9]], pad_token_id=0)
    np.testing.assert_array_equal(ids, [[4, 5, 6], [0, 0, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])


def test_right_pad_puts_each_rows_tokens_first():
    ids, mask, positions = right_pad([[4, 5, 6], [9]], pad_token_id=0)
    np.testing.assert_array_equal(ids, [[4, 5, 6], [9, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])


def test_kept_logits_are_left_padded_whatever_side_the_session_pads(model_pair):
    """The fused graph pads right, torch left: every step's kept logits agree at the real positions."""
    model_dir, graph = model_pair
    ort_session, torch_session = open_session(graph, "ort", threads=1), open_session(model_dir, "torch")
    assert (ort_session.padding_side, torch_session.padding_side) == ("right", "left")
    continuation = np.array([[11, 12], [13, 14]])
    got, want = (decoder_logits(s, PROMPTS, continuation) for s in (ort_session, torch_session))
    real = left_pad(PROMPTS, 0)[1].astype(bool)
    assert len(got) == len(want) == 3 and got[0].shape == want[0].shape
    assert np.abs(got[0] - want[0])[real].max() <= 1e-4 * np.abs(want[0]).max()
    for step, expected in zip(got[1:], want[1:]):
        assert np.abs(step - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize(
    "backend, target, message",
    [
        ("onnx-magic", "graph", "unknown backend"),
        ("ort", "missing", "ONNX file not found"),
        ("ort", "dir", "runs an ONNX file"),
        ("torch", "graph", "loads a checkpoint directory"),
        ("ort", "no-past", "not a KV-cache graph"),
        ("ort", "corrupt", "is not a readable ONNX file"),
    ],
)
def test_open_session_refuses_with_a_clear_message(backend, target, message, model_pair, tmp_path):
    model_dir, graph = model_pair
    if target == "corrupt":
        path = tmp_path / "corrupt.onnx"
        path.write_bytes(b"not a protobuf at all")
    elif target == "no-past":
        path = tmp_path / "plain.onnx"
        m.export_model(model_dir, path, with_past=False, validate=False)
    else:
        path = {"graph": graph, "missing": tmp_path / "nope.onnx", "dir": model_dir}[target]
    with pytest.raises(m.UserError, match=message):
        open_session(path, backend)


def test_ort_session_saves_the_optimised_graph_and_it_generates_the_same(model_pair, tmp_path):
    _, graph = model_pair
    optimised = tmp_path / "optimised.onnx"
    config = GenerationConfig(max_new_tokens=6)
    reference = generate(open_session(graph, "ort", threads=1, opt_level="disable"), PROMPTS, config).tokens
    assert generate(open_session(graph, "ort", threads=1, optimized_model_path=optimised), PROMPTS, config).tokens \
        == reference
    assert generate(open_session(optimised, "ort", threads=1), PROMPTS, config).tokens == reference


def test_run_command_on_a_missing_graph_is_one_line(tmp_path, capsys):
    from mcsmoe_deploy.cli import main

    assert main(["run", str(tmp_path / "nope.onnx"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == f"mcsmoe: error: ONNX file not found: {tmp_path / 'nope.onnx'}"


# ---------------------------------------------------------------------------------------------
# one loop for everything: teacher forcing, the comparator, the backend table


def test_comparator_on_known_arrays():
    from mcsmoe_deploy.runtime.parity import Discrepancy, compare_arrays

    reference = np.array([[1.0, -4.0], [2.0, 0.5]], dtype=np.float32)
    got = np.array([[1.5, -4.0], [2.0, -0.5]], dtype=np.float32)
    found = compare_arrays(got, reference)
    assert found.max_abs_error == pytest.approx(1.0)  # at [1, 1]
    assert found.max_rel_error == pytest.approx(1.0 / 4.0)  # over max |reference| = 4
    assert compare_arrays(reference, reference) == Discrepancy(0.0, 0.0)
    assert Discrepancy(1.0, 0.1).worst(Discrepancy(0.5, 0.3)) == Discrepancy(1.0, 0.3)
    with pytest.raises(ValueError, match="shapes differ"):
        compare_arrays(got[:1], reference)


class _Shifted(m.runtime.DecoderSession):
    """Another session's logits plus a constant: a runner whose error is known."""

    def __init__(self, inner, shift: float):
        self.inner, self.shift, self.vocab_size = inner, shift, inner.vocab_size

    def empty_past(self, batch):
        return self.inner.empty_past(batch)

    def step(self, input_ids, attention_mask, position_ids, past):
        out = self.inner.step(input_ids, attention_mask, position_ids, past)
        return m.runtime.StepOutput(out.logits + self.shift, out.past)


def test_teacher_forcing_feeds_the_given_tokens_and_keeps_every_steps_logits(model_pair):
    _, graph = model_pair
    session = open_session(graph, "ort", threads=1)
    prompt = np.array([PROMPTS[0], PROMPTS[0][::-1]])
    forced = np.array([[11, 12], [13, 14]])
    result = generate(session, prompt, GenerationConfig(max_new_tokens=3), forced_tokens=forced, keep_logits=True)
    assert [r[:2] for r in result.tokens] == forced.tolist() and all(len(r) == 3 for r in result.tokens)
    assert [x.shape for x in result.logits] == [(2, 6, session.vocab_size)] + [(2, 1, session.vocab_size)] * 2
    # the last token is picked from the logits after the forced ones
    assert [r[2] for r in result.tokens] == result.logits[-1][:, -1].argmax(axis=-1).tolist()
    # the prefill's last logits are the first greedy pick's
    free = generate(session, prompt, GenerationConfig(max_new_tokens=1)).tokens
    assert [r[0] for r in free] == result.logits[0][:, -1].argmax(axis=-1).tolist()
    with pytest.raises(ValueError, match="forced_tokens"):
        generate(session, prompt, GenerationConfig(max_new_tokens=2), forced_tokens=forced[:1])


def test_torch_runner_from_memory_and_ort_session_agree_step_by_step(model_pair):
    from mcsmoe_deploy.runtime.parity import compare_decoders
    from mcsmoe_deploy.runtime.torch_session import TorchDecoderSession

    model_dir, graph = model_pair
    session = open_session(graph, "ort", threads=1)
    reference = TorchDecoderSession.from_model(open_session(model_dir, "torch").model)
    ids = np.random.default_rng(0).integers(0, session.vocab_size, (2, 8))
    found = compare_decoders(session, reference, ids[:, :6], ids[:, 6:])
    assert 0 < found.max_rel_error < 1e-4
    shifted = compare_decoders(_Shifted(session, 0.25), session, ids[:, :6], ids[:, 6:])
    assert shifted.max_abs_error == pytest.approx(0.25, rel=1e-5)


def test_backend_table_loads_classes_on_demand_and_backends_import_no_sibling():
    import ast
    from pathlib import Path

    from mcsmoe_deploy.runtime import session as session_module

    assert session_module.BACKENDS == ("ort", "trt", "torch")
    assert session_module.backend_class("ort").__name__ == "OrtDecoderSession"
    assert session_module.backend_class("torch").opens_directory
    with pytest.raises(m.UserError, match="unknown backend"):
        session_module.backend_class("onnx-magic")
    runtime = Path(session_module.__file__).parent
    backends = {target.split(":")[0].rsplit(".", 1)[1] for target in session_module.BACKEND_CLASSES.values()}

    def imported(module: str) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse((runtime / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
        return names

    assert not {f".{b}" for b in backends} & imported("session")
    for backend in backends:
        assert not {f".{b}" for b in backends - {backend}} & imported(backend), backend
    for module in ("session", "generation", "parity", "bench", "text", *backends):
        assert not any("exporters" in name for name in imported(module)), module


def test_open_session_runs_a_switch_export_folder_as_seq2seq(tiny_dirs, tmp_path):
    from mcsmoe_deploy.corpus import load_tokenizer_from
    from mcsmoe_deploy.runtime import Seq2SeqSession
    from mcsmoe_deploy.runtime.text import generate_text

    folder = tmp_path / "switch"
    m.export_model(tiny_dirs["switch_transformers"], folder, validate=False)
    session = open_session(folder, "ort", threads=1)
    assert isinstance(session, Seq2SeqSession) and session.vocab_size > 0
    model, _ = m.load_model(tiny_dirs["switch_transformers"], device="cpu")
    tok = load_tokenizer_from(tiny_dirs["switch_transformers"], "")
    prompts, alone = ["hello there", "a"], []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  num_beams=1, eos_token_id=tok.eos_token_id)[0, 1:].tolist()
        alone.append(generate_text(folder, [prompt], "ort", GenerationConfig(max_new_tokens=6),
                                   session=session).result.tokens[0])
        assert alone[-1] == want
    # a left-padded batch encodes each prompt as alone
    assert generate_text(folder, prompts, "ort", GenerationConfig(max_new_tokens=6)).result.tokens == alone
    # bench times it too: the encoding counts in the prefill, each decoder step in the decode
    config = m.runtime.BenchConfig(prompt_len=8, decode_tokens=3, warmup=0, iterations=2, threads=1)
    result = m.runtime.bench.measure(m.runtime.Contestant(str(folder), "ort"), config, 1e9)
    assert result.prefill.p50_ms > 0 and result.decode.p50_ms > 0
    assert 0 < result.active_weight_bytes < result.bytes_on_disk  # the decoder's weights, per token
