"""Rotary embedding of q and k in one launch: the CUDA implementation of ``kernelstack::rope``.

One program per token; it loads the token's cos/sin row once and rotates every q head and every k
head with it, reading q/k through their strides (they are transposed views of the projection) and
writing the token-major layout the op contract fixes. Products are rounded to the activation dtype
before the sum, as ``q * cos + rotate_half(q) * sin`` rounds them in eager.
"""

import torch
import triton
import triton.language as tl

from ..ops.rope import token_major_like
from .generator import next_power_of_2


@triton.jit
def rotate_halves(x1, x2, cos1, sin1, cos2, sin2):
    """(x1*cos1 - x2*sin1, x2*cos2 + x1*sin2) in fp32, each product rounded to x's dtype first, as
    ``q * cos + rotate_half(q) * sin`` rounds them in eager."""
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (x1f * cos1).to(dt).to(tl.float32) - (x2f * sin1).to(dt).to(tl.float32)
    out2 = (x2f * cos2).to(dt).to(tl.float32) + (x1f * sin2).to(dt).to(tl.float32)
    return out1, out2


@triton.jit
def _rotate(x_ptr, o_ptr, cos1, sin1, cos2, sin2, b, t, sxb, sxh, sxt, sob, soh, sot, n_heads,
            HALF: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, HEADS)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    base = x_ptr + b * sxb + t * sxt + heads * sxh
    x1 = tl.load(base + dims, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + dims, mask=mask, other=0.0)
    out1, out2 = rotate_halves(x1, x2, cos1, sin1, cos2, sin2)
    obase = o_ptr + b * sob + t * sot + heads * soh
    tl.store(obase + dims, out1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + HALF + dims, out2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seq_len,
                sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot, scb, sct,
                n_q_heads, n_k_heads, HALF: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr,
                BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    b = token // seq_len
    t = token % seq_len
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < HALF
    crow = cos_ptr + b * scb + t * sct
    srow = sin_ptr + b * scb + t * sct
    # cos/sin are cast to the activation dtype by HF before the products; load them as such
    cos1 = tl.load(crow + dims, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(crow + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(srow + dims, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(srow + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    _rotate(q_ptr, qo_ptr, cos1, sin1, cos2, sin2, b, t, sqb, sqh, sqt, sqob, sqoh, sqot, n_q_heads, HALF, Q_HEADS, BLOCK_D)
    _rotate(k_ptr, ko_ptr, cos1, sin1, cos2, sin2, b, t, skb, skh, skt, skob, skoh, skot, n_k_heads, HALF, K_HEADS, BLOCK_D)


def rope_triton(q, k, cos, sin):
    """q [B, Hq, T, D], k [B, Hk, T, D] (any strides); cos/sin broadcastable as [B or 1, 1, T, D]."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    q_out = token_major_like(q, torch.promote_types(q.dtype, cos.dtype))
    k_out = token_major_like(k, torch.promote_types(k.dtype, cos.dtype))
    cos = cos.expand(b, 1, t, d)
    sin = sin.expand(b, 1, t, d)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    half = d // 2
    rope_kernel[(b * t,)](
        q, k, q_out, k_out, cos, sin, t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(2), hq, hk,
        HALF=half, Q_HEADS=next_power_of_2(hq), K_HEADS=next_power_of_2(hk), BLOCK_D=next_power_of_2(half),
        num_warps=4 if hq * d <= 4096 else 8)
    return q_out, k_out
