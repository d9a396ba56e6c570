"""FlashInfer attention over the KV pool: the CUDA implementation of ``kernelstack::paged_attention``.

One plan per step on the host, shared by every layer, over one workspace:
- all-new prompts: ragged prefill straight over this step's K/V (nothing read back from the pool);
- prompts extending cached tokens: paged prefill;
- one token per sequence: paged decode, by one of three kernels (``decode_kernel``):
  ``tensor_cores`` (FlashInfer's prefill-style decode: any GQA group size; the bf16 default),
  ``cuda_cores`` (FlashInfer's classic decode: group sizes 1, 2, 3, 4, 8) and ``xqa`` (TensorRT-LLM's
  XQA, ported into FlashInfer: on Hopper it multiplies e4m3 K/V on fp8 tensor cores, Q and P rounded
  to e4m3 too, instead of widening every K/V element to bf16 first; the fp8 default on sm90).
K/V are appended into the pool by a scatter over the step's slots (no host sync, capturable).
fp8 (e4m3) KV stores K/V divided by a per-layer scale fixed on the first prefill (2x headroom over
that prefill's absolute max); the kernels multiply it back.
"""

import torch

from ..config import DECODE_KERNELS
from ..ops.paged_attention import write_kv

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
CUDA_CORE_GROUP_SIZES = (1, 2, 3, 4, 8)
XQA_PAGE_SIZES = (16, 32, 64, 128)
WORKSPACE_BYTES = 256 * 2**20  # FlashInfer's split-k scratch
XQA_WORKSPACE_BYTES = 64 * 2**20  # XQA's semaphores (must start zeroed: XQA resets them itself) + scratch
FP8_MAX = 448.0


class UnsupportedAttention(ValueError):
    pass


def block_table(meta) -> torch.Tensor:
    """CSR page lists -> a dense [B, max pages] table (XQA's input; unused entries are page 0)."""
    counts = (meta.kv_indptr[1:] - meta.kv_indptr[:-1]).long()
    width = int(counts.max()) if counts.numel() else 0
    table = torch.zeros(counts.numel(), max(width, 1), dtype=torch.int32)
    table[torch.arange(table.shape[1])[None, :] < counts[:, None]] = meta.kv_indices
    return table


class FlashInferAttention:
    def __init__(self, pool, num_qo_heads, q_dtype, sm_scale, window_left, decode_kernel="auto", max_seq_len=None):
        if pool.head_dim not in SUPPORTED_HEAD_DIMS:
            raise UnsupportedAttention(f"head size {pool.head_dim} (FlashInfer path supports {SUPPORTED_HEAD_DIMS})")
        if q_dtype not in SUPPORTED_DTYPES:
            raise UnsupportedAttention(f"activation dtype {q_dtype} (FlashInfer path supports bf16 and fp16)")
        import flashinfer  # CUDA only: imported when a CUDA model is optimized

        self.flashinfer = flashinfer
        self.pool, self.num_qo_heads, self.q_dtype = pool, num_qo_heads, q_dtype
        self.sm_scale, self.window_left = sm_scale, window_left
        self.fp8 = pool.dtype == torch.float8_e4m3fn
        self.max_seq_len = max_seq_len or pool.capacity_tokens
        self.decode_kernel = self._resolve_decode_kernel(decode_kernel)
        self.k_scale = [None] * pool.num_layers
        self.v_scale = [None] * pool.num_layers
        # One allocation: FlashInfer's wrappers take the front, XQA the tail (its semaphores must not be
        # scribbled on by the other kernels' scratch).
        buffer = torch.zeros(WORKSPACE_BYTES + XQA_WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self.workspace, self.xqa_workspace = buffer[:WORKSPACE_BYTES], buffer[WORKSPACE_BYTES:]
        self.decode = self.new_decode()
        self.ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        # fa3 paged prefill fails with bf16 q over fp8 KV in 0.5.3: fa2 there.
        self.paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2" if self.fp8 else "auto")
        self.mode = None

    def _resolve_decode_kernel(self, name):
        if name not in DECODE_KERNELS:
            raise UnsupportedAttention(f"decode_kernel={name!r}; choose one of {DECODE_KERNELS}")
        group = self.num_qo_heads // self.pool.num_kv_heads
        hopper = torch.cuda.get_device_capability(self.pool.device)[0] == 9
        xqa_ok = hopper and self.pool.page_size in XQA_PAGE_SIZES
        if name == "auto":
            return "xqa" if self.fp8 and xqa_ok else "tensor_cores"
        if name == "cuda_cores" and group not in CUDA_CORE_GROUP_SIZES:
            raise UnsupportedAttention(f"decode_kernel='cuda_cores' takes GQA group sizes {CUDA_CORE_GROUP_SIZES}, "
                                       f"this model has {group}; use 'tensor_cores'")
        if name == "xqa" and not xqa_ok:
            raise UnsupportedAttention(f"decode_kernel='xqa' needs a Hopper GPU and page_size in {XQA_PAGE_SIZES}")
        return name

    def new_decode(self, bucket=None):
        """A decode kernel with its own plan; ``bucket`` fixes its batch size and buffers for a CUDA graph."""
        if self.decode_kernel == "xqa":
            return XQADecode(self, bucket)
        return FlashInferDecode(self, bucket)

    def plan(self, meta):
        """Plan this step from host (CPU) metadata; every layer's ``run`` then reuses the plan."""
        pool = self.pool
        common = dict(causal=True, window_left=self.window_left, sm_scale=self.sm_scale, q_data_type=self.q_dtype)
        if meta.is_decode:
            self.mode = "decode"
            self.decode.plan(meta)
        elif torch.equal(meta.qo_indptr[1:] - meta.qo_indptr[:-1], meta.kv_lens):
            self.mode = "ragged"
            self.ragged.plan(meta.qo_indptr, meta.qo_indptr, self.num_qo_heads, pool.num_kv_heads, pool.head_dim,
                             kv_data_type=self.q_dtype, **common)
        else:
            self.mode = "paged"
            self.paged.plan(meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, self.num_qo_heads,
                            pool.num_kv_heads, pool.head_dim, pool.page_size, kv_data_type=pool.dtype, **common)

    def _store(self, k, v, layer, slots):
        cache = self.pool.caches[layer]
        if not self.fp8:
            write_kv(cache, k, v, slots)
            return
        if self.k_scale[layer] is None:  # first prefill fixes the scale (one host sync per layer, once)
            self.k_scale[layer] = max(float(k.abs().max()) * 2.0 / FP8_MAX, 1e-6)
            self.v_scale[layer] = max(float(v.abs().max()) * 2.0 / FP8_MAX, 1e-6)
        write_kv(cache, (k.float() / self.k_scale[layer]).clamp(-FP8_MAX, FP8_MAX),
                 (v.float() / self.v_scale[layer]).clamp(-FP8_MAX, FP8_MAX), slots)

    def scales(self, layer):
        return (self.k_scale[layer], self.v_scale[layer]) if self.fp8 else (1.0, 1.0)

    def fp8_scale_kwargs(self, layer):
        """FlashInfer wrappers' k_scale/v_scale arguments: given for fp8 KV only."""
        return dict(zip(("k_scale", "v_scale"), self.scales(layer))) if self.fp8 else {}

    def run(self, q, k, v, layer, scale, window_left, meta, decode=None):
        if abs(scale - self.sm_scale) > 1e-6 * self.sm_scale or window_left != self.window_left:
            raise UnsupportedAttention(f"layer {layer} uses scale {scale} / window {window_left}, the step was planned "
                                       f"for {self.sm_scale} / {self.window_left}")
        self._store(k, v, layer, meta.slots)
        if decode is not None or self.mode == "decode":
            return (decode or self.decode).run(q.contiguous(), layer)
        if self.mode == "ragged":
            return self.ragged.run(q.contiguous(), k.contiguous(), v.contiguous())
        return self.paged.run(q.contiguous(), self.pool.caches[layer], **self.fp8_scale_kwargs(layer))


class FlashInferDecode:
    """FlashInfer's paged decode wrapper (tensor-core or cuda-core kernel)."""

    def __init__(self, attention: FlashInferAttention, bucket=None):
        self.attention = attention
        pool = attention.pool
        graph_buffers = {}
        if bucket is not None:
            i32 = dict(dtype=torch.int32, device=pool.device)
            graph_buffers = dict(use_cuda_graph=True, paged_kv_indptr_buffer=torch.empty(bucket + 1, **i32),
                                 paged_kv_indices_buffer=torch.empty(pool.num_pages, **i32),
                                 paged_kv_last_page_len_buffer=torch.empty(bucket, **i32))
        self.wrapper = attention.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            attention.workspace, "NHD", use_tensor_cores=attention.decode_kernel == "tensor_cores", **graph_buffers)

    def plan(self, meta):
        a, pool = self.attention, self.attention.pool
        self.wrapper.plan(meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, a.num_qo_heads, pool.num_kv_heads,
                          pool.head_dim, pool.page_size, window_left=a.window_left, q_data_type=a.q_dtype,
                          kv_data_type=pool.dtype, sm_scale=a.sm_scale)

    def run(self, q, layer):
        a = self.attention
        return self.wrapper.run(q, a.pool.caches[layer], **a.fp8_scale_kwargs(layer))


class XQADecode:
    """XQA decode: a dense page table and uint32 lengths instead of CSR. For a CUDA-graph bucket the
    table is a fixed [bucket, max pages per sequence] buffer and plan() copies only the used columns
    (stale columns past a row's length are never read)."""

    def __init__(self, attention: FlashInferAttention, bucket=None):
        self.attention, self.bucket = attention, bucket
        pool = attention.pool
        self.width = -(-attention.max_seq_len // pool.page_size)
        if bucket is not None:
            self.table = torch.zeros(bucket, self.width, dtype=torch.int32, device=pool.device)
            self.lens = torch.zeros(bucket, dtype=torch.int32, device=pool.device)

    def plan(self, meta):
        table, lens = block_table(meta), meta.kv_lens.to(torch.int32)
        if table.shape[1] > self.width:
            raise UnsupportedAttention(f"a sequence holds {int(meta.kv_lens.max())} tokens, above the "
                                       f"{self.width * self.attention.pool.page_size} the decode kernel was set up for")
        if self.bucket is None:
            dev = self.attention.pool.device
            self.table, self.lens = table.to(dev, non_blocking=True), lens.to(dev, non_blocking=True)
        else:
            self.table[:, : table.shape[1]].copy_(table, non_blocking=True)
            self.lens.copy_(lens, non_blocking=True)

    def run(self, q, layer):
        a = self.attention
        k_scale, v_scale = a.scales(layer)
        return a.flashinfer.decode.xqa_batch_decode_with_kv_cache(
            q, a.pool.caches[layer], a.xqa_workspace, self.table, self.lens.view(torch.uint32),
            self.table.shape[1] * a.pool.page_size, bmm1_scale=a.sm_scale * k_scale, bmm2_scale=v_scale,
            window_left=a.window_left, kv_layout="NHD")


class GraphStepAttention:
    """What the forward context holds while a bucket's decode graph is captured: its own decode kernel."""

    def __init__(self, attention: FlashInferAttention, decode):
        self.attention, self.decode = attention, decode

    def run(self, q, k, v, layer, scale, window_left, meta):
        return self.attention.run(q, k, v, layer, scale, window_left, meta, decode=self.decode)
