"""RoPE on q and k with k and v appended to the paged KV cache, in one launch: the write half of
``kernelstack::rope_paged_attention`` on CUDA.

Unfused, a decode layer spends three launches here (the rotation, then one scatter each for K and V);
this kernel reads q, k, v once and writes rotated q and k (for the attention kernel) and K/V straight
into their cache slots, quantised to e4m3 with the pool's fixed per-layer scales when the pool is fp8.
One program per token; the rotation's rounding is RoPE's own (``rope.rotate_halves``).
"""

import torch
import triton
import triton.language as tl

from . import pdl
from .generator import next_power_of_2
from .rope import rotate_halves


@triton.jit
def _cache_store(ptr, x, scale, mask, FP8: tl.constexpr):
    if FP8:  # divided, not multiplied by the inverse: bit for bit what KVPool.write stores (448: e4m3's max)
        x = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_append_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, cache_ptr, slots_ptr,
                       sqh, sqt, skh, skt, svt, svh, sct, page_size, s_page, s_kv, s_tok,
                       k_scale, v_scale, n_q_heads, n_k_heads,
                       HALF: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
                       FP8: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # everything it reads comes from this step's earlier kernels: nothing to read before the wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < HALF
    # the table rounded to q's dtype, as HF's cos.to(x.dtype) rounds it (a no-op when it comes in that dtype)
    dt = q_ptr.dtype.element_ty
    cos1 = tl.load(cos_ptr + t * sct + dims, mask=dmask, other=0.0).to(dt).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * sct + HALF + dims, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * sct + dims, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * sct + HALF + dims, mask=dmask, other=0.0).to(dt).to(tl.float32)

    qh = tl.arange(0, Q_HEADS)[:, None]
    qmask = (qh < n_q_heads) & dmask
    q_base = q_ptr + t * sqt + qh * sqh
    q1, q2 = rotate_halves(tl.load(q_base + dims, mask=qmask, other=0.0),
                           tl.load(q_base + HALF + dims, mask=qmask, other=0.0), cos1, sin1, cos2, sin2)
    qo = qo_ptr + (t * n_q_heads + qh) * (2 * HALF)
    tl.store(qo + dims, q1.to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(qo + HALF + dims, q2.to(qo_ptr.dtype.element_ty), mask=qmask)

    kh = tl.arange(0, K_HEADS)[:, None]
    kmask = (kh < n_k_heads) & dmask
    k_base = k_ptr + t * skt + kh * skh
    k1, k2 = rotate_halves(tl.load(k_base + dims, mask=kmask, other=0.0),
                           tl.load(k_base + HALF + dims, mask=kmask, other=0.0), cos1, sin1, cos2, sin2)
    k1, k2 = k1.to(ko_ptr.dtype.element_ty), k2.to(ko_ptr.dtype.element_ty)  # the rounding eager's k_embed has
    ko = ko_ptr + (t * n_k_heads + kh) * (2 * HALF)
    tl.store(ko + dims, k1, mask=kmask)
    tl.store(ko + HALF + dims, k2, mask=kmask)

    slot = tl.load(slots_ptr + t)
    row = cache_ptr + (slot // page_size) * s_page + (slot % page_size) * s_tok + kh * (2 * HALF)
    _cache_store(row + dims, k1.to(tl.float32), k_scale, kmask, FP8)
    _cache_store(row + HALF + dims, k2.to(tl.float32), k_scale, kmask, FP8)
    v_base = v_ptr + t * svt + kh * svh
    v1 = tl.load(v_base + dims, mask=kmask, other=0.0).to(tl.float32)
    v2 = tl.load(v_base + HALF + dims, mask=kmask, other=0.0).to(tl.float32)
    _cache_store(row + s_kv + dims, v1, v_scale, kmask, FP8)
    _cache_store(row + s_kv + HALF + dims, v2, v_scale, kmask, FP8)


def rope_append_triton(q, k, v, cos, sin, cache, slots, k_scale=1.0, v_scale=1.0):
    """q [1, Hq, N, D], k [1, Hk, N, D] (any strides, as the projections leave them); v [N, Hk, D];
    cos/sin broadcastable to [1, 1, N, D], in q's dtype or fp32 (then rounded to q's dtype in the kernel); cache one
    layer's [pages, 2, page_size, Hk, D]; slots [N]. Writes K/V into ``cache`` and returns rotated
    (q [N, Hq, D], k [N, Hk, D]) in q's dtype."""
    _, hq, n, d = q.shape
    hk = k.shape[1]
    if cache.stride(3) != d or cache.stride(4) != 1:
        raise ValueError("rope_append writes a cache laid out [pages, 2, page_size, heads, head_dim], contiguous rows")
    q_out = torch.empty(n, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(n, hk, d, dtype=q.dtype, device=q.device)
    cos, sin = cos.expand(1, 1, n, d), sin.expand(1, 1, n, d)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    half = d // 2
    rope_append_kernel[(n,)](
        q, k, v, cos, sin, q_out, k_out, cache, slots,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(0), v.stride(1), cos.stride(2),
        cache.shape[2], cache.stride(0), cache.stride(1), cache.stride(2), float(k_scale), float(v_scale), hq, hk,
        HALF=half, Q_HEADS=next_power_of_2(hq), K_HEADS=next_power_of_2(hk), BLOCK_D=next_power_of_2(half),
        FP8=cache.dtype == torch.float8_e4m3fn, num_warps=4 if hq * d <= 4096 else 8, **pdl.launch_options(q.device))
    return q_out, k_out


def rope_paged_attention_triton(q, k, v, cos, sin, layer, scale, window_left):
    """``kernelstack::rope_paged_attention`` on CUDA: this kernel rotates and appends, the step's attention
    kernel attends. Without a device attention backend, the reference composition."""
    from ..runtime.context import get_forward_context

    ctx = get_forward_context()
    if ctx.attention is None:
        q_rot, k_rot = torch.ops.kernelstack.rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
        return torch.ops.kernelstack.paged_attention(q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), v, layer,
                                                     scale, window_left)
    ctx.attention.attention.check(layer, scale, window_left)
    pool = ctx.pool
    q_rot, k_rot = rope_append_triton(q, k, v, cos, sin, pool.caches[layer], ctx.meta.slots, pool.k_scales[layer],
                                      pool.v_scales[layer])
    return ctx.attention.attend(q_rot, k_rot, v, layer, ctx.meta)
