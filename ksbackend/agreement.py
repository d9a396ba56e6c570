"""Greedy agreement between two generate outputs, and what each divergence was worth.

Two correct bf16 implementations of one model round differently, so their greedy outputs part
wherever the top two logits are closer than that rounding. ``divergences`` asks an fp32 copy of the
model, over the shared prefix, how far apart the two picked tokens really were: a rewrite that is
merely rounded differently diverges only at near-ties; a wrong one diverges where fp32 is sure.
"""

from dataclasses import dataclass

import torch


@dataclass
class Divergence:
    prompt: int  # row in the batch
    step: int  # generated-token index where the two outputs first differ
    margin: float  # |fp32 logit(reference pick) - fp32 logit(candidate pick)| / std of the fp32 logits
    reference_right: bool  # the reference's pick is the fp32 argmax
    candidate_right: bool


def first_divergences(reference, candidate, prompt_width) -> list:
    """Per row, the first generated position where the outputs differ (None where they agree)."""
    firsts = []
    for r, c in zip(reference[:, prompt_width:], candidate[:, prompt_width:]):
        n = min(len(r), len(c))
        diff = (r[:n] != c[:n]).nonzero()
        firsts.append(int(diff[0]) if len(diff) else (None if len(r) == len(c) else n))
    return firsts


def agreement_rate(reference, candidate, prompt_width) -> float:
    firsts = first_divergences(reference, candidate, prompt_width)
    return sum(f is None for f in firsts) / len(firsts)


@torch.no_grad()
def divergences(fp32_model, input_ids, attention_mask, reference, candidate) -> list[Divergence]:
    """Judge every first divergence of ``candidate`` from ``reference`` with ``fp32_model``."""
    width = input_ids.shape[1]
    found = []
    for row, step in enumerate(first_divergences(reference, candidate, width)):
        if step is None or step >= min(reference.shape[1], candidate.shape[1]) - width:
            continue
        prompt = input_ids[row][attention_mask[row].bool()]
        prefix = torch.cat([prompt, reference[row, width: width + step]])[None]
        logits = fp32_model(input_ids=prefix.to(fp32_model.device)).logits[0, -1].float()
        a, b = int(reference[row, width + step]), int(candidate[row, width + step])
        best = int(logits.argmax())
        found.append(Divergence(row, step, float((logits[a] - logits[b]).abs() / logits.std()), best == a, best == b))
    return found


AGREEMENT_SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=1024)


def agreement_setup(family, weights, device, dtype=torch.bfloat16, prompts=32, seed=0):
    """The model and left-padded prompts the agreement test and benchmark use.

    ``weights="random"``: random weights, random prompts of 8..199 tokens. ``weights="copy-task"``: the
    same model fitted to ``copy_task_sequences`` (see ``fit_copy_task``), prompts from that task."""
    from .models import COPY_PERIOD
    from .models import build_model
    from .models import copy_task_sequences
    from .models import fit_copy_task
    from .models import left_pad
    from .models import tiny_config

    config = tiny_config(family, **AGREEMENT_SHAPE)
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(COPY_PERIOD + 1, 200, (prompts,), generator=generator).tolist()
    if weights == "random":
        model = build_model(config, dtype=dtype, device=device, seed=seed)
        rows = [torch.randint(3, config.vocab_size, (n,), generator=generator) for n in lengths]
    elif weights == "copy-task":
        model = build_model(config, dtype=torch.float32, device=device, seed=seed)
        accuracy = fit_copy_task(model, seed=seed)
        if accuracy < 0.99:
            raise RuntimeError(f"{family} reached only {accuracy:.1%} on the copy task")
        model = model.to(dtype)
        rows = [r[:n] for r, n in zip(copy_task_sequences(prompts, 200, config.vocab_size, generator), lengths)]
    else:
        raise ValueError(f"weights={weights!r}: 'random' or 'copy-task'")
    ids, mask = left_pad(rows, device=device)
    return model, ids, mask


@dataclass
class ForcedAccuracy:
    """Teacher-forced accuracy of one implementation against an fp32 reference, over the same positions."""

    mean_kl: float  # mean KL(fp32 || candidate) of the next-token distributions, in nats
    top1: float  # share of positions whose argmax is fp32's argmax
    positions: int
    # top1 over the positions where fp32's best token leads its second by DECISIVE_GAP or more: elsewhere the argmax is
    # a near-tie that any bf16 rounding may flip either way, and counting it measures luck, not accuracy
    decisive_top1: float = float("nan")
    decisive_positions: int = 0


DECISIVE_GAP = 0.1  # nats between fp32's two best log-probs: ~10x the logit noise of a bf16 forward


def hf_forced_logprobs(model, prompts, targets) -> torch.Tensor:
    """HF's own next-token log-probs [B, T, V] along ``targets``: one plain forward per row over prompt + targets."""
    out = []
    with torch.no_grad():
        for prompt, target in zip(prompts, targets):
            ids = torch.tensor([prompt + target[:-1]], device=model.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
            out.append(logits.log_softmax(-1))
    return torch.stack(out)


def forced_accuracy(reference: torch.Tensor, candidate: torch.Tensor) -> ForcedAccuracy:
    reference, candidate = reference.float(), candidate.float().to(reference.device)
    kl = (reference.exp() * (reference - candidate)).sum(-1)
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float()
    best_two = reference.topk(2, dim=-1).values
    decisive = (best_two[..., 0] - best_two[..., 1]) >= DECISIVE_GAP
    return ForcedAccuracy(float(kl.mean()), float(top1.mean()), kl.numel(), float(top1[decisive].mean()),
                          int(decisive.sum()))


def teacher_forced(model, fp32_model, input_ids, attention_mask, new_tokens, candidates) -> dict:
    """Along HF's own greedy continuation of each prompt (``model``, eos off), compare every candidate's
    next-token log-probs with ``fp32_model``'s: ``candidates`` maps a name to fn(prompts, targets) -> [B, T, V].
    HF itself (``model``'s plain forward) is always a candidate, so each figure stands beside HF's own."""
    width = input_ids.shape[1]
    greedy = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
    targets = greedy[:, width:].tolist()
    reference = hf_forced_logprobs(fp32_model, prompts, targets)
    results = {"HF": forced_accuracy(reference, hf_forced_logprobs(model, prompts, targets))}
    for name, fn in candidates.items():
        results[name] = forced_accuracy(reference, fn(prompts, targets))
    return results


def kernelstack_forced(optimized_model):
    """A ``teacher_forced`` candidate: an optimized model's runner, scoring through prefill and decode."""
    engine = optimized_model._kernelstack_engine

    def score(prompts, targets):
        with torch.inference_mode():
            return engine.score(prompts, targets)

    return score
