"""The rotary embedding's cos/sin table in one launch: the CUDA implementation of ``kernelstack::rope_cos_sin``.

As torch ops the table is seven kernels in every decode step (the position cast, ``pos * inv_freq``, the ``cat``
of the two halves, ``cos``, ``sin`` and the two scalings), each a few microseconds of a step that is about one
millisecond at Llama-3.2-1B batch 1. One program per block of tokens computes both halves of cos and sin at once.
The products are the reference's: the fp32 angle ``float(pos) * float(inv_freq)``, libdevice's ``cos``/``sin`` (the
accurate ones torch's CUDA kernels call too, with full range reduction for long contexts), times the scaling.
"""

import torch
import triton
import triton.language as tl

from . import pdl
from .generator import next_power_of_2


@triton.jit
def rope_cos_sin_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, n_tokens, scaling, HALF: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched while the step's metadata kernel finishes; positions are read after the wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    freqs = tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + tokens, mask=tokens < n_tokens, other=0).to(tl.float32)
    inv = tl.load(inv_ptr + freqs, mask=freqs < HALF, other=0.0).to(tl.float32)
    angle = pos[:, None] * inv[None, :]
    cos = tl.cos(angle) * scaling
    sin = tl.sin(angle) * scaling
    mask = (tokens[:, None] < n_tokens) & (freqs[None, :] < HALF)
    offs = tokens.to(tl.int64)[:, None] * (2 * HALF) + freqs[None, :]
    for half in tl.static_range(2):  # emb = cat(freqs, freqs): both halves hold the same values
        tl.store(cos_ptr + offs + half * HALF, cos, mask=mask)
        tl.store(sin_ptr + offs + half * HALF, sin, mask=mask)


def rope_cos_sin_triton(position_ids, inv_freq, scaling):
    """position_ids [...] (any int or float dtype), inv_freq [D/2] -> fp32 (cos, sin) [..., D], contiguous."""
    half = inv_freq.shape[0]
    shape = (*position_ids.shape, 2 * half)
    cos = torch.empty(shape, dtype=torch.float32, device=position_ids.device)
    sin = torch.empty_like(cos)
    n_tokens = position_ids.numel()
    if n_tokens == 0:
        return cos, sin
    block_h = next_power_of_2(half)
    block_t = max(1, min(64, 2048 // block_h, next_power_of_2(n_tokens)))  # ~2K angles a program
    rope_cos_sin_kernel[(triton.cdiv(n_tokens, block_t),)](
        position_ids.contiguous().view(-1), inv_freq.contiguous(), cos, sin, n_tokens, float(scaling), HALF=half,
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4, **pdl.launch_options(position_ids.device))
    return cos, sin
