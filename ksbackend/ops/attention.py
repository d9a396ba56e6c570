"""``kernelstack::attention``: dense attention over the caller's own K/V (HF's DynamicCache/StaticCache).

This is the op the attention pass puts where HF's SDPA call (with its GQA expand) or eager
matmul-softmax-matmul chain stood. K/V keep their own (fewer) heads: grouped-query attention is
done inside the op, never by materialising repeated K/V. The paged path used by generate is
``kernelstack::paged_attention``.
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
