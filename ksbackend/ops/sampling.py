"""``kernelstack::sample``: temperature, top-k, top-p and min-p sampling in one op, driven by one
uniform random number per row.

The filters run in the order HF's logits warpers apply them (temperature -> top-k -> top-p -> min-p),
each on the distribution the previous one left. Taking the random numbers as an input (drawn with
``torch.rand`` by the caller) keeps the op a pure function: a fixed seed reproduces a run, and inside a
CUDA graph ``torch.rand`` advances the generator on every replay, unlike host-side seeds. All per-row
parameters are tensors, so changing them never recompiles or re-captures anything.
"""

import torch


def sampling_mask(logits, temperature, top_k, top_p, min_p):
    """Scaled logits and the [B, V] mask of tokens each row may emit."""
    scaled = logits.float() / temperature.float().clamp_min(1e-6)[:, None]
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)[:, None]
    keep = rank < k
    probs = torch.where(keep, sorted_logits, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    keep &= (before < top_p.float()[:, None]) | (rank == 0)
    probs = torch.where(keep, sorted_logits, float("-inf")).softmax(-1)
    keep &= probs >= min_p.float()[:, None] * probs[:, :1]
    mask = torch.zeros_like(keep).scatter_(-1, order, keep)
    return scaled, mask


@torch.library.custom_op("kernelstack::sample", mutates_args=())
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; per-row temperature/top_p/min_p (float) and top_k (int, 0 = off); uniform [B] in [0, 1).
    Returns int64 token ids [B]."""
    scaled, mask = sampling_mask(logits, temperature, top_k, top_p, min_p)
    probs = torch.where(mask, scaled, float("-inf")).softmax(-1)
    cdf = probs.cumsum(-1)
    target = uniform.float()[:, None] * cdf[:, -1:]
    token = (cdf <= target).sum(-1).clamp(max=logits.shape[-1] - 1)
    # rounding can leave cdf flat over masked tails: step back to the last allowed token if needed
    allowed = mask.gather(-1, token[:, None])[:, 0]
    last_allowed = (mask * torch.arange(mask.shape[-1], device=mask.device)).argmax(-1)
    return torch.where(allowed, token, last_allowed)


@sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, uniform):
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)
