"""``kernelstack::rope`` (rotate q and k together) and ``kernelstack::rope_cos_sin`` (the table).

``rope`` is HF's ``apply_rotary_pos_emb`` in the rotate_half form: ``x * cos + rotate_half(x) * sin``
with cos/sin broadcastable to q and k ([B, 1, T, D] against [B, H, T, D]).
``rope_cos_sin`` is the rotary embedding's forward: ``emb = cat(pos * inv_freq, pos * inv_freq)``,
``cos = cos(emb) * scaling``; transformers 5.17 computes ``pos * inv_freq`` as a K=1 matmul and 5.23
as a broadcast multiply, and both are exact products in fp32, so one reference serves both.
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def token_major_like(x: torch.Tensor, dtype) -> torch.Tensor:
    """An empty [B, H, T, D] tensor laid out as [B, T, H, D] (the projection's own layout), whatever x's
    strides: the paged attention path then reads q/k as [tokens, heads, dim] without a copy, and the
    layout is fixed, so fake and real outputs agree for Inductor."""
    if x.dim() != 4:
        return x.new_empty(x.shape, dtype=dtype)
    b, h, t, d = x.shape
    return x.new_empty((b, t, h, d), dtype=dtype).transpose(1, 2)


@torch.library.custom_op("kernelstack::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = token_major_like(q, torch.promote_types(q.dtype, cos.dtype))
    k_out = token_major_like(k, torch.promote_types(k.dtype, cos.dtype))
    q_out.copy_(q * cos + rotate_half(q) * sin)
    k_out.copy_(k * cos + rotate_half(k) * sin)
    return q_out, k_out


@rope.register_fake
def _(q, k, cos, sin):
    return (token_major_like(q, torch.promote_types(q.dtype, cos.dtype)),
            token_major_like(k, torch.promote_types(k.dtype, cos.dtype)))


@torch.library.custom_op("kernelstack::rope_cos_sin", mutates_args=())
def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: [B, T] (any int or float dtype); inv_freq: [D/2]. Returns fp32 (cos, sin): [B, T, D]."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


@rope_cos_sin.register_fake
def _(position_ids, inv_freq, scaling):
    shape = (*position_ids.shape, 2 * inv_freq.shape[0])
    return position_ids.new_empty(shape, dtype=torch.float32), position_ids.new_empty(shape, dtype=torch.float32)
