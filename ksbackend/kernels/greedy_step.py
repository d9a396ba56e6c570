"""The end of a greedy decode step in two launches: the CUDA path of ``runtime.model_runner.greedy_step``.

Picking the token and advancing the buffers took eight small torch kernels at the end of every captured step (the
two-stage argmax: chunk maxima, the best chunk, a gather, a multiply and an add; then the token copied into the next
input and the lengths advanced). Launch 1 spreads the row over the GPU: one program per (2048-token chunk, row)
finds the chunk's first maximum. Launch 2, one program per row, takes the first chunk holding the row's maximum
(so the first maximum of the row, as ``argmax``), writes the token as the next input and advances the length.
NaN counts as the maximum, as in ``argmax``: the first NaN of a row wins (a broken row still yields a token in the
vocabulary, never a padding lane's index).
"""

import torch
import triton
import triton.language as tl

from . import pdl

CHUNK = 2048


@triton.jit
def first_max(x):
    """(max, index of its first occurrence) of a block, NaN counting as the maximum as in ``argmax``. Triton's max
    keeps either side of a NaN comparison, so NaNs are set aside for the max and found by their own argmax."""
    nan = (x != x).to(tl.int32)
    best, arg = tl.max(tl.where(nan != 0, float("-inf"), x), axis=0, return_indices=True,
                       return_indices_tie_break_left=True)
    has_nan = tl.max(nan, axis=0) > 0
    return (tl.where(has_nan, float("nan"), best),
            tl.where(has_nan, tl.argmax(nan, axis=0, tie_break_left=True), arg))


@triton.jit
def chunk_argmax_kernel(logits_ptr, stride, best_ptr, best_idx_ptr, n_chunks, vocab, CHUNK: tl.constexpr,
                        PDL: tl.constexpr):
    if PDL:  # launched while the lm_head GEMV finishes; the logits are read after the wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    best, arg = first_max(x)  # a chunk holding a NaN stores NaN as its best, for launch 2 to see
    tl.store(best_ptr + row * n_chunks + chunk, best)
    tl.store(best_idx_ptr + row * n_chunks + chunk, chunk * CHUNK + arg)


@triton.jit
def pick_and_advance_kernel(best_ptr, best_idx_ptr, n_chunks, ids_ptr, lens_ptr, kv_lens_ptr, active_ptr,
                            CHUNKS: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched while launch 1 finishes
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS)
    best = tl.load(best_ptr + row * n_chunks + chunks, mask=chunks < n_chunks, other=float("-inf"))
    _, first = first_max(best)
    tl.store(ids_ptr + row, tl.load(best_idx_ptr + row * n_chunks + first).to(tl.int64))
    tl.store(lens_ptr + row, tl.load(kv_lens_ptr + row) * tl.load(active_ptr + row))


def greedy_step_triton(logits, ids, lens, kv_lens, active):
    """ids[r] = argmax(logits[r]); lens[r] = kv_lens[r] * active[r], for the rows of logits [n, V]."""
    n, vocab = logits.shape
    n_chunks = triton.cdiv(vocab, CHUNK)
    best = torch.empty(n, n_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(n, n_chunks, dtype=torch.int32, device=logits.device)
    launch = pdl.launch_options(logits.device)
    chunk_argmax_kernel[(n_chunks, n)](logits, logits.stride(0), best, best_idx, n_chunks, vocab, CHUNK=CHUNK,
                                       num_warps=4, **launch)
    pick_and_advance_kernel[(n,)](best, best_idx, n_chunks, ids, lens, kv_lens, active,
                                  CHUNKS=triton.next_power_of_2(n_chunks), num_warps=4, **launch)
