"""``kernelstack::paged_attention``: append this step's K/V to the paged pool, then attend over each
sequence's cached tokens, ragged (no padding anywhere).

Inputs are the flattened token stream of the step: q [N, Hq, D], k/v [N, Hkv, D]. Which tokens belong
to which sequence, their positions and pages come from the forward context, not from the graph, so
one compiled graph serves every batch composition. ``window_left`` >= 0 limits each query to that many
earlier tokens (sliding-window attention, HF's ``sliding_window - 1``); -1 is full causal attention.
"""

import torch
import torch.nn.functional as F

from ..runtime.context import get_forward_context


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter this step's K/V into their slots of one layer's [pages, 2, page_size, H, D] cache."""
    page_size = cache.shape[2]
    pages, offsets = slots // page_size, slots % page_size
    cache[pages, 0, offsets] = k.to(cache.dtype)
    cache[pages, 1, offsets] = v.to(cache.dtype)


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, length: int):
    """One sequence's K and V, [length, H, D] each, read from its pages in order."""
    k = cache[pages.long(), 0].flatten(0, 1)[:length]
    v = cache[pages.long(), 1].flatten(0, 1)[:length]
    return k, v


def paged_attention_reference(q, k, v, layer, scale, window_left, pool, meta):
    cache = pool.caches[layer]
    write_kv(cache, k, v, meta.slots.to(cache.device))
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    qo, kv_ptr = meta.qo_indptr.tolist(), meta.kv_indptr.tolist()
    for b, kv_len in enumerate(meta.kv_lens.tolist()):
        q_b = q[qo[b]:qo[b + 1]]
        k_b, v_b = gather_kv(cache, meta.kv_indices[kv_ptr[b]:kv_ptr[b + 1]], kv_len)
        q_pos = torch.arange(kv_len - q_b.shape[0], kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if window_left >= 0:
            allowed &= k_pos >= q_pos - window_left
        o = F.scaled_dot_product_attention(
            q_b.transpose(0, 1), k_b.to(q.dtype).transpose(0, 1), v_b.to(q.dtype).transpose(0, 1),
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
