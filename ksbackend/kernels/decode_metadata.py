"""A decode step's positions, KV slots and lengths in one launch (``runtime.metadata.decode_step_metadata`` on CUDA).

Each step derives them from the lengths the step before advanced: position = length, slot = the page holding it
times the page size plus the offset in it, KV length = length + 1. As torch ops that is about eight small kernels at
the head of every captured step (a copy, a floor division, a gather, a multiply, a remainder, two adds, a copy),
each a launch and a gap in a step of about a millisecond at batch 1; here one program per 128 rows computes all
three in int64, exactly as the torch ops do.
"""

import triton
import triton.language as tl


@triton.jit
def decode_metadata_kernel(lens_ptr, table_ptr, positions_ptr, slots_ptr, kv_lens_ptr, n_rows, table_stride, width,
                           PAGE: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    pos = tl.load(lens_ptr + rows, mask=live, other=0).to(tl.int64)
    # the pool reserves every page a step writes; torch's gather would raise here (checked with TRITON_DEBUG=1)
    tl.device_assert(pos // PAGE < width, "a decode position past its page-table row")
    page = tl.load(table_ptr + rows.to(tl.int64) * table_stride + pos // PAGE, mask=live, other=0).to(tl.int64)
    tl.store(positions_ptr + rows, pos, mask=live)
    tl.store(slots_ptr + rows, page * PAGE + pos % PAGE, mask=live)
    tl.store(kv_lens_ptr + rows, pos + 1, mask=live)


def decode_metadata_triton(lens, table, page_size, positions, slots, kv_lens):
    """Writes positions, slots and kv_lens ([n] each) from lens [n] and the page table [n, width] (row stride any)."""
    n = lens.shape[0]
    block = 128
    decode_metadata_kernel[(triton.cdiv(n, block),)](lens, table, positions, slots, kv_lens, n, table.stride(0),
                                                     table.shape[1], PAGE=page_size, BLOCK=block, num_warps=4)
