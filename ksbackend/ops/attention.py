"""``kernelstack::attention``: dense attention over the caller's own K/V (HF's DynamicCache/StaticCache).

This is the op the attention pass puts where HF's SDPA call (with its GQA expand) or eager
matmul-softmax-matmul chain stood. K/V keep their own (fewer) heads: grouped-query attention is
done inside the op, never by materialising repeated K/V. The paged path used by generate is
``kernelstack::paged_attention``.

Differentiable: the backward (``_attention_backward``) is written out in torch ops, recomputing the
probabilities rather than saving them.
"""

from typing import Optional

import torch
import torch.nn.functional as F


@torch.library.custom_op("kernelstack::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; mask: bool (True = attend) or additive, broadcastable
    to [B, Hq, T, S]. ``is_causal`` is SDPA's (top-left aligned). Returns [B, Hq, T, Dv] contiguous."""
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.contiguous()


@attention.register_fake
def _(q, k, v, mask, scale, is_causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, mask, ctx.scale, ctx.is_causal = inputs
    ctx.save_for_backward(q, k, v, mask)


def _attention_backward(ctx, grad_out):
    """Recompute P = softmax(scale * q k^T + mask), then dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dP * P)), dQ = scale * dS K, dK = scale * dS^T Q. Computed in fp32 (fp64 stays
    fp64) over K/V repeated to the query heads; each kv head collects its group's contributions.
    Fully masked rows have P = 0 (SDPA's output there is 0 too). An additive mask that requires grad
    gets dS, summed to its broadcast shape."""
    q, k, v, mask = ctx.saved_tensors
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qf, grad_out = q.to(dtype), grad_out.to(dtype)
    kf, vf = (t.to(dtype).repeat_interleave(group, dim=1) for t in (k, v))

    scores = (qf @ kf.transpose(-2, -1)) * ctx.scale
    if ctx.is_causal:  # SDPA's is_causal: top-left aligned
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1).masked_fill(scores.amax(-1, keepdim=True) == float("-inf"), 0.0)

    grad_probs = grad_out @ vf.transpose(-2, -1)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    grad_q = (grad_scores @ kf) * ctx.scale
    grad_k = (grad_scores.transpose(-2, -1) @ qf) * ctx.scale
    grad_v = probs.transpose(-2, -1) @ grad_out
    grad_k, grad_v = (g.unflatten(1, (k.shape[1], group)).sum(2) for g in (grad_k, grad_v))
    grad_mask = grad_scores.sum_to_size(mask.shape).to(mask.dtype) if ctx.needs_input_grad[3] else None
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_mask, None, None


attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)
