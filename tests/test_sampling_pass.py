"""The sampling pass: a user's own sampling chain (Hugging Face's warpers, gpt-fast's exponential-noise argmax) in a
compiled function becomes one ``kernelstack::sample``. Draws must stay inside the chain's allowed set and follow its
distribution (a chi-square test over thousands of rows drawn in one call); what the pass does not recognise stays
upstream and stays correct."""

import math

import pytest
import torch

from transformers.generation.logits_process import MinPLogitsWarper
from transformers.generation.logits_process import TemperatureLogitsWarper
from transformers.generation.logits_process import TopKLogitsWarper
from transformers.generation.logits_process import TopPLogitsWarper

import ksbackend

from .conftest import compile_fx

VOCAB, DRAWS = 24, 6000


def hf_chain(*warpers):
    def draw(ids, scores):
        for warper in warpers:
            scores = warper(ids, scores)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    return draw


def gpt_fast_draw(logits, temperature=0.8, top_k=6):
    logits = logits / max(temperature, 1e-5)
    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
    pivot = v.select(-1, -1).unsqueeze(-1)
    logits = torch.where(logits < pivot, -float("Inf"), logits)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def chain_probs(row, *warpers):
    """The distribution HF's own warpers leave for one row."""
    scores = row[None].clone()
    for warper in warpers:
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


def assert_follows(tokens, probs):
    """Every draw has nonzero probability, and the counts pass a chi-square test at significance 1e-4 (inputs are
    fresh every run, so the level is CI's false-alarm rate per check)."""
    allowed = probs > 0
    outside = sorted(set(tokens[~allowed[tokens]].tolist()))
    assert not outside, f"drew tokens outside the allowed set: {outside}"
    counts = torch.bincount(tokens, minlength=probs.numel()).double()[allowed]
    expected = probs[allowed].double() * tokens.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = int(allowed.sum()) - 1
    if df == 0:  # one token allowed: the set check above is the whole test
        return
    critical = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty, p = 1e-4
    assert chi2 < critical, f"chi-square {chi2:.1f} >= {critical:.1f} (df {df})"


def sampling_sites():
    return [site for graph in ksbackend.explain().graphs for site in graph.pass_result("sampling").matched]


def test_hf_warper_chain_becomes_one_op_and_draws_from_hfs_distribution():
    warpers = (TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.9))
    row = torch.randn(VOCAB)
    draw = compile_fx(hf_chain(*warpers))
    scores = row.repeat(DRAWS, 1).requires_grad_()  # grad mode on, as a model's logits would be
    tokens = draw(torch.zeros(DRAWS, 1, dtype=torch.long), scores)
    assert tokens.shape == (DRAWS,) and tokens.dtype == torch.int64
    assert_follows(tokens, chain_probs(row, *warpers))
    (site,) = sampling_sites()
    assert "multinomial over softmax, top-p 0.9, top-k 8, temperature 0.7 absorbed" in site
    assert ksbackend.explain().graphs[0].ops == {"kernelstack::sample": 1}  # no sort, softmax or multinomial left


def test_gpt_fast_noise_argmax_form_at_batch_1_and_a_dynamic_batch():
    row = torch.randn(VOCAB)
    probs = chain_probs(row, TemperatureLogitsWarper(0.8), TopKLogitsWarper(6))
    draw = compile_fx(gpt_fast_draw)
    one = draw(row)
    assert one.shape == (1,) and one.dtype == torch.int32 and probs[one.long()].item() > 0
    many = draw(row.repeat(DRAWS, 1))  # a second batch size: Dynamo recompiles with a dynamic batch
    assert many.shape == (DRAWS, 1) and many.dtype == torch.int32
    assert_follows(many[:, 0].long(), probs)
    sites = sampling_sites()
    assert len(sites) == 2 and all("exponential-noise argmax over softmax, top-k" in s for s in sites)
    assert all("temperature 0.8 absorbed" in s for s in sites)


def test_an_unrecognised_warper_stays_upstream_and_the_draw_stays_correct():
    """HF applies min-p after top-p; the pass does not absorb min-p, so it stops there and the op draws from min-p's
    output: nothing upstream of the first unknown step is moved into the op."""
    warpers = (TemperatureLogitsWarper(0.9), TopKLogitsWarper(10), MinPLogitsWarper(0.2))
    row = torch.randn(VOCAB)
    tokens = compile_fx(hf_chain(*warpers))(torch.zeros(DRAWS, 1, dtype=torch.long), row.repeat(DRAWS, 1))
    assert_follows(tokens, chain_probs(row, *warpers))
    (site,) = sampling_sites()
    assert "no warpers absorbed" in site


def test_torch_manual_seed_reproduces_and_each_call_draws_afresh():
    draw = compile_fx(hf_chain(TemperatureLogitsWarper(1.5)))
    ids, scores = torch.zeros(256, 1, dtype=torch.long), torch.randn(256, VOCAB)
    torch.manual_seed(7)
    first = draw(ids, scores)
    second = draw(ids, scores)
    torch.manual_seed(7)
    again = draw(ids, scores)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_a_draw_of_several_samples_is_left_with_the_reason():
    def draw(scores):
        return torch.multinomial(scores.softmax(-1), 2)

    scores = torch.randn(4, VOCAB)
    out = compile_fx(draw)(scores)
    assert out.shape == (4, 2) and (out[:, 0] != out[:, 1]).all()  # without replacement, as torch draws them
    (graph,) = ksbackend.explain().graphs
    assert graph.pass_result("sampling").left[0][1] == "multinomial draws more than one sample"
    assert graph.ops == {}


@pytest.mark.cuda
def test_on_cuda_the_chain_runs_the_triton_sampler_inside_an_inductor_graph():
    warpers = (TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.9))
    row = torch.randn(VOCAB, device="cuda")
    draw = torch.compile(hf_chain(*warpers), backend="kernelstack")
    tokens = draw(torch.zeros(DRAWS, 1, dtype=torch.long, device="cuda"), row.repeat(DRAWS, 1))
    assert_follows(tokens.cpu(), chain_probs(row.cpu(), *warpers))
    (graph,) = ksbackend.explain().graphs
    assert graph.ops == {"kernelstack::sample": 1} and graph.executor == "inductor"
    assert "Triton" in graph.implementations["kernelstack::sample"]
