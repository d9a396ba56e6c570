"""The paged KV pool kernelstack owns, and its page allocator.

Memory grows with real tokens: a sequence holds ceil(len / page_size) pages and gives them back when
it ends. Each layer's cache is one tensor in FlashInfer's NHD layout,
``[num_pages, 2 (K, V), page_size, kv_heads, head_dim]``, allocated once: its address never changes,
so CUDA graphs captured over it stay valid across generate calls (HF's StaticCache is reallocated).
"""

from dataclasses import dataclass, field

import torch

from .metadata import BatchMetadata, build_batch_metadata


class KVPoolExhausted(RuntimeError):
    """The step needs more KV pages than are free. Raised before any state changes."""


class PageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: recently freed pages are reused first
        self._in_use: set[int] = set()
        self.high_water = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._in_use)

    def alloc(self, count: int) -> list[int]:
        if count > len(self._free):
            raise KVPoolExhausted(f"needs {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        self._in_use.update(pages)
        self.high_water = max(self.high_water, len(self._in_use))
        return pages

    def free(self, pages) -> None:
        for page in pages:
            if page not in self._in_use:
                raise ValueError(f"page {page} is not allocated (double free?)")
            self._in_use.remove(page)
            self._free.append(page)


@dataclass
class Sequence:
    pages: list = field(default_factory=list)
    length: int = 0


class KVPool:
    def __init__(self, num_layers, num_kv_heads, head_dim, num_pages, page_size, dtype, device):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, torch.device(device)
        self.caches = [torch.zeros(num_pages, 2, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.allocator = PageAllocator(num_pages)
        self.sequences: dict[int, Sequence] = {}

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @staticmethod
    def token_bytes(num_layers, num_kv_heads, head_dim, dtype) -> int:
        """KV bytes one token costs over all layers (K and V)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def bytes_per_token(self) -> int:
        return self.token_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def bytes_in_use(self) -> int:
        return self.allocator.num_used * self.page_size * self.bytes_per_token()

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def extend(self, seq_ids, new_tokens) -> BatchMetadata:
        """Grow each sequence by its new tokens (allocating pages, all or nothing) and return the step's
        metadata. Unknown ids start new sequences."""
        needed = []
        for seq_id, new in zip(seq_ids, new_tokens):
            seq = self.sequences.get(seq_id, Sequence())
            needed.append(self.pages_for(seq.length + new) - len(seq.pages))
        total = sum(needed)
        if total > self.allocator.num_free:
            per_token = self.bytes_per_token()
            raise KVPoolExhausted(
                f"kernelstack KV pool exhausted: this step needs {total} more pages of {self.page_size} tokens, "
                f"{self.allocator.num_free} of {self.num_pages} are free ({self.capacity_tokens} tokens, "
                f"{per_token * self.capacity_tokens / 2**20:.0f} MiB). Raise the pool with "
                f"ksbackend.optimize(model, max_kv_tokens=N) (each token costs {per_token} bytes) or "
                f"kv_memory_fraction=..., or use fewer/shorter sequences or fewer max_new_tokens.")
        for seq_id, new, count in zip(seq_ids, new_tokens, needed):
            seq = self.sequences.setdefault(seq_id, Sequence())
            seq.pages += self.allocator.alloc(count)
            seq.length += new
        return build_batch_metadata([self.sequences[s].pages for s in seq_ids],
                                    [self.sequences[s].length for s in seq_ids], list(new_tokens), self.page_size)

    def release(self, seq_id) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is not None:
            self.allocator.free(seq.pages)

    def release_all(self) -> None:
        for seq_id in list(self.sequences):
            self.release(seq_id)
