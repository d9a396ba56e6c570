"""Paged decode attention in one launch, split-KV merged in the kernel: the ``triton`` decode kernel.

At batch 1 and a short context a decode attention is a few microseconds of reading (Llama-3.2-1B, 200 tokens:
0.4 MB per layer), yet FlashInfer's kernels take ~16 us on an H100: a planned split-KV pass plus a merge launch,
or XQA's fixed machinery. This kernel is built for that latency:
- one program per (sequence, KV head, split) serves the head's whole GQA group with one tensor-core product,
  so K and V are read once per group;
- a sequence is split only when it is long (``MIN_CHUNK`` tokens per split at least), so a short context is one
  program per head that writes its output directly;
- when it is split, the last split to finish merges the partial results (an atomic counter per (sequence, head),
  reset by the merger for the next replay) instead of a second launch;
- it reads the dense page table and lengths on the device: no host plan, so a captured step advances by itself.
fp8 (e4m3) K/V are widened to q's dtype, exactly, and the per-layer scales fold into the softmax scale and the
output.
"""

import math

import torch
import triton
import triton.language as tl

from . import pdl

MIN_CHUNK = 256  # tokens per split at least: below this a split's partial write + merge costs more than it saves
MAX_SPLITS = 16


@triton.jit
def decode_attention_kernel(q_ptr, cache_ptr, table_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr, count_ptr,
                            s_qb, s_qh, s_ob, s_oh, s_page, s_kv, s_tok, s_head, s_tb,
                            qk_scale, v_scale, window_left, page_size, num_q_heads, num_kv_heads,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                            SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, FP32_DOT: tl.constexpr,
                            PDL: tl.constexpr):
    if PDL:  # q, the lengths and the cache all come from this step's earlier kernels and copies
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    start = 0
    if window_left >= 0:
        start = tl.maximum(length - 1 - window_left, 0)
    span = length - start
    chunk = tl.maximum(tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N, MIN_CHUNK)
    active = tl.maximum(tl.cdiv(span, chunk), 1)
    if split < active:
        group = tl.arange(0, GROUP_PAD)
        heads = kh * GROUP + group
        hmask = group < GROUP
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + dims[None, :], mask=hmask[:, None], other=0.0)
        if FP32_DOT:  # the CPU interpreter's bf16 tl.dot multiplies raw bits: products in fp32 there
            q = q.to(tl.float32)
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        row_sum = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, D), tl.float32)
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, length)
        for n0 in range(lo, hi, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            tmask = toks < hi
            page = tl.load(table_ptr + b.to(tl.int64) * s_tb + toks // page_size, mask=tmask, other=0)
            row = cache_ptr + page.to(tl.int64) * s_page + (toks % page_size) * s_tok + kh * s_head
            k = tl.load(row[:, None] + dims[None, :], mask=tmask[:, None], other=0.0).to(q.dtype)
            v = tl.load(row[:, None] + s_kv + dims[None, :], mask=tmask[:, None], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units: exp2 below
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            row_sum = row_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
            m = m_new
        out = out_ptr + b * s_ob + heads[:, None] * s_oh + dims[None, :]
        if active == 1:
            tl.store(out, (v_scale * acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=hmask[:, None])
        else:
            part = (b * num_q_heads + heads) * SPLITS + split
            tl.store(part_ml_ptr + part * 2, m, mask=hmask)
            tl.store(part_ml_ptr + part * 2 + 1, row_sum, mask=hmask)
            tl.store(part_acc_ptr + part[:, None] * D + dims[None, :], acc, mask=hmask[:, None])
            tl.debug_barrier()  # every thread's partial stored before the release below
            done = tl.atomic_add(count_ptr + b * num_kv_heads + kh, 1, sem="acq_rel")
            if done == active - 1:  # the last split of this (sequence, head): merge all of them
                splits = tl.arange(0, SPLITS)
                smask = hmask[:, None] & (splits[None, :] < active)
                parts = (b * num_q_heads + heads)[:, None] * SPLITS + splits[None, :]
                ms = tl.load(part_ml_ptr + parts * 2, mask=smask, other=-1e30, cache_modifier=".cg")
                ls = tl.load(part_ml_ptr + parts * 2 + 1, mask=smask, other=0.0, cache_modifier=".cg")
                accs = tl.load(part_acc_ptr + parts[:, :, None] * D + dims[None, None, :], mask=smask[:, :, None],
                               other=0.0, cache_modifier=".cg")
                top = tl.max(ms, 1)
                w = tl.where(smask, tl.exp2(ms - top[:, None]), 0.0)
                total = tl.sum(w * ls, 1)
                merged = tl.sum(w[:, :, None] * accs, 1) / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(out, (v_scale * merged).to(out_ptr.dtype.element_ty), mask=hmask[:, None])
                tl.atomic_xchg(count_ptr + b * num_kv_heads + kh, 0)  # ready for the next replay


class TritonDecodeWorkspace:
    """Split partials and per-(sequence, head) counters, sized for the largest batch; shared by every bucket's
    graph (replays run one at a time on one stream). The counters start at zero and each merge resets its own."""

    def __init__(self, max_batch, num_q_heads, num_kv_heads, head_dim, device):
        self.part_acc = torch.empty(max_batch * num_q_heads * MAX_SPLITS * head_dim, dtype=torch.float32,
                                    device=device)
        self.part_ml = torch.empty(max_batch * num_q_heads * MAX_SPLITS * 2, dtype=torch.float32, device=device)
        self.counts = torch.zeros(max_batch * num_kv_heads, dtype=torch.int32, device=device)
        self.max_batch = max_batch


def splits_for(batch, num_kv_heads, sm_count):
    """Enough programs to cover the SMs twice over when the context is long; a power of 2 (a block size)."""
    wanted = -(-2 * sm_count // (batch * num_kv_heads))
    return min(MAX_SPLITS, triton.next_power_of_2(max(1, wanted)))


def token_block(head_dim):
    """Tokens per loop step: a [block, head_dim] K tile of 8192 elements (64 tokens at head_dim 128). Each step is a
    chain of dependent loads (page ids, then K and V), so at a short context the step count is the latency: a
    64-wide head (SmolLM's 135M shape) takes 128 tokens a step, one step at a 128-token context, not two."""
    return max(16, min(128, 8192 // triton.next_power_of_2(head_dim)))


def decode_attention_triton(q, cache, page_table, kv_lens, sm_scale, window_left, workspace, k_scale=1.0,
                            v_scale=1.0, splits=None, min_chunk=MIN_CHUNK, block_n=None):
    """q [B, Hq, D]; cache one layer's [pages, 2, page_size, Hk, D]; page_table [>= B, W] int32; kv_lens [B] int32
    (tokens in the cache, this step's included). Returns [B, Hq, D] in q's dtype. ``min_chunk`` (a multiple of
    the token block) and ``block_n`` are for tests that must reach the split path with short contexts."""
    batch, hq, d = q.shape
    hk = cache.shape[3]
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton decode kernel takes bf16 or fp16 q, not {q.dtype}")
    if batch > workspace.max_batch:
        raise ValueError(f"decode batch {batch} exceeds the Triton decode workspace ({workspace.max_batch})")
    if q.stride(2) != 1 or cache.stride(4) != 1:
        raise ValueError("decode attention needs unit-stride head dims in q and the cache")
    group = hq // hk
    if splits is None:
        splits = splits_for(batch, hk, torch.cuda.get_device_properties(q.device).multi_processor_count
                            if q.is_cuda else 1)
    out = torch.empty(batch, hq, d, dtype=q.dtype, device=q.device)
    decode_attention_kernel[(batch, hk, splits)](
        q, cache, page_table, kv_lens, out, workspace.part_acc, workspace.part_ml, workspace.counts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), cache.stride(0), cache.stride(1), cache.stride(2),
        cache.stride(3), page_table.stride(0), sm_scale * k_scale * math.log2(math.e), float(v_scale), window_left,
        cache.shape[2], hq, hk, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d,
        BLOCK_N=block_n or token_block(d), SPLITS=splits, MIN_CHUNK=min_chunk, FP32_DOT=not q.is_cuda,
        num_warps=4, **pdl.launch_options(q.device))
    return out
