"""``kernelstack::paged_attention``: append this step's K/V to the paged pool, then attend over each
sequence's cached tokens, ragged (no padding anywhere). ``kernelstack::rope_paged_attention`` is the same
with the rotary embedding of q and k done first (the rope_into_attention pass makes it: on CUDA one
kernel rotates and appends, then the attention kernel runs).

Inputs are the flattened token stream of the step: q [N, Hq, D], k/v [N, Hkv, D]. Which tokens belong
to which sequence, their positions and pages come from the forward context, not from the graph, so
one compiled graph serves every batch composition. ``window_left`` >= 0 limits each query to that many
earlier tokens (sliding-window attention, HF's ``sliding_window - 1``); -1 is full causal attention.
The reference below is what runs without a device attention backend (CPU, or shapes FlashInfer lacks).

Inference-only: earlier steps' K/V are read from the pool, not from the op's inputs, so no gradient
through it could be right; a call whose q/k/v require grad (in grad mode) raises instead.
"""

import torch
import torch.nn.functional as F

from ..runtime.context import get_forward_context
from ..runtime.metadata import DecodeMetadata
from .rope import rope as rope_op


def _window_mask(q_pos, k_pos, kv_lens, window_left):
    allowed = (k_pos <= q_pos) & (k_pos < kv_lens)
    if window_left >= 0:
        allowed &= k_pos >= q_pos - window_left
    return allowed


def decode_attention_reference(q, layer, scale, window_left, pool, meta: DecodeMetadata):
    """One query per sequence over its pages, read densely through the page table (no host sync)."""
    width = meta.max_pages or meta.page_table.shape[1]
    k, v = (t.flatten(1, 2) for t in pool.read_pages(layer, meta.page_table[:, :width], q.dtype))  # [B, W * P, H, D]
    lens = meta.kv_lens.long()[:, None, None, None]
    k_pos = torch.arange(k.shape[1], device=q.device)[None, None, None, :]
    allowed = _window_mask(lens - 1, k_pos, lens, window_left)
    out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[2])
    return out[:, :, 0]


def paged_attention_reference(q, k, v, layer, scale, window_left, pool, meta):
    """Write K/V into the pool, then attend: one sequence at a time for prefill, densely for decode."""
    pool.write(layer, k, v, meta.slots.to(pool.device))
    if isinstance(meta, DecodeMetadata):
        return decode_attention_reference(q, layer, scale, window_left, pool, meta)
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    qo, kv_ptr = meta.qo_indptr.tolist(), meta.kv_indptr.tolist()
    for b, kv_len in enumerate(meta.kv_lens.tolist()):
        q_b = q[qo[b]:qo[b + 1]]
        k_b, v_b = pool.gather(layer, meta.kv_indices[kv_ptr[b]:kv_ptr[b + 1]], kv_len, q.dtype)
        q_pos = torch.arange(kv_len - q_b.shape[0], kv_len, device=q.device)[:, None]
        allowed = _window_mask(q_pos, torch.arange(kv_len, device=q.device)[None, :], kv_len, window_left)
        o = F.scaled_dot_product_attention(q_b.transpose(0, 1), k_b.transpose(0, 1), v_b.transpose(0, 1),
                                           attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out[qo[b]:qo[b + 1]] = o.transpose(0, 1)
    return out


@torch.library.custom_op("kernelstack::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
                    window_left: int) -> torch.Tensor:
    ctx = get_forward_context()
    if ctx.attention is not None:
        return ctx.attention.run(q, k, v, layer, scale, window_left, ctx.meta)
    return paged_attention_reference(q, k, v, layer, scale, window_left, ctx.pool, ctx.meta)


@paged_attention.register_fake
def _(q, k, v, layer, scale, window_left):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _refuse_gradient(ctx, inputs, output):
    raise RuntimeError(
        "kernelstack::paged_attention is inference-only: it attends over K/V cached in kernelstack's pool "
        "by earlier steps, which are not inputs of the op, so it has no gradient. Its q/k/v require grad here: "
        "run it under torch.inference_mode() or torch.no_grad() (ksbackend's generate does), or, to train, "
        "use torch.compile(model, backend=\"kernelstack\"), whose kernelstack::attention is differentiable.")


def _unreachable_backward(ctx, grad):
    raise AssertionError("unreachable: _refuse_gradient raised in the forward")


# setup_context runs exactly when autograd would record the op (grad mode on, an input requiring grad),
# so the error comes at the call, not at a later backward.
paged_attention.register_autograd(_unreachable_backward, setup_context=_refuse_gradient)


@torch.library.custom_op("kernelstack::rope_paged_attention", mutates_args=())
def rope_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         layer: int, scale: float, window_left: int) -> torch.Tensor:
    """q [1, Hq, N, D] and k [1, Hkv, N, D] before RoPE (the projections' views), v [N, Hkv, D], cos/sin
    broadcastable to [1, 1, N, D] in q's dtype or fp32: the table is rounded to q's dtype first, as HF's
    ``cos.to(x.dtype)`` does, so the pass can hand over the fp32 table once instead of a cast copy per layer.
    Reference: ``rope`` then ``paged_attention``; the result has q's dtype."""
    q_rot, k_rot = rope_op(q, k, cos.to(q.dtype), sin.to(q.dtype))
    return paged_attention(q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), v, layer, scale, window_left)


@rope_paged_attention.register_fake
def _(q, k, v, cos, sin, layer, scale, window_left):
    return q.new_empty((q.shape[2], q.shape[1], v.shape[-1]))
