"""generate(..., return_dict_in_generate=True, output_scores / output_logits) on kernelstack's fast path (CPU, fp32),
against HF eager generate: the same sequences, and per step the same raw logits and processed scores, rows that
finished early included (HF runs them on the pad token until the batch is done)."""

import copy

import pytest
import torch

from transformers import LogitsProcessorList
from transformers import StoppingCriteria
from transformers import StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper
from transformers.generation.logits_process import TopKLogitsWarper
from transformers.generation.logits_process import TopPLogitsWarper

import ksbackend

from ksbackend.models import build_model
from ksbackend.models import tiny_config

from .conftest import ragged_batch
from .test_generate_features import FX
from .test_generate_features import fast_and_hf

OUTPUTS = [dict(output_scores=True), dict(output_logits=True), dict(output_scores=True, output_logits=True)]


def assert_steps_equal(out, ref, width):
    """The same sequences, and the same per-step scores / logits, one per new token (fp32: HF runs padded
    attention, so equal to ~1e-7)."""
    assert torch.equal(out.sequences, ref.sequences)
    for name in ("scores", "logits"):
        mine, theirs = getattr(out, name), getattr(ref, name)
        assert (mine is None) == (theirs is None), name
        if theirs is not None:
            assert len(mine) == len(theirs) == ref.sequences.shape[1] - width
            for step, (a, b) in enumerate(zip(mine, theirs)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name}[{step}]")


def early_eos(model, ids, mask, row, step):
    """An eos list whose first token ``row`` emits at ``step`` under greedy decoding (so that row finishes early)."""
    free = model.generate(ids, attention_mask=mask, max_new_tokens=step + 1, do_sample=False, pad_token_id=0)
    return [int(free[row, ids.shape[1] + step]), 255]


@pytest.mark.parametrize("outputs", OUTPUTS, ids=lambda o: "+".join(o))
def test_greedy_scores_and_logits_equal_hf_with_a_row_finishing_early(outputs):
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([4, 7, 5])
    eos = early_eos(model, ids, mask, row=1, step=2)
    ref, out, optimized = fast_and_hf(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                      pad_token_id=0, eos_token_id=eos, return_dict_in_generate=True, **outputs)
    width = ids.shape[1]
    assert out.sequences[1, width + 2] in eos and (out.sequences[1, width + 3:] == 0).all()
    assert out.sequences.shape[1] - width > 6  # the finished row ran on, on the pad token, for several steps
    assert_steps_equal(out, ref, width)
    assert "finished rows ran on the pad token" in str(ksbackend.explain(optimized))


def test_scores_after_repetition_penalty_and_min_new_tokens_equal_hf():
    """HF's processors shape the scores: the penalty counts the padded prompt and the pad tokens a finished row
    is fed, and eos is -inf until min_new_tokens."""
    model = build_model(tiny_config("qwen2"))
    ids, mask = ragged_batch([6, 3])
    eos = early_eos(model, ids, mask, row=0, step=4)
    ref, out, _ = fast_and_hf(model, ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=3, do_sample=False,
                              repetition_penalty=1.3, pad_token_id=0, eos_token_id=eos, return_dict_in_generate=True,
                              output_scores=True, output_logits=True)
    assert_steps_equal(out, ref, ids.shape[1])
    assert all(torch.isneginf(s[:, eos]).all() for s in out.scores[:3])


def test_num_return_sequences_with_top_k_1_gives_hf_scores_per_copy():
    """Sampling with top_k=1 draws the argmax, so HF's run is deterministic: its warped scores (temperature, top-k)
    for every copy of every prompt, one finishing early, are reproduced exactly."""
    model = build_model(tiny_config("mistral"))
    ids, mask = ragged_batch([5, 8])
    eos = early_eos(model, ids, mask, row=1, step=3)
    ref, out, _ = fast_and_hf(model, ids, attention_mask=mask, max_new_tokens=9, do_sample=True, top_k=1,
                              temperature=0.7, num_return_sequences=3, pad_token_id=0, eos_token_id=eos,
                              return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert out.sequences.shape[0] == 6 and (out.sequences[3:, ids.shape[1] + 4:] == 0).all()
    assert_steps_equal(out, ref, ids.shape[1])
    assert all(int(torch.isfinite(s).sum(-1).max()) == 1 for s in out.scores)


def test_sampled_scores_are_hf_warpers_over_the_model_run_on_the_returned_tokens():
    """Sampling draws apart from HF, so check the run against HF's own pieces: the model run teacher-forced on the
    returned sequences (pad after eos, as HF's loop feeds a finished row) gives the logits, HF's warpers the scores,
    and every drawn token is one the scores keep."""
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([6, 4])
    optimized = ksbackend.optimize(copy.deepcopy(model), **FX)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                  pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(3)
    free = optimized.generate(ids, eos_token_id=255, **kwargs).sequences
    eos = [int(free[0, ids.shape[1] + 1]), 255]  # the same seed draws the same tokens up to there: row 0 ends early
    torch.manual_seed(3)
    out = optimized.generate(ids, eos_token_id=eos, **kwargs)
    width, steps = ids.shape[1], out.sequences.shape[1] - ids.shape[1]
    assert len(out.scores) == len(out.logits) == steps and all(s.shape == (2, 256) for s in out.scores)
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        forced = model(out.sequences, attention_mask=full_mask, position_ids=positions).logits
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    running, steps_after_eos = torch.ones(2, dtype=torch.bool), 0
    for t in range(steps):
        torch.testing.assert_close(out.logits[t], forced[:, width - 1 + t], atol=1e-5, rtol=1e-5)
        expected = warpers(out.sequences[:, : width + t], forced[:, width - 1 + t])
        assert torch.equal(torch.isinf(out.scores[t]), torch.isinf(expected)), t  # the same kept set
        torch.testing.assert_close(out.scores[t], expected, atol=1e-5, rtol=1e-5)
        kept = torch.isfinite(out.scores[t])
        assert (kept.sum(-1) <= 20).all()
        drawn = out.sequences[:, width + t]
        assert kept[running].gather(1, drawn[running, None]).all()  # a finished row is fed the pad token instead
        steps_after_eos += int(not running.all())
        running &= ~torch.isin(drawn, torch.tensor(eos))
    assert steps_after_eos > 2


class StopAtLength(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 12)


@pytest.mark.parametrize("options, extra, reason", [
    ({"max_batch_size": 2}, {}, "3 sequences, more than one decode batch"),
    ({}, {"stopping_criteria": StoppingCriteriaList([StopAtLength()])}, "stopping criteria beyond eos and length")])
def test_per_step_outputs_go_to_hf_with_the_reason_when_rows_cannot_run_together(options, extra, reason):
    """HF's per-step outputs need every row in one batch to the end, and a finished row fed the pad token from the
    next step (which the device knows only for eos)."""
    model = build_model(tiny_config("llama"))
    ids, mask = ragged_batch([5, 6, 4])
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_scores=True)
    ref = model.generate(ids, **kwargs, **extra)
    optimized = ksbackend.optimize(copy.deepcopy(model), **options, **FX)
    with pytest.warns(UserWarning, match=f"output_scores/output_logits with {reason}"):
        out = optimized.generate(ids, **kwargs, **extra)
    assert torch.equal(out.sequences, ref.sequences) and len(out.scores) == len(ref.scores)
