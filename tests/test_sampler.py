"""``kernelstack::sample`` against HF's own logits processors, for the plain-torch reference and the Triton kernels
(under TRITON_INTERPRET=1 on CPU, natively on a GPU).

The kernels run with chunks and lists shrunk (``SMALL``) so that vocabularies of a few hundred tokens span several
chunks, cut lists short and send rows down the full-row path. Interpreted programs are slow (tens of ms each), so
batches stay small and draw counts depend on the device; every draw comes from a fixed seed, so runs repeat exactly.
"""

import math
import os

import pytest
import torch

from transformers.generation.logits_process import MinPLogitsWarper
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
from transformers.generation.logits_process import TemperatureLogitsWarper
from transformers.generation.logits_process import TopKLogitsWarper
from transformers.generation.logits_process import TopPLogitsWarper

import ksbackend  # noqa: F401

from ksbackend.ops.sampling import SamplingParams
from ksbackend.ops.sampling import penalized_logits
from ksbackend.ops.sampling import sampling_mask

SMALL = {"chunk": 64, "kmax": 8, "slots": 16}
IMPLS = ["reference", "triton"]


def device_for(impl):
    if impl == "reference":
        return "cpu"
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs a GPU or TRITON_INTERPRET=1")


def draw(impl, logits, params, offset=0, seed=1234, token_counts=None, allowed_bitmask=None):
    dev = device_for(impl)
    seed, offset = torch.tensor([seed], device=dev), torch.tensor([offset], device=dev)
    if impl == "reference":
        return params.sample(logits, seed, offset, token_counts, allowed_bitmask)
    from ksbackend.kernels.sampler import sample_triton

    p = params
    return sample_triton(logits, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty,
                         p.presence_penalty, token_counts, allowed_bitmask, p.greedy, seed, offset, **SMALL).cpu()


def hf_warped(scores, temperature, top_k, top_p, min_p):
    """One row through HF's warpers, each added only when generate would add it."""
    scores = scores[None].clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(float(temperature))(None, scores)
    if top_k:
        scores = TopKLogitsWarper(int(top_k))(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(float(top_p))(None, scores)
    if min_p:
        scores = MinPLogitsWarper(float(min_p))(None, scores)
    return scores[0]


def random_bitmask(rows, vocab, generator):
    words = torch.randint(-(2**31), 2**31, (rows, math.ceil(vocab / 32)), generator=generator, dtype=torch.int64)
    return words.to(torch.int32)


def chi2_p_value(counts, probs):
    """Chi-square goodness of fit; tokens are pooled (by decreasing probability) into bins expecting >= 5 draws."""
    order = probs.argsort(descending=True)
    expected, observed = probs[order] * counts.sum(), counts[order]
    bins_e, bins_o, acc_e, acc_o = [], [], 0.0, 0.0
    for e, o in zip(expected.tolist(), observed.tolist()):
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= 5:
            bins_e.append(acc_e)
            bins_o.append(acc_o)
            acc_e = acc_o = 0.0
    if bins_e:
        bins_e[-1], bins_o[-1] = bins_e[-1] + acc_e, bins_o[-1] + acc_o
    if len(bins_e) < 2:
        return 1.0
    e, o = torch.tensor(bins_e, dtype=torch.float64), torch.tensor(bins_o, dtype=torch.float64)
    stat = ((o - e) ** 2 / e).sum()
    return torch.special.gammaincc(torch.tensor((len(bins_e) - 1) / 2, dtype=torch.float64), stat / 2).item()


def test_penalties_match_hf_repetition_processor_and_openai_formula():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 300, generator=g) * 4
    input_ids = torch.randint(0, 300, (5, 40), generator=g)
    ones_at = torch.ones_like(input_ids, dtype=torch.int32)
    counts = torch.zeros(5, 300, dtype=torch.int32).scatter_add_(1, input_ids, ones_at)
    ones, zeros = torch.ones(5), torch.zeros(5)
    for penalty in (1.3, 0.7):
        ours = penalized_logits(scores, ones * penalty, zeros, zeros, counts, None)
        assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores.clone()))
    freq, pres = torch.rand(5, generator=g), torch.rand(5, generator=g)
    ours = penalized_logits(scores, ones, freq, pres, counts, None)
    torch.testing.assert_close(ours, scores - freq[:, None] * counts - pres[:, None] * (counts > 0), rtol=0, atol=1e-5)
    bitmask = random_bitmask(5, 300, g)
    masked = penalized_logits(scores, ones, zeros, zeros, None, bitmask)
    bits = [(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for r in range(5) for t in range(300)]
    assert torch.equal(torch.isfinite(masked).flatten(), torch.tensor(bits, dtype=torch.bool))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 50, 0.9, 0.0), (1.3, 0, 0.5, 0.0),
                                                           (1.0, 10, 1.0, 0.1), (0.5, 3, 0.8, 0.05)])
def test_sampling_mask_is_hf_warper_chain(temperature, top_k, top_p, min_p):
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    allowed = torch.stack([torch.isfinite(hf_warped(row, temperature, top_k, top_p, min_p)) for row in logits])
    params = [torch.full((6,), float(v)) for v in (temperature, top_k, top_p, min_p)]
    params[1] = params[1].long()
    assert torch.equal(sampling_mask(logits, *params)[1], allowed)


# (logit scale, temperature, top_k, top_p, min_p, repetition, frequency, presence): one row each, all in one batch
MIXED_ROWS = [(2.0, 0.7, 6, 0.9, 0.0, 1.0, 0.0, 0.0),   # HF's usual warpers: the candidate lists
              (3.0, 1.0, 0, 0.7, 0.0, 1.0, 0.0, 0.0),   # top-p alone, peaked: the lists, with the whole row's softmax
              (3.0, 1.0, 0, 1.0, 0.3, 1.2, 0.0, 0.0),   # min-p alone, peaked: the lists
              (0.5, 1.0, 0, 0.6, 0.0, 1.0, 0.0, 0.0),   # top-p alone over a flat row: the full-row walk
              (2.0, 0.9, 20, 1.0, 0.0, 1.2, 0.0, 0.0),  # top-k above kmax: the full-row walk
              (0.5, 1.2, 0, 1.0, 0.15, 1.0, 0.3, 0.5),  # min-p alone, flat, with OpenAI penalties: the full-row walk
              (2.0, 0.5, 3, 0.8, 0.05, 0.8, 0.0, 0.2),
              (2.0, 1.0, 2, 1.0, 0.0, 1.0, 0.0, 0.0)]


@pytest.mark.parametrize("impl", IMPLS)
def test_never_draws_outside_hf_allowed_set(impl):
    """Rows of one batch with different warpers, penalties and a grammar bitmask; the allowed set is HF's warper
    chain applied to HF's penalised logits."""
    dev = device_for(impl)
    g = torch.Generator().manual_seed(2)
    repeats, vocab = (3, 300) if impl == "triton" and dev == "cpu" else (60, 300)
    rows = [cfg for cfg in MIXED_ROWS for _ in range(repeats)]
    n = len(rows)
    logits = torch.randn(n, vocab, generator=g) * torch.tensor([cfg[0] for cfg in rows])[:, None]
    counts = torch.randint(0, 3, (n, vocab), generator=g, dtype=torch.int32) * (torch.rand(n, vocab, generator=g) < 0.1)
    all_allowed = (torch.rand(n, 1, generator=g) < 0.5).int() * -1  # half the rows
    bitmask = random_bitmask(n, vocab, g) | all_allowed
    names = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"]
    params = SamplingParams.from_values(n, dev, **{k: [cfg[i + 1] for cfg in rows] for i, k in enumerate(names)})
    p = SamplingParams.from_values(n, "cpu", **{k: [cfg[i + 1] for cfg in rows] for i, k in enumerate(names)})
    scores = penalized_logits(logits, p.repetition_penalty, p.frequency_penalty, p.presence_penalty, counts, bitmask)
    allowed = torch.stack([torch.isfinite(hf_warped(s, *cfg[1:5])) for s, cfg in zip(scores, rows)])
    for offset in range(2):
        tokens = draw(impl, logits.to(dev), params, offset, token_counts=counts.to(dev),
                      allowed_bitmask=bitmask.to(dev))
        assert tokens.dtype == torch.int64 and tokens.shape == (n,)
        assert allowed.gather(1, tokens[:, None]).all()


# (scale of the logits, temperature, top_k, top_p, min_p): one row's configuration, drawn many times
DISTRIBUTIONS = [(2.0, 0.7, 5, 0.9, 0.0),    # the candidate lists
                 (0.5, 1.0, 0, 0.5, 0.0),    # top-p over a flat row, top-k off: the full-row walk (threshold search)
                 (1.0, 1.3, 0, 1.0, 0.0),    # temperature only: Gumbel-max across chunks
                 (1.0, 0.8, 12, 1.0, 0.0)]   # top-k above kmax: the full-row walk


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale,temperature,top_k,top_p,min_p", DISTRIBUTIONS)
def test_draws_follow_hf_probabilities(impl, scale, temperature, top_k, top_p, min_p):
    dev = device_for(impl)
    n = 60 if impl == "triton" and dev == "cpu" else 4000
    row = torch.randn(128, generator=torch.Generator().manual_seed(3)) * scale
    probs = hf_warped(row, temperature, top_k, top_p, min_p).double().softmax(-1)
    params = SamplingParams.from_values(n, dev, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens = draw(impl, row.expand(n, -1).contiguous().to(dev), params, offset=7)
    assert (probs[tokens] > 0).all()
    assert chi2_p_value(torch.bincount(tokens, minlength=128).double(), probs) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_are_argmax_and_seed_offset_reproduce(impl, dtype):
    dev = device_for(impl)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 200, generator=g).to(dtype)  # bf16: ties at the top are common
    logits[0, 5] = logits[0, 150] = 9.0  # tie across chunks: the first index wins, as torch.argmax
    counts = torch.randint(0, 2, (7, 200), generator=g, dtype=torch.int32)
    counts[0] = 0
    params = SamplingParams.from_values(7, dev, greedy=[True, False, True, False, False, False, False],
                                        temperature=[1.0, 0.0, 0.8, 1.5, 1.5, 1.0, 1.0], top_k=[0, 0, 5, 0, 40, 0, 0],
                                        top_p=[1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0], repetition_penalty=1.3)
    logits, counts = logits.to(dev), counts.to(dev)
    first = draw(impl, logits, params, offset=3, token_counts=counts)
    scores = penalized_logits(logits.cpu(), params.repetition_penalty.cpu(), params.frequency_penalty.cpu(),
                              params.presence_penalty.cpu(), counts.cpu(), None)
    assert first[0] == 5
    assert torch.equal(first[:3], scores[:3].argmax(-1))
    assert torch.equal(draw(impl, logits, params, offset=3, token_counts=counts), first)
    others = torch.stack([draw(impl, logits, params, offset=o, token_counts=counts) for o in (4, 5)])
    assert torch.equal(others[:, :3], first[:3].expand(2, -1))  # greedy rows never move
    assert (others[:, 3:] != first[3:]).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_rows_give_argmax_for_greedy_and_a_vocabulary_token_for_the_rest(impl):
    """A broken row (NaN logits) must not index past the vocabulary: greedy rows take the first NaN, as argmax, beside
    healthy sampled rows. A sampled row of NaNs raises HF's multinomial error in the reference; the kernel, which
    cannot raise inside a CUDA graph, returns a token of the row."""
    dev = device_for(impl)
    vocab = 300  # 5 chunks of 64, the last one part padding
    logits = torch.randn(6, vocab)
    logits[0, [250, 9]] = float("nan")
    logits[[1, 4, 5]] = float("nan")
    params = SamplingParams.from_values(6, dev, greedy=[True, True, False, False, False, False],
                                        temperature=[1.0, 1.0, 0.9, 0.7, 0.9, 0.7], top_k=[0, 0, 0, 20, 0, 20],
                                        top_p=[1.0, 1.0, 1.0, 0.9, 1.0, 0.9])
    if impl == "reference":
        with pytest.raises(RuntimeError, match="nan"):
            draw(impl, logits.to(dev), params)
        logits, params = logits[:4], SamplingParams.from_values(4, dev, greedy=[True, True, False, False],
                                                                temperature=[1.0, 1.0, 0.9, 0.7],
                                                                top_k=[0, 0, 0, 20], top_p=[1.0, 1.0, 1.0, 0.9])
    tokens = draw(impl, logits.to(dev), params)
    assert tokens[0] == 9 and tokens[1] == 0  # the first NaN of the row
    assert ((tokens >= 0) & (tokens < vocab)).all()


def test_sampling_params_build_select_and_sample_in_a_compiled_graph():
    params = SamplingParams.from_values(3, temperature=[0.5, None, 1.0], top_k=50, top_p=[0.9, 1.0, None],
                                        greedy=[False, False, True])
    assert params.top_k.dtype == torch.int64 and params.greedy.dtype == torch.bool
    assert params.temperature.tolist() == [0.5, 1.0, 1.0] and params.top_p[2] == 1.0
    kept = params.select(torch.tensor([2, 0]))
    assert kept.greedy.tolist() == [True, False] and kept.temperature.tolist() == [1.0, 0.5]
    logits = torch.randn(2, 64)
    seed, offset = torch.tensor([1]), torch.tensor([0])
    compiled = torch.compile(lambda x, s, o: kept.sample(x * 2, s, o), backend="eager", fullgraph=True)
    assert torch.equal(compiled(logits, seed, offset), kept.sample(logits * 2, seed, offset))
    torch.library.opcheck(torch.ops.kernelstack.sample,
                          (logits, kept.temperature, kept.top_k, kept.top_p, kept.min_p, kept.repetition_penalty,
                           kept.frequency_penalty, kept.presence_penalty, None, None, kept.greedy, seed, offset))


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [32, 4])
def test_kernel_at_llama3_vocab_stays_in_hf_allowed_set(batch):
    """Real shapes with the default launch shapes (chunks of 2048 tokens above 4 rows, 4096 up to 4) over a
    128256-token vocabulary."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(batch, 128256, generator=g) * 3).cuda()
    quarter = batch // 4
    top_k = [50] * (2 * quarter) + [0] * quarter + [1000] * quarter
    params = SamplingParams.from_values(batch, "cuda", temperature=0.7, top_k=top_k,
                                        top_p=[0.9] * (3 * quarter) + [1.0] * quarter)
    tokens = params.sample(logits, torch.tensor([1], device="cuda"), torch.tensor([0], device="cuda"))
    _, allowed = sampling_mask(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    assert allowed.gather(1, tokens[:, None]).all()
