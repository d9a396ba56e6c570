"""The paged KV pool kernelstack owns, and its page allocator.

Memory grows with real tokens: a sequence holds ceil(len / page_size) pages and gives them back when
it ends. Each layer's cache is one tensor in FlashInfer's NHD layout,
``[num_pages, 2 (K, V), page_size, kv_heads, head_dim]``, allocated once on a GPU: its address never
changes, so CUDA graphs captured over it stay valid across generate calls (HF's StaticCache is
reallocated). On the CPU nothing is captured, so the pool grows instead of running out.

The pool owns the K/V write: ``write`` scatters a step's K/V into their slots, quantising to fp8 with
fixed per-layer scales when the pool is fp8 (set once, from the model, never from the traffic).
"""

from dataclasses import dataclass
from dataclasses import field

import torch

from .metadata import BatchMetadata
from .metadata import DecodeMetadata
from .metadata import build_batch_metadata

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def readable_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


class KVPoolExhausted(RuntimeError):
    """The step needs more KV pages than are free. Raised before any state changes."""


class PageAllocator:
    """Pages with reference counts: a page shared by sequences (a prompt's full pages, shared by its
    ``num_return_sequences`` copies) goes back to the free list when the last of them lets go."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: recently freed pages are reused first
        self._refs: dict[int, int] = {}
        self.high_water = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    def alloc(self, count: int) -> list[int]:
        if count > len(self._free):
            raise KVPoolExhausted(f"needs {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        self._refs.update((p, 1) for p in pages)
        self.high_water = max(self.high_water, len(self._refs))
        return pages

    def share(self, pages) -> None:
        for page in pages:
            self._refs[page] += 1

    def free(self, pages) -> None:
        for page in pages:
            refs = self._refs.get(page)
            if refs is None:
                raise ValueError(f"page {page} is not allocated (double free?)")
            if refs == 1:
                del self._refs[page]
                self._free.append(page)
            else:
                self._refs[page] = refs - 1

    def grow(self, count: int) -> None:
        """Add ``count`` new pages (numbered after the existing ones)."""
        self._free[:0] = range(self.num_pages + count - 1, self.num_pages - 1, -1)
        self.num_pages += count


@dataclass
class Sequence:
    pages: list = field(default_factory=list)
    length: int = 0


class KVPool:
    def __init__(self, num_layers, num_kv_heads, head_dim, num_pages, page_size, dtype, device, growable=False):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, torch.device(device)
        self.growable = growable
        self.caches = [self._empty_pages(num_pages) for _ in range(num_layers)]
        self.allocator = PageAllocator(num_pages)
        self.sequences: dict[int, Sequence] = {}
        self.k_scales = [1.0] * num_layers  # fp8 only: stored value = K / k_scale
        self.v_scales = [1.0] * num_layers

    def _empty_pages(self, count):
        shape = (count, 2, self.page_size, self.num_kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

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

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # -- pages ----------------------------------------------------------------------------------------
    def alloc(self, count: int) -> list[int]:
        """``count`` pages; a growable (CPU) pool grows by at least half its size instead of failing."""
        if count > self.allocator.num_free and self.growable:
            self.grow(max(count - self.allocator.num_free, self.num_pages // 2))
        return self.allocator.alloc(count)

    def grow(self, count: int) -> None:
        self.caches = [torch.cat([c, self._empty_pages(count)]) for c in self.caches]
        self.allocator.grow(count)

    def reserve(self, seq_id, tokens: int) -> list[int]:
        """Make sequence ``seq_id`` hold pages for ``tokens`` tokens; returns the pages it newly got."""
        seq = self.sequences.setdefault(seq_id, Sequence())
        new = self.alloc(max(0, self.pages_for(tokens) - len(seq.pages)))
        seq.pages += new
        return new

    def fork(self, source, seq_id) -> None:
        """A new sequence ``seq_id`` holding the same tokens as ``source``: its full pages are shared (never
        written again: new tokens go after them), its last partial page is copied, on write, into a page of
        its own."""
        src = self.sequences[source]
        full = src.length // self.page_size
        self.allocator.share(src.pages[:full])
        pages = src.pages[:full]
        if src.length % self.page_size:
            (page,) = self.alloc(1)
            for cache in self.caches:
                cache[page].copy_(cache[src.pages[full]])
            pages = pages + [page]
        self.sequences[seq_id] = Sequence(pages, src.length)

    def exhausted_error(self, needed_pages: int, what: str) -> KVPoolExhausted:
        per_token = self.bytes_per_token()
        fraction = " or kv_memory_fraction=..." if self.device.type == "cuda" else ""  # the GPU sizes from free memory
        return KVPoolExhausted(
            f"kernelstack KV pool too small: {what} needs {needed_pages} pages of {self.page_size} tokens, the pool "
            f"has {self.num_pages} ({self.capacity_tokens} tokens, {readable_bytes(per_token * self.capacity_tokens)})."
            f" Raise it with ksbackend.optimize(model, max_kv_tokens=N) (each token costs {per_token} bytes)"
            f"{fraction}, or use a shorter prompt or fewer max_new_tokens.")

    def extend(self, seq_ids, new_tokens) -> BatchMetadata:
        """Grow each sequence by its new tokens (allocating pages, all or nothing) and return the step's
        metadata. Unknown ids start new sequences."""
        needed = []
        for seq_id, new in zip(seq_ids, new_tokens):
            seq = self.sequences.get(seq_id, Sequence())
            needed.append(self.pages_for(seq.length + new) - len(seq.pages))
        if sum(needed) > self.allocator.num_free and not self.growable:
            raise KVPoolExhausted(f"this step needs {sum(needed)} more pages, {self.allocator.num_free} of "
                                  f"{self.num_pages} are free")
        for seq_id, new in zip(seq_ids, new_tokens):
            seq = self.sequences.setdefault(seq_id, Sequence())
            self.reserve(seq_id, seq.length + new)
            seq.length += new
        return build_batch_metadata([self.sequences[s].pages for s in seq_ids],
                                    [self.sequences[s].length for s in seq_ids], list(new_tokens), self.page_size)

    def decode_metadata(self, seq_ids):
        """``DecodeMetadata`` (on the device) for a step whose token is each sequence's last, plus the host's
        page table and lengths (what a planned decode kernel plans from). For tools and tests; the runner keeps
        its own on the device."""
        seqs = [self.sequences[s] for s in seq_ids]
        table = torch.zeros(len(seqs), max(len(s.pages) for s in seqs), dtype=torch.int32)
        for row, seq in enumerate(seqs):
            table[row, : len(seq.pages)] = torch.tensor(seq.pages, dtype=torch.int32)
        lens = torch.tensor([s.length for s in seqs], dtype=torch.int32)
        last = (lens.long() - 1)
        slots = table.long().gather(1, (last // self.page_size)[:, None])[:, 0] * self.page_size + last % self.page_size
        meta = DecodeMetadata(slots.to(self.device), lens.to(self.device), table.to(self.device), self.page_size)
        return meta, table, lens

    def release(self, seq_id) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is not None:
            self.allocator.free(seq.pages)

    # -- K/V ------------------------------------------------------------------------------------------
    def set_fp8_scales(self, k_scales, v_scales) -> None:
        self.k_scales, self.v_scales = [float(s) for s in k_scales], [float(s) for s in v_scales]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Scatter this step's K/V ([N, H, D] each) into their flat slots (page * page_size + offset)."""
        cache = self.caches[layer]
        if self.fp8:  # fixed per-layer scales: what a prompt stores never depends on earlier traffic
            k = (k.float() / self.k_scales[layer]).clamp(-FP8_MAX, FP8_MAX)
            v = (v.float() / self.v_scales[layer]).clamp(-FP8_MAX, FP8_MAX)
        pages, offsets = slots // self.page_size, slots % self.page_size
        cache[pages, 0, offsets] = k.to(self.dtype)
        cache[pages, 1, offsets] = v.to(self.dtype)

    def read_pages(self, layer: int, pages: torch.Tensor, dtype):
        """K and V of ``pages`` (an index tensor of any shape S), [*S, page_size, H, D] each, in ``dtype`` with the
        fp8 scales applied."""
        chunk = self.caches[layer][pages.long()]
        k, v = chunk.select(-4, 0).to(dtype), chunk.select(-4, 1).to(dtype)
        if self.fp8:
            k, v = k * self.k_scales[layer], v * self.v_scales[layer]
        return k, v

    def gather(self, layer: int, pages: torch.Tensor, length: int, dtype):
        """One sequence's K and V, [length, H, D] each, read from its pages in order (scales applied)."""
        k, v = self.read_pages(layer, pages, dtype)
        return k.flatten(0, 1)[:length], v.flatten(0, 1)[:length]
