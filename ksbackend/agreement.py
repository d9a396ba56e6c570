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
    from .models import COPY_PERIOD, build_model, copy_task_sequences, fit_copy_task, left_pad, tiny_config

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
