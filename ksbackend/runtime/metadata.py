"""Per-step batch metadata: what the attention op needs to know about the sequences of one step.

``BatchMetadata`` (prefill, any number of new tokens per sequence) is the CSR form FlashInfer's
prefill plans take, built on the host. ``DecodeMetadata`` (one new token per sequence) lives on the
device: a dense page table and lengths that a captured decode graph advances by itself.

For a prefill step over sequences b = 0..B-1, each appending ``new_tokens[b]`` tokens to a cache that then
holds ``kv_lens[b]`` tokens in pages ``page_tables[b]``:
- ``qo_indptr[b]:qo_indptr[b+1]`` are b's query (new) tokens in the flattened token stream;
- ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` are b's pages, in order;
- ``kv_last_page_len[b]`` is how many slots of b's last page are filled (1..page_size);
- ``positions[t]`` is token t's position in its sequence, ``slots[t]`` its flat slot in the pool
  (page * page_size + offset), where its K/V are written.
"""

from dataclasses import dataclass

import torch


@dataclass
class BatchMetadata:
    qo_indptr: torch.Tensor  # [B + 1] int32
    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_indices: torch.Tensor  # [total pages] int32
    kv_last_page_len: torch.Tensor  # [B] int32
    kv_lens: torch.Tensor  # [B] int32
    positions: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64
    batch_indices: torch.Tensor  # [N] int32: which sequence each token belongs to
    page_size: int
    max_q_len: int
    max_kv_len: int

    @property
    def num_seqs(self) -> int:
        return self.kv_lens.numel()

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    def to(self, device) -> "BatchMetadata":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in vars(self).items()}
        return BatchMetadata(**moved)


def build_batch_metadata(page_tables, kv_lens, new_tokens, page_size) -> BatchMetadata:
    """Build the CSR metadata on the host (plain Python ints in, int tensors out)."""
    if not (len(page_tables) == len(kv_lens) == len(new_tokens)):
        raise ValueError("page_tables, kv_lens and new_tokens must have one entry per sequence")
    qo_indptr, kv_indptr, indices, last_len = [0], [0], [], []
    positions, slots, batch_indices = [], [], []
    for b, (pages, length, new) in enumerate(zip(page_tables, kv_lens, new_tokens)):
        needed = -(-length // page_size)
        if new < 1 or new > length or len(pages) < needed:
            raise ValueError(f"sequence {b}: {new} new of {length} tokens does not fit {len(pages)} pages of "
                             f"{page_size}")
        pages = list(pages[:needed])
        indices += pages
        qo_indptr.append(qo_indptr[-1] + new)
        kv_indptr.append(kv_indptr[-1] + needed)
        last_len.append(length - (needed - 1) * page_size)
        for pos in range(length - new, length):
            positions.append(pos)
            slots.append(pages[pos // page_size] * page_size + pos % page_size)
            batch_indices.append(b)
    i32 = dict(dtype=torch.int32)
    return BatchMetadata(
        qo_indptr=torch.tensor(qo_indptr, **i32), kv_indptr=torch.tensor(kv_indptr, **i32),
        kv_indices=torch.tensor(indices, **i32), kv_last_page_len=torch.tensor(last_len, **i32),
        kv_lens=torch.tensor(list(kv_lens), **i32), positions=torch.tensor(positions, dtype=torch.int64),
        slots=torch.tensor(slots, dtype=torch.int64), batch_indices=torch.tensor(batch_indices, **i32),
        page_size=page_size, max_q_len=max(new_tokens), max_kv_len=max(kv_lens),
    )


@dataclass
class DecodeMetadata:
    """One new token per sequence, every field a device tensor (views of the runner's fixed buffers when
    a graph is captured). ``max_pages`` is a host-side bound on the table columns in use, for paths that
    read the table densely (the reference); None means the whole width."""

    slots: torch.Tensor  # [B] int64: where this step's K/V go
    kv_lens: torch.Tensor  # [B] int32: tokens in the cache after this step's token
    page_table: torch.Tensor  # [B, W] int32: row b's pages in order (unused columns: any valid page)
    page_size: int
    max_pages: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.kv_lens.numel()


def csr_from_table(page_table: torch.Tensor, kv_lens: torch.Tensor, page_size: int):
    """Host CSR (indptr, indices, last_page_len) from a dense page table and lengths, without a Python loop:
    what FlashInfer's planned decode kernels take."""
    counts = (kv_lens.long() + page_size - 1) // page_size
    indptr = torch.zeros(len(counts) + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0)
    used = torch.arange(page_table.shape[1])[None, :] < counts[:, None]
    last = kv_lens - (counts.to(torch.int32) - 1) * page_size
    return indptr, page_table[used].to(torch.int32), last.to(torch.int32)


def decode_step_metadata(lens, table, page_size, positions, slots, kv_lens) -> None:
    """A decode step's token positions, KV slots and KV lengths, written in place from the lengths so far and the
    page table: the step's one token goes at position ``lens``, in slot ``table[row, lens // page] * page +
    lens % page``, and the cache then holds ``lens + 1`` tokens. On CUDA one Triton launch instead of eight torch
    kernels at the head of every captured step (kernels/decode_metadata.py); this torch form is its reference."""
    from ..kernels import step_kernels_enabled

    if lens.is_cuda and step_kernels_enabled():
        from ..kernels.decode_metadata import decode_metadata_triton

        return decode_metadata_triton(lens, table, page_size, positions, slots, kv_lens)
    positions.copy_(lens)
    pages = table.gather(1, (positions // page_size)[:, None])[:, 0]
    slots.copy_(pages * page_size + positions % page_size)
    kv_lens.copy_(lens + 1)
