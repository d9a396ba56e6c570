"""generate settings beyond greedy/top-k on kernelstack's fast path (CPU, fp32): identical to HF where HF is
deterministic, from HF's own distribution where it samples, and never falling back to HF's loop."""

import copy
import json
import warnings

import pytest
import torch

from transformers import StoppingCriteria
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import ksbackend

from ksbackend.models import build_model
from ksbackend.models import tiny_config

from .conftest import ragged_batch

FX = {"backend_options": {"executor": "fx"}}


def fast_and_hf(model, ids, **kwargs):
    """HF's generate and kernelstack's on the same call; kernelstack must not fall back."""
    ref = model.generate(ids, **kwargs)
    optimized = ksbackend.optimize(copy.deepcopy(model), **FX)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback warns: that would be a failure here
        out = optimized.generate(ids, **kwargs)
    return ref, out, optimized


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_greedy_equals_hf(penalty):
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([6, 11, 4])
    ref, out, _ = fast_and_hf(model, ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                              repetition_penalty=penalty)
    assert torch.equal(out, ref)


def test_min_new_tokens_bans_eos_like_hf():
    model = build_model(tiny_config("qwen2"))
    ids, mask = ragged_batch([5, 8])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 1])  # row 0 would stop at its second token
    ref, out, _ = fast_and_hf(model, ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=6, do_sample=False,
                              pad_token_id=0, eos_token_id=eos)
    assert torch.equal(out, ref)
    assert (out[0, ids.shape[1]:ids.shape[1] + 6] != eos).all()


def test_num_return_sequences_prefills_each_prompt_once_and_shares_its_pages():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([70, 9])
    torch.manual_seed(0)
    optimized = ksbackend.optimize(copy.deepcopy(model), page_size=16, **FX)
    out = optimized.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=8, max_new_tokens=5,
                             pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=8, max_new_tokens=5,
                         pad_token_id=0)
    assert out.shape == ref.shape == (16, ids.shape[1] + 5)
    assert torch.equal(out[:, : ids.shape[1]], ref[:, : ids.shape[1]])  # HF's row order: each prompt 8 times
    assert len({tuple(r) for r in out[:8, ids.shape[1]:].tolist()}) > 1  # the copies sample apart
    report = str(ksbackend.explain(optimized))
    assert "8 samples each (each prompt prefilled once" in report and "1 prefill steps" in report
    # 8 copies of a 70-token prompt: 4 full pages shared, each copy a page of its own for the rest
    assert optimized._kernelstack_engine.runner.pool.allocator.high_water < 2 * 8 * 5


def test_stopping_criteria_and_streamer_see_what_hf_shows_them():
    model = build_model(tiny_config("mistral"))
    ids, mask = ragged_batch([7])

    class StopAfterToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    class Collect(BaseStreamer):
        def __init__(self):
            self.seen, self.ended = [], False

        def put(self, value):
            self.seen += value.flatten().tolist()

        def end(self):
            self.ended = True

    free = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    stop = int(free[0, ids.shape[1] + 4])
    streams = [Collect(), Collect()]
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, stopping_criteria=StoppingCriteriaList([StopAfterToken(stop)]), streamer=streams[0],
                         **kwargs)
    optimized = ksbackend.optimize(copy.deepcopy(model), **FX)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = optimized.generate(ids, stopping_criteria=StoppingCriteriaList([StopAfterToken(stop)]),
                                 streamer=streams[1], **kwargs)
    assert torch.equal(out, ref) and out.shape[1] < ids.shape[1] + 16
    assert streams[1].seen == streams[0].seen and streams[1].ended


def test_return_dict_in_generate_gives_sequences():
    model = build_model(tiny_config("gemma"))
    ids, mask = ragged_batch([5, 3])
    ref, out, _ = fast_and_hf(model, ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True)
    assert type(out).__name__ == type(ref).__name__ and torch.equal(out.sequences, ref.sequences)


def test_output_attentions_still_goes_to_hf_with_the_reason():
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([5])
    optimized = ksbackend.optimize(copy.deepcopy(model), **FX)
    with pytest.warns(UserWarning, match="output_attentions"):
        out = optimized.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_attentions=True)
    assert len(out.attentions) == 3


def test_json_schema_through_xgrammar_gives_valid_json_on_every_row():
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.contrib.hf import LogitsProcessor

    model = build_model(tiny_config("llama"))
    vocab = ["<pad>", "<s>", "</s>"] + [chr(i) if 32 <= i < 127 else f"<0x{i:02X}>" for i in range(3, 256)]
    info = xgr.TokenizerInfo(vocab, vocab_size=256, stop_token_ids=[2])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    ids, mask = ragged_batch([6, 9, 4])
    optimized = ksbackend.optimize(copy.deepcopy(model), **FX)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = optimized.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, pad_token_id=0,
                                 eos_token_id=2, logits_processor=[LogitsProcessor(grammar)])
    for row in out[:, ids.shape[1]:].tolist():
        text = "".join(vocab[t] for t in row if t not in (0, 2))
        value = json.loads(text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
