"""export_switch: Switch Transformers as encoder.onnx + decoder.onnx (KV cache), capacity included."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mcsmoe_deploy as m
from conftest import byte_tokenizer, tiny_config
from mcsmoe_deploy.exporters import DOMAIN, OP_TYPE
from mcsmoe_deploy.exporters.dense import group_dense_experts
from mcsmoe_deploy.contract import decoder_past_names, decoder_present_names, encoder_present_names
from mcsmoe_deploy.exporters.switch_export import export_switch, greedy_generate_switch_onnx
from mcsmoe_deploy.models import adapter_for_config
from mcsmoe_deploy.models.kv_cache import forward_with_cache

CAPACITY = 3  # small enough that the tiny model drops tokens at the lengths below
RECIPE = dict(experts=3, rank_ratio=0.5, sparse_keep=0.1, max_calib_tokens=1024, calib_seq_len=32)


def _sessions(result):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return tuple(
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for path in (result.encoder, result.decoder)
    )


def _tiny_switch():
    """The tiny Switch model of conftest with expert_capacity = CAPACITY and a milder init.

    conftest's initializer_factor 4 makes the (unscaled) attention scores so large that
    transformers' own fp32 forward is about 1e-4 from float64 on this model; at 1.5 it is
    about 1e-5, while routing and greedy output (seed 3) still vary.
    """
    import transformers as tf

    config = tiny_config("switch_transformers")
    config.expert_capacity = CAPACITY
    config.initializer_factor = 1.5
    torch.manual_seed(3)
    return tf.SwitchTransformersForConditionalGeneration(config).float().eval()


@pytest.fixture(scope="module", params=["dense", "compressed"])
def exported(request, tmp_path_factory):
    """(torch reference, adapter, export result, encoder session, decoder session).

    dense: transformers' own experts are the reference; the export goes through a copy
    whose experts are G = E dense groups. compressed: the compressed checkpoint of the same
    model is its own reference.
    """
    root = tmp_path_factory.mktemp(f"switch_{request.param}")
    source = _tiny_switch()
    if request.param == "dense":
        reference, model = source, copy.deepcopy(source)
        group_dense_experts(model, adapter_for_config(model.config))
    else:
        source.save_pretrained(root / "source")
        byte_tokenizer().save_pretrained(root / "source")
        m.compress_model(root / "source", root / "c", m.CompressionRecipe(**RECIPE), progress=False)
        reference = model = m.load_compressed(root / "c")
    adapter = adapter_for_config(model.config)
    result = export_switch(model, adapter, root / "onnx")
    return reference, adapter, result, *_sessions(result)


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    # fp32; measured at most 4e-6 of max |expected| on these models
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max()


def _encoder_inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, length // 2 :] = 0  # a right-padded row
    return ids, mask


class DropCounter:
    """Counts the tokens transformers' routers drop for capacity (dispatch row all zero)."""

    def __init__(self, model: torch.nn.Module, adapter):
        self.dropped = 0
        self.handles = [
            layer.block.router.register_forward_hook(self._hook) for layer in adapter.moe_layers(model)
        ]

    def _hook(self, module, inputs, output):
        self.dropped += int((output[0].sum(-1) == 0).sum())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_graph_structure(exported):
    reference, adapter, result, encoder, decoder = exported
    layers = result.geometry.num_layers
    counts = {part: len(adapter.moe_layers(getattr(reference, part))) for part in ("encoder", "decoder")}
    assert counts == {"encoder": 2, "decoder": 2}
    assert (result.encoder_moe_nodes, result.decoder_moe_nodes) == (2, 2)
    for part, path in (("encoder", result.encoder), ("decoder", result.decoder)):
        onnx.checker.check_model(str(path), full_check=True)
        saved = onnx.load(path)
        nodes = [n for n in saved.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
        assert len(nodes) == counts[part]
        assert {n.overload for n in nodes} <= {f.overload for f in saved.functions if f.domain == DOMAIN}
        assert all(next(a.i for a in n.attribute if a.name == "top_k") == 1 for n in nodes)
    assert [i.name for i in encoder.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in encoder.get_outputs()] == ["encoder_hidden_states", *encoder_present_names(layers)]
    assert [i.name for i in decoder.get_inputs()] == [
        "input_ids", "encoder_attention_mask", *decoder_past_names(layers)
    ]
    assert [o.name for o in decoder.get_outputs()] == ["logits", *decoder_present_names(layers)]
    past = {i.name: i.shape for i in decoder.get_inputs()}
    assert isinstance(past["past_key_values.0.decoder.key"][2], str)  # dynamic past length (0 allowed)
    assert past["past_key_values.0.encoder.key"][2] == encoder.get_outputs()[1].shape[2]  # the encoder's length


@pytest.mark.parametrize("batch,length", [(1, 5), (3, 12)])
def test_encoder_matches_torch(exported, batch, length):
    reference, adapter, result, encoder, _ = exported
    ids, mask = _encoder_inputs(batch, length, seed=length)
    with torch.no_grad(), DropCounter(reference.encoder, adapter) as counter:
        expected = reference.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    if length > 2 * CAPACITY:
        assert counter.dropped > 0  # the case the capacity logic is for
    (got,) = encoder.run(["encoder_hidden_states"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    _close(got, expected)


@pytest.mark.parametrize("batch,length,first,second", [(1, 5, 1, 1), (3, 12, 8, 2)])
def test_decoder_steps_match_torch(exported, batch, length, first, second):
    """A first decoder call (empty past) of `first` tokens, then `second` tokens on its cache."""
    reference, adapter, result, encoder, decoder = exported
    layers = result.geometry.num_layers
    ids, mask = _encoder_inputs(batch, length, seed=length + 1)
    dec_ids = torch.randint(1, 256, (batch, first + second), generator=torch.Generator().manual_seed(length))
    encoded = encoder.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    cross = encoded[1:]
    heads, head_dim = result.geometry.num_heads, result.geometry.head_dim
    self_past = [np.zeros((batch, heads, 0, head_dim), dtype=np.float32)] * (2 * layers)
    with torch.no_grad(), DropCounter(reference.decoder, adapter) as counter:
        encoder_outputs = reference.encoder(input_ids=ids, attention_mask=mask)
        cache = None
        for step, (start, stop) in enumerate(((0, first), (first, first + second))):
            out, cache = forward_with_cache(reference, cache, encoder_outputs=encoder_outputs, attention_mask=mask,
                                            decoder_input_ids=dec_ids[:, start:stop])
            pasts = [t for i in range(layers) for t in (*self_past[2 * i : 2 * i + 2], *cross[2 * i : 2 * i + 2])]
            logits, *presents = decoder.run(["logits", *decoder_present_names(layers)], {
                "input_ids": dec_ids[:, start:stop].numpy(), "encoder_attention_mask": mask.numpy(),
                **dict(zip(decoder_past_names(layers), pasts)),
            })
            _close(logits, out.logits.numpy())
            for i, layer in enumerate(cache.self_attention_cache.layers):
                _close(presents[2 * i], layer.keys.numpy())
                _close(presents[2 * i + 1], layer.values.numpy())
                assert presents[2 * i].shape[2] == stop
            if step == 0:
                for i, layer in enumerate(cache.cross_attention_cache.layers):  # the encoder graph's presents
                    _close(cross[2 * i], layer.keys.numpy())
                    _close(cross[2 * i + 1], layer.values.numpy())
            self_past = presents
    if first > 2 * CAPACITY:
        assert counter.dropped > 0


def test_greedy_generation_matches_generate(exported):
    reference, _, _, encoder, decoder = exported
    config = reference.config
    ids, mask = _encoder_inputs(2, 9, seed=0)
    generate = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, num_beams=1)
    with torch.no_grad():
        free = reference.generate(ids, eos_token_id=None, **generate)  # 16 tokens whatever they are
        stopping = reference.generate(ids, **generate)  # pads rows after end of sequence, may stop early
    assert (free[:, 0] == config.decoder_start_token_id).all()
    got = greedy_generate_switch_onnx(encoder, decoder, ids.numpy(), 16, mask.numpy(), config.decoder_start_token_id)
    assert got.shape == (2, 16)
    assert got.tolist() == free[:, 1:].tolist()
    got = greedy_generate_switch_onnx(
        encoder, decoder, ids.numpy(), 16, mask.numpy(), config.decoder_start_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    assert got.tolist() == stopping[:, 1:].tolist()


def test_one_loop_drives_the_onnxruntime_and_torch_seq2seq_sessions_alike(exported):
    from mcsmoe_deploy.exporters.validate import compare_switch
    from mcsmoe_deploy.runtime import GenerationConfig, generate
    from mcsmoe_deploy.runtime.ort_session import OrtSeq2SeqSession
    from mcsmoe_deploy.runtime.torch_session import TorchSeq2SeqSession

    reference, _, result, _, _ = exported
    config = reference.config
    ids, mask = _encoder_inputs(2, 9, seed=0)
    with torch.no_grad():
        want = reference.generate(ids, attention_mask=mask, eos_token_id=None, max_new_tokens=12, do_sample=False,
                                  num_beams=1)[:, 1:].tolist()
    onnx_session = OrtSeq2SeqSession.from_folder(result.encoder.parent, threads=1)
    torch_session = TorchSeq2SeqSession(reference)
    assert onnx_session.vocab_size == torch_session.vocab_size == config.vocab_size
    starts = [[config.decoder_start_token_id]] * 2
    for session in (onnx_session, torch_session):
        encoded = session.encode(ids.numpy(), mask.numpy())
        assert encoded.hidden_states.shape == (2, 9, config.d_model)
        assert generate(session.decoder(encoded), starts, GenerationConfig(max_new_tokens=12)).tokens == want
    max_abs, max_rel = compare_switch(result.encoder, result.decoder, reference)
    assert 0 < max_rel < 1e-4 and max_abs > 0
