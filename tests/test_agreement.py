"""The agreement tools the GPU test and benchmark judge generate with, checked on CPU."""

import torch

from ksbackend.agreement import agreement_rate
from ksbackend.agreement import divergences
from ksbackend.agreement import first_divergences
from ksbackend.models import COPY_PERIOD
from ksbackend.models import build_model
from ksbackend.models import copy_task_sequences
from ksbackend.models import fit_copy_task
from ksbackend.models import left_pad
from ksbackend.models import tiny_config


def test_left_pad_matches_hf_layout():
    rows = [torch.randint(3, 100, (n,)) for n in (3, 6, 1)]
    ids, mask = left_pad(rows, pad_token_id=0)
    assert ids.shape == (3, 6) and mask.sum(1).tolist() == [3, 6, 1]
    for row, m, r in zip(ids, mask, rows):
        assert torch.equal(row[m.bool()], r) and (row[~m.bool()] == 0).all()


def test_first_divergences_and_rate():
    width = 2
    ref = torch.tensor([[9, 9, 1, 2, 3], [9, 9, 4, 5, 6], [9, 9, 7, 8, 9]])
    cand = ref.clone()
    cand[1, 4] = 0
    cand[2, 2] = 0
    assert first_divergences(ref, cand, width) == [None, 2, 0]
    assert agreement_rate(ref, cand, width) == 1 / 3


def test_divergences_are_judged_by_the_fp32_model():
    model = build_model(tiny_config("llama"))
    ids, mask = left_pad([torch.randint(3, 256, (n,)) for n in (5, 9)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cand = ref.clone()
    logits = model(input_ids=ref[1:, : ids.shape[1] + 1]).logits[0, -1]
    runner_up = int(logits.topk(2).indices[1])
    cand[1, ids.shape[1] + 1] = runner_up  # row 1 parts at generated token 1, onto the fp32 runner-up
    found = divergences(model, ids, mask, ref, cand)
    assert [(d.prompt, d.step) for d in found] == [(1, 1)]
    d = found[0]
    assert d.reference_right and not d.candidate_right
    expected = (logits.max() - logits[runner_up]) / logits.std()
    assert abs(d.margin - expected.item()) < 1e-4 and d.margin > 0


def test_copy_task_is_periodic_and_learnable():
    ids = copy_task_sequences(4, 40, 256, torch.Generator().manual_seed(0))
    assert torch.equal(ids[:, COPY_PERIOD:], ids[:, :-COPY_PERIOD]) and (ids >= 3).all()
    model = build_model(tiny_config("llama", hidden_size=128, intermediate_size=256, head_dim=32))
    accuracy = fit_copy_task(model, steps=400, batch=16, length=64, seed=1)
    assert accuracy >= 0.99 and not model.training


def test_forced_accuracy_counts_top1_apart_at_near_ties():
    """A flipped near-tie lowers top-1 but not the decisive top-1; a flipped decisive position lowers both."""
    from ksbackend.agreement import DECISIVE_GAP
    from ksbackend.agreement import forced_accuracy

    logits = torch.randn(4, 50) * 0.01
    logits[:, 7] += 5.0  # every position decisive for token 7 ...
    logits[0, 3] = logits[0, 7] - DECISIVE_GAP / 10  # ... but position 0, a near-tie between 7 and 3
    reference = logits.log_softmax(-1)
    near_tie_flipped = logits.clone()
    near_tie_flipped[0, 3] += DECISIVE_GAP / 5
    result = forced_accuracy(reference, near_tie_flipped.log_softmax(-1))
    assert (result.top1, result.decisive_top1, result.decisive_positions) == (0.75, 1.0, 3)
    decisive_flipped = near_tie_flipped.clone()
    decisive_flipped[1, 0] += 6.0
    result = forced_accuracy(reference, decisive_flipped.log_softmax(-1))
    assert result.top1 == 0.5 and abs(result.decisive_top1 - 2 / 3) < 1e-6 and result.mean_kl > 0
