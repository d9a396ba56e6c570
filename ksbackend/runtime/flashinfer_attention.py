"""FlashInfer attention over the KV pool: the CUDA implementation of ``kernelstack::paged_attention``.

``FlashInferAttention`` holds one model's kernels and one workspace. A step's attention is a value the
forward context carries, made before the step runs:
- prefill (``plan_prefill``): all-new prompts run ragged prefill straight over this step's K/V (nothing
  read back from the pool); prompts extending cached tokens run paged prefill. Planned on the host.
- decode (``new_decode``): one of three kernels, chosen by ``decode_kernel``:
  ``xqa`` (TensorRT-LLM's XQA, shipped in FlashInfer; Hopper): takes the dense page table and lengths
  straight from the device, so it needs no host plan: a captured decode step advances its own metadata
  and the host never has to wait for the GPU before the next step. On fp8 KV it multiplies e4m3 on
  Hopper's fp8 tensor cores (Q and P rounded to e4m3 too). The "auto" choice on Hopper for head size 128+.
  ``tensor_cores`` (FlashInfer's prefill-style decode, any GQA group) and ``cuda_cores`` (group sizes
  1, 2, 3, 4, 8): planned on the host before every step, from CSR page lists.
  ``triton`` (kernelstack's own, kernels/decode_attention.py): plan-free like XQA, one launch, split-KV merged
  in the kernel; built for the latency of small batches over short contexts. The "auto" choice on Hopper for
  head size 64.
Every kernel writes K/V through the pool (``KVPool.write``: the pool owns the layout and fp8 scales).
"""

import logging

import torch

from ..config import DECODE_KERNELS
from .metadata import csr_from_table

log = logging.getLogger("ksbackend")

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
CUDA_CORE_GROUP_SIZES = (1, 2, 3, 4, 8)
XQA_PAGE_SIZES = (16, 32, 64, 128)
# On an H100 the Triton kernel was the fastest or within ~1.5 us of it at every head-size-64 shape measured (batch
# 1-64, context 128-4096); at head size 128 FlashInfer's kernels win the long contexts of large batches.
TRITON_AUTO_MAX_HEAD_DIM = 64
WORKSPACE_BYTES = 256 * 2**20  # FlashInfer's split-k scratch
XQA_WORKSPACE_BYTES = 64 * 2**20  # XQA's semaphores (must start zeroed: XQA resets them itself) + scratch


class UnsupportedAttention(ValueError):
    pass


class FlashInferAttention:
    def __init__(self, pool, num_qo_heads, q_dtype, sm_scale, window_left, decode_kernel="auto"):
        if pool.head_dim not in SUPPORTED_HEAD_DIMS:
            raise UnsupportedAttention(f"head size {pool.head_dim} (FlashInfer path supports {SUPPORTED_HEAD_DIMS})")
        if q_dtype not in SUPPORTED_DTYPES:
            raise UnsupportedAttention(f"activation dtype {q_dtype} (FlashInfer path supports bf16 and fp16)")
        try:
            import flashinfer  # CUDA only: imported when a CUDA model is optimized
        except ImportError as exc:  # a CUDA install without it still generates, on the reference path
            raise UnsupportedAttention(f"FlashInfer is not importable ({exc}; pip install flashinfer-python)") from exc

        self.flashinfer = flashinfer
        self.pool, self.num_qo_heads, self.q_dtype = pool, num_qo_heads, q_dtype
        self.sm_scale, self.window_left = sm_scale, window_left
        # One allocation: FlashInfer's wrappers take the front, XQA the tail (its semaphores must not be
        # scribbled on by the other kernels' scratch).
        buffer = torch.zeros(WORKSPACE_BYTES + XQA_WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self.workspace, self.xqa_workspace = buffer[:WORKSPACE_BYTES], buffer[WORKSPACE_BYTES:]
        self.ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        # fa3 paged prefill fails with bf16 q over fp8 KV in 0.5.3: fa2 there.
        self.paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                     backend="fa2" if pool.fp8 else "auto")
        self._triton_workspaces = []
        self.decode_kernel = self._resolve_decode_kernel(decode_kernel)

    def _resolve_decode_kernel(self, name):
        if name not in DECODE_KERNELS:
            raise UnsupportedAttention(f"decode_kernel={name!r}; choose one of {DECODE_KERNELS}")
        group = self.num_qo_heads // self.pool.num_kv_heads
        hopper = torch.cuda.get_device_capability(self.pool.device)[0] == 9
        xqa_ok = hopper and self.pool.page_size in XQA_PAGE_SIZES
        head_dim = self.pool.head_dim
        triton_ok = head_dim & (head_dim - 1) == 0  # its tiles span the head: a power of 2
        if name == "auto":  # the measured table in docs/benchmarks.md ("Decode kernel by shape")
            if hopper and triton_ok and head_dim <= TRITON_AUTO_MAX_HEAD_DIM:
                return "triton"
            return "xqa" if xqa_ok and self._xqa_runs() else "tensor_cores"
        if name == "cuda_cores" and group not in CUDA_CORE_GROUP_SIZES:
            raise UnsupportedAttention(f"decode_kernel='cuda_cores' takes GQA group sizes {CUDA_CORE_GROUP_SIZES}, "
                                       f"this model has {group}; use 'tensor_cores'")
        if name == "triton" and not triton_ok:
            raise UnsupportedAttention(f"decode_kernel='triton' takes head sizes that are powers of 2, this model has "
                                       f"{head_dim}; use 'tensor_cores'")
        if name == "xqa" and not xqa_ok:
            raise UnsupportedAttention(f"decode_kernel='xqa' needs a Hopper GPU and page_size in {XQA_PAGE_SIZES}")
        return name

    def _xqa_runs(self) -> bool:
        """XQA is compiled per (dtypes, head size, group, page size): try it once on this model's shapes."""
        pool = self.pool
        try:
            q = torch.randn(1, self.num_qo_heads, pool.head_dim, dtype=self.q_dtype, device=pool.device)
            table = torch.zeros(1, 1, dtype=torch.int32, device=pool.device)
            lens = torch.ones(1, dtype=torch.int32, device=pool.device)
            self._xqa(q, 0, table, lens)
            return True
        except Exception as exc:  # an XQA this FlashInfer build cannot make: the planned kernels serve
            log.warning("kernelstack: XQA decode unavailable for these shapes (%s: %s); using tensor-core decode",
                        type(exc).__name__, exc)
            return False

    @property
    def decode_needs_plan(self) -> bool:
        return self.decode_kernel not in ("xqa", "triton")

    def check(self, layer, scale, window_left):
        if abs(scale - self.sm_scale) > 1e-6 * self.sm_scale or window_left != self.window_left:
            raise UnsupportedAttention(f"layer {layer} uses scale {scale} / window {window_left}, the model was set "
                                       f"up for {self.sm_scale} / {self.window_left}")

    def fp8_scale_kwargs(self, layer):
        """FlashInfer wrappers' k_scale/v_scale arguments: given for fp8 KV only."""
        pool = self.pool
        return dict(k_scale=pool.k_scales[layer], v_scale=pool.v_scales[layer]) if pool.fp8 else {}

    # -- prefill --------------------------------------------------------------------------------------
    def plan_prefill(self, meta) -> "PrefillAttention":
        """Plan a prefill step from host (CPU) metadata; every layer then reuses the plan."""
        pool = self.pool
        common = dict(causal=True, window_left=self.window_left, sm_scale=self.sm_scale, q_data_type=self.q_dtype)
        if torch.equal(meta.qo_indptr[1:] - meta.qo_indptr[:-1], meta.kv_lens):
            self.ragged.plan(meta.qo_indptr, meta.qo_indptr, self.num_qo_heads, pool.num_kv_heads, pool.head_dim,
                             kv_data_type=self.q_dtype, **common)
            return PrefillAttention(self, self.ragged, paged=False)
        self.paged.plan(meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, self.num_qo_heads,
                        pool.num_kv_heads, pool.head_dim, pool.page_size, kv_data_type=pool.dtype, **common)
        return PrefillAttention(self, self.paged, paged=True)

    # -- decode ---------------------------------------------------------------------------------------
    def new_decode(self, bucket=None):
        """The step attention of one decode batch; ``bucket`` fixes its batch size and plan buffers (CUDA graph)."""
        if self.decode_kernel == "triton":
            return TritonDecode(self)
        return XQADecode(self) if self.decode_kernel == "xqa" else PlannedDecode(self, bucket)

    def triton_workspace(self, batch):
        """Split partials and merge counters for ``batch`` sequences. A larger batch gets a larger workspace and
        the smaller ones stay alive: graphs captured earlier keep pointing at theirs."""
        from ..kernels.decode_attention import TritonDecodeWorkspace

        if not self._triton_workspaces or self._triton_workspaces[-1].max_batch < batch:
            pool = self.pool
            size = max(batch, 2 * self._triton_workspaces[-1].max_batch if self._triton_workspaces else 8)
            self._triton_workspaces.append(
                TritonDecodeWorkspace(size, self.num_qo_heads, pool.num_kv_heads, pool.head_dim, pool.device))
        return self._triton_workspaces[-1]

    def _xqa(self, q, layer, table, kv_lens):
        pool = self.pool
        k_scale, v_scale = pool.k_scales[layer], pool.v_scales[layer]
        return self.flashinfer.decode.xqa_batch_decode_with_kv_cache(
            q, pool.caches[layer], self.xqa_workspace, table, kv_lens.view(torch.uint32),
            table.shape[1] * pool.page_size, bmm1_scale=self.sm_scale * k_scale, bmm2_scale=v_scale,
            window_left=self.window_left, kv_layout="NHD")


class StepAttention:
    """One step's attention: ``run`` writes this step's K/V through the pool, then ``attend``s. A caller that
    already wrote them (the fused RoPE + append kernel) calls ``attend`` alone."""

    attention: FlashInferAttention

    def run(self, q, k, v, layer, scale, window_left, meta):
        self.attention.check(layer, scale, window_left)
        self.attention.pool.write(layer, k, v, meta.slots)
        return self.attend(q, k, v, layer, meta)

    def attend(self, q, k, v, layer, meta):
        raise NotImplementedError


class PrefillAttention(StepAttention):
    """A planned prefill step: the wrapper whose plan this step made."""

    def __init__(self, attention, wrapper, paged):
        self.attention, self.wrapper, self.paged = attention, wrapper, paged

    def attend(self, q, k, v, layer, meta):
        a = self.attention
        if self.paged:
            return self.wrapper.run(q.contiguous(), a.pool.caches[layer], **a.fp8_scale_kwargs(layer))
        return self.wrapper.run(q.contiguous(), k.contiguous(), v.contiguous())


class XQADecode(StepAttention):
    """XQA reads the page table and lengths the step's ``DecodeMetadata`` holds on the device: no plan."""

    def __init__(self, attention):
        self.attention = attention

    def plan(self, page_table_host, kv_lens_host):
        """Nothing to plan: the kernel reads everything from the device."""

    def attend(self, q, k, v, layer, meta):
        return self.attention._xqa(q.contiguous(), layer, meta.page_table, meta.kv_lens)


class TritonDecode(StepAttention):
    """kernelstack's Triton decode kernel: like XQA it reads the device page table and lengths, no plan."""

    def __init__(self, attention):
        self.attention = attention

    def plan(self, page_table_host, kv_lens_host):
        """Nothing to plan: the kernel reads everything from the device."""

    def attend(self, q, k, v, layer, meta):
        from ..kernels.decode_attention import decode_attention_triton

        a, pool = self.attention, self.attention.pool
        return decode_attention_triton(q, pool.caches[layer], meta.page_table, meta.kv_lens, a.sm_scale,
                                       a.window_left, a.triton_workspace(q.shape[0]), pool.k_scales[layer],
                                       pool.v_scales[layer])


class PlannedDecode(StepAttention):
    """FlashInfer's decode wrapper (tensor-core or cuda-core kernel), planned on the host before each step.
    For a CUDA-graph bucket its plan buffers are fixed (``use_cuda_graph=True``)."""

    def __init__(self, attention, bucket=None):
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

    def plan(self, page_table_host, kv_lens_host):
        """Plan from the host's mirror of the page table and the lengths after this step's token."""
        a, pool = self.attention, self.attention.pool
        indptr, indices, last = csr_from_table(page_table_host, kv_lens_host, pool.page_size)
        self.wrapper.plan(indptr, indices, last, a.num_qo_heads, pool.num_kv_heads, pool.head_dim, pool.page_size,
                          window_left=a.window_left, q_data_type=a.q_dtype, kv_data_type=pool.dtype,
                          sm_scale=a.sm_scale)

    def attend(self, q, k, v, layer, meta):
        a = self.attention
        return self.wrapper.run(q.contiguous(), a.pool.caches[layer], **a.fp8_scale_kwargs(layer))
