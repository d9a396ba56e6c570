"""FlashInfer attention over the KV pool: the CUDA implementation of ``kernelstack::paged_attention``.

One plan per step on the host, shared by every layer, over one workspace:
- all-new prompts: ragged prefill straight over this step's K/V (nothing read back from the pool);
- prompts extending cached tokens: paged prefill;
- one token per sequence: paged decode with tensor cores (any GQA group size).
K/V are appended into the pool by a scatter over the step's slots (no host sync, capturable).
fp8 (e4m3) KV stores K/V divided by a per-layer scale fixed on the first prefill (2x headroom over
that prefill's absolute max); FlashInfer multiplies it back inside the kernel.
"""


import torch

from ..ops.paged_attention import write_kv

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
WORKSPACE_BYTES = 256 * 2**20
FP8_MAX = 448.0


class UnsupportedAttention(ValueError):
    pass


class FlashInferAttention:
    def __init__(self, pool, num_qo_heads, q_dtype, sm_scale, window_left):
        if pool.head_dim not in SUPPORTED_HEAD_DIMS:
            raise UnsupportedAttention(f"head size {pool.head_dim} (FlashInfer path supports {SUPPORTED_HEAD_DIMS})")
        if q_dtype not in SUPPORTED_DTYPES:
            raise UnsupportedAttention(f"activation dtype {q_dtype} (FlashInfer path supports bf16 and fp16)")
        import flashinfer  # CUDA only: imported when a CUDA model is optimized

        self.flashinfer = flashinfer
        self.pool, self.num_qo_heads, self.q_dtype = pool, num_qo_heads, q_dtype
        self.sm_scale, self.window_left = sm_scale, window_left
        self.fp8 = pool.dtype == torch.float8_e4m3fn
        self.k_scale = [None] * pool.num_layers
        self.v_scale = [None] * pool.num_layers
        device = pool.device
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        self.ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        # fa3 paged prefill fails with bf16 q over fp8 KV in 0.5.3: fa2 there.
        self.paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2" if self.fp8 else "auto")
        self.mode = None
        self._graph_wrappers = {}

    def _common(self):
        return dict(num_qo_heads=self.num_qo_heads, num_kv_heads=self.pool.num_kv_heads, q_data_type=self.q_dtype,
                    kv_data_type=self.pool.dtype, sm_scale=self.sm_scale, window_left=self.window_left)

    def plan(self, meta):
        """Plan this step from host (CPU) metadata; every layer's ``run`` then reuses the plan."""
        c, pool = self._common(), self.pool
        if meta.is_decode:
            self.mode = "decode"
            self.decode.plan(meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, c["num_qo_heads"],
                             c["num_kv_heads"], pool.head_dim, pool.page_size, window_left=c["window_left"],
                             q_data_type=c["q_data_type"], kv_data_type=c["kv_data_type"], sm_scale=c["sm_scale"])
        elif torch.equal(meta.qo_indptr[1:] - meta.qo_indptr[:-1], meta.kv_lens):
            self.mode = "ragged"
            self.ragged.plan(meta.qo_indptr, meta.qo_indptr, c["num_qo_heads"], c["num_kv_heads"], pool.head_dim,
                             causal=True, window_left=c["window_left"], sm_scale=c["sm_scale"],
                             q_data_type=c["q_data_type"], kv_data_type=c["q_data_type"])
        else:
            self.mode = "paged"
            self.paged.plan(meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
                            c["num_qo_heads"], c["num_kv_heads"], pool.head_dim, pool.page_size, causal=True,
                            window_left=c["window_left"], sm_scale=c["sm_scale"], q_data_type=c["q_data_type"],
                            kv_data_type=c["kv_data_type"])

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

    def run(self, q, k, v, layer, scale, window_left, meta, wrapper=None):
        if abs(scale - self.sm_scale) > 1e-6 * self.sm_scale or window_left != self.window_left:
            raise UnsupportedAttention(f"layer {layer} uses scale {scale} / window {window_left}, the step was planned "
                                       f"for {self.sm_scale} / {self.window_left}")
        self._store(k, v, layer, meta.slots)
        scales = dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer]) if self.fp8 else {}
        if wrapper is not None:
            return wrapper.run(q.contiguous(), self.pool.caches[layer], **scales)
        if self.mode == "ragged":
            return self.ragged.run(q.contiguous(), k.contiguous(), v.contiguous())
        if self.mode == "decode":
            return self.decode.run(q.contiguous(), self.pool.caches[layer], **scales)
        return self.paged.run(q.contiguous(), self.pool.caches[layer], **scales)

    # -- CUDA graphs: one decode wrapper per bucket, with fixed buffers ------------------------------
    def graph_decode_wrapper(self, bucket):
        if bucket not in self._graph_wrappers:
            dev = self.pool.device
            self._graph_wrappers[bucket] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.empty(bucket + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.empty(self.pool.num_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.empty(bucket, dtype=torch.int32, device=dev))
        return self._graph_wrappers[bucket]

    def plan_graph(self, wrapper, meta):
        c, pool = self._common(), self.pool
        wrapper.plan(meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, c["num_qo_heads"], c["num_kv_heads"],
                     pool.head_dim, pool.page_size, window_left=c["window_left"], q_data_type=c["q_data_type"],
                     kv_data_type=c["kv_data_type"], sm_scale=c["sm_scale"])


class GraphStepAttention:
    """What the forward context holds while a bucket's decode graph is captured: its own wrapper."""

    def __init__(self, attention: FlashInferAttention, wrapper):
        self.attention, self.wrapper = attention, wrapper

    def run(self, q, k, v, layer, scale, window_left, meta):
        return self.attention.run(q, k, v, layer, scale, window_left, meta, wrapper=self.wrapper)
