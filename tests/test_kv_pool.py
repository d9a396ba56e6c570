"""Page allocator, CSR metadata and the paged attention reference, against dense references."""

import pytest
import torch
import torch.nn.functional as F

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from ksbackend.ops.paged_attention import paged_attention_reference
from ksbackend.runtime.kv_pool import KVPool
from ksbackend.runtime.kv_pool import KVPoolExhausted
from ksbackend.runtime.kv_pool import PageAllocator
from ksbackend.runtime.metadata import build_batch_metadata


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60))
def test_allocator_never_hands_out_a_page_twice(ops):
    allocator, held = PageAllocator(32), []
    for do_alloc, n in ops:
        if do_alloc:
            try:
                pages = allocator.alloc(n)
            except KVPoolExhausted:
                assert n > allocator.num_free
                continue
            assert not set(pages) & {p for chunk in held for p in chunk}
            held.append(pages)
        elif held:
            allocator.free(held.pop(n % len(held)))
        assert allocator.num_free + allocator.num_used == 32
        assert allocator.num_used == sum(map(len, held))
    for chunk in held:
        allocator.free(chunk)
    assert allocator.num_free == 32 and sorted(allocator.alloc(32)) == list(range(32))


def test_double_free_is_refused():
    allocator = PageAllocator(4)
    pages = allocator.alloc(2)
    allocator.free(pages)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(pages[:1])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda b: st.tuples(st.lists(st.integers(1, 40), min_size=b, max_size=b),
                                                     st.lists(st.integers(1, 6), min_size=b, max_size=b))),
       st.sampled_from([1, 4, 16]))
def test_metadata_agrees_with_dense_reference(batch, page_size):
    prompts, steps = batch
    pool = KVPool(1, 1, 2, 256, page_size, torch.float32, "cpu")
    pool.extend(list(range(len(prompts))), prompts)  # prefill
    meta = pool.extend(list(range(len(prompts))), steps)  # then a multi-token step (like paged prefill)
    qo, kv_ptr = meta.qo_indptr.tolist(), meta.kv_indptr.tolist()
    for b, (prompt, new) in enumerate(zip(prompts, steps)):
        length = prompt + new
        seq = pool.sequences[b]
        assert seq.length == length == meta.kv_lens[b]
        pages = meta.kv_indices[kv_ptr[b]:kv_ptr[b + 1]].tolist()
        assert pages == seq.pages[: -(-length // page_size)]
        assert meta.kv_last_page_len[b] == length - (len(pages) - 1) * page_size
        assert qo[b + 1] - qo[b] == new
        dense_slots = [pages[p // page_size] * page_size + p % page_size for p in range(length)]
        assert meta.slots[qo[b]:qo[b + 1]].tolist() == dense_slots[prompt:]
        assert meta.positions[qo[b]:qo[b + 1]].tolist() == list(range(prompt, length))
    assert len(set(meta.slots.tolist())) == meta.num_tokens


def test_extend_is_all_or_nothing():
    pool = KVPool(1, 1, 2, 4, 4, torch.float32, "cpu")
    pool.extend([0], [9])  # 3 pages
    with pytest.raises(KVPoolExhausted, match="1 of 4 are free"):
        pool.extend([0, 1], [1, 5])  # needs 0 + 2
    assert pool.sequences[0].length == 9 and 1 not in pool.sequences and pool.allocator.num_free == 1


@pytest.mark.parametrize("window_left", [-1, 5])
def test_paged_attention_reference_matches_dense_causal_attention(window_left):
    torch.manual_seed(0)
    hq, hkv, d, prompts = 4, 2, 8, [7, 1, 13]
    pool = KVPool(1, hkv, d, 64, 4, torch.float32, "cpu")
    ks_all = [torch.randn(n + 3, hkv, d) for n in prompts]
    vs_all = [torch.randn(n + 3, hkv, d) for n in prompts]
    qs_all = [torch.randn(n + 3, hq, d) for n in prompts]
    outs = [[] for _ in prompts]
    # prefill, then three single-token decode steps
    for start, new in [(0, prompts)] + [(None, [1, 1, 1])] * 3:
        lo = [pool.sequences[b].length if b in pool.sequences else 0 for b in range(3)]
        meta = pool.extend([0, 1, 2], new)
        pick = lambda xs: torch.cat([x[lo[b]:lo[b] + new[b]] for b, x in enumerate(xs)])
        out = paged_attention_reference(pick(qs_all), pick(ks_all), pick(vs_all), 0, 0.3, window_left, pool, meta)
        for b, chunk in enumerate(out.split(new)):
            outs[b].append(chunk)
    for b, n in enumerate(prompts):
        length = n + 3
        q, k, v = qs_all[b].transpose(0, 1), ks_all[b].transpose(0, 1), vs_all[b].transpose(0, 1)
        pos = torch.arange(length)
        allowed = pos[None, :] <= pos[:, None]
        if window_left >= 0:
            allowed &= pos[None, :] >= pos[:, None] - window_left
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(torch.cat(outs[b]), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_left", [-1, 3])
def test_decode_reference_reads_the_page_table_like_the_prefill_reference(window_left):
    """The device-side decode path (dense page table, lengths) attends exactly like the CSR path."""
    torch.manual_seed(0)
    pool = KVPool(1, 2, 8, 64, 4, torch.float32, "cpu")
    pool.extend([0, 1, 2], [7, 1, 13])
    pool.extend([0, 1, 2], [1, 1, 1])
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    meta, _, _ = pool.decode_metadata([0, 1, 2])
    decode = paged_attention_reference(q, k, v, 0, 0.3, window_left, pool, meta)
    csr = build_batch_metadata([pool.sequences[s].pages for s in range(3)], [s.length for s in pool.sequences.values()],
                               [1, 1, 1], 4)
    torch.testing.assert_close(decode, paged_attention_reference(q, k, v, 0, 0.3, window_left, pool, csr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_paged_attention_is_rope_then_paged_attention(dtype):
    """Given the fp32 table, the fused op rounds it to q's dtype first, as HF's cos.to(x.dtype) before rope."""
    from ksbackend.runtime.context import ForwardContext
    from ksbackend.runtime.context import forward_context

    pools = [KVPool(1, 2, 8, 64, 4, dtype, "cpu") for _ in range(2)]
    q, k = torch.randn(1, 4, 5, 8, dtype=dtype), torch.randn(1, 2, 5, 8, dtype=dtype)
    v = torch.randn(5, 2, 8, dtype=dtype)
    angle = torch.rand(1, 1, 5, 8) * 6.3
    outs = []
    for pool, fused in zip(pools, (False, True)):
        meta = pool.extend([0, 1], [2, 3])
        with forward_context(ForwardContext(pool, meta)):
            if fused:
                outs.append(torch.ops.kernelstack.rope_paged_attention(q, k, v, angle.cos(), angle.sin(), 0, 0.3, -1))
            else:
                q_rot, k_rot = torch.ops.kernelstack.rope(q, k, angle.cos().to(dtype), angle.sin().to(dtype))
                outs.append(torch.ops.kernelstack.paged_attention(q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1),
                                                                  v, 0, 0.3, -1))
    assert outs[1].dtype == dtype
    assert torch.equal(outs[0], outs[1]) and torch.equal(pools[0].caches[0], pools[1].caches[0])
