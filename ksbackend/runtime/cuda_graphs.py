"""Decode replayed from CUDA graphs, one per batch-size bucket.

A decode step of A sequences is padded up to the smallest bucket >= A: padded rows are dummy tokens
whose K/V land in one scratch page and whose logits are dropped. Before each replay the real tokens,
positions and slots are copied into the bucket's static buffers and FlashInfer re-plans on the host
(plan() stays outside the graph; the kernels are inside it). The pool's tensors never move, so graphs stay
valid across generate calls. Launch and Python overhead, which dominate small-batch decode, disappear.
"""

import torch

from .context import ForwardContext, forward_context
from .flashinfer_attention import GraphStepAttention
from .metadata import BatchMetadata


def pad_decode_metadata(meta: BatchMetadata, bucket: int, scratch_page: int) -> BatchMetadata:
    """Host metadata of A decode rows, padded with rows that read and write only ``scratch_page``."""
    pad = bucket - meta.num_seqs
    i32 = dict(dtype=torch.int32)
    ones = torch.ones(pad, **i32)
    return BatchMetadata(
        qo_indptr=torch.cat([meta.qo_indptr, meta.qo_indptr[-1] + torch.arange(1, pad + 1, **i32)]),
        kv_indptr=torch.cat([meta.kv_indptr, meta.kv_indptr[-1] + torch.arange(1, pad + 1, **i32)]),
        kv_indices=torch.cat([meta.kv_indices, torch.full((pad,), scratch_page, **i32)]),
        kv_last_page_len=torch.cat([meta.kv_last_page_len, ones]),
        kv_lens=torch.cat([meta.kv_lens, ones]),
        positions=torch.cat([meta.positions, torch.zeros(pad, dtype=torch.int64)]),
        slots=torch.cat([meta.slots, torch.full((pad,), scratch_page * meta.page_size, dtype=torch.int64)]),
        batch_indices=torch.cat([meta.batch_indices, torch.arange(meta.num_seqs, bucket, **i32)]),
        page_size=meta.page_size, max_q_len=1, max_kv_len=meta.max_kv_len)


class DecodeGraphRunner:
    def __init__(self, engine, buckets):
        self.engine, self.buckets = engine, tuple(buckets)
        self.scratch_page = engine.pool.allocator.alloc(1)[0]  # held for the runner's lifetime
        self.graphs = {}
        self.memory_pool = torch.cuda.graph_pool_handle()

    def bucket_for(self, num_seqs):
        return next((b for b in self.buckets if b >= num_seqs), None)

    def _capture(self, bucket):
        engine, attention = self.engine, self.engine.attention
        dev = engine.device
        host = pad_decode_metadata(BatchMetadata.empty(engine.pool.page_size), bucket, self.scratch_page)
        static = dict(ids=torch.zeros(1, bucket, dtype=torch.long, device=dev),
                      positions=torch.zeros(1, bucket, dtype=torch.long, device=dev),
                      keep=torch.arange(bucket, device=dev), slots=host.slots.to(dev))
        decode = attention.new_decode(bucket)
        decode.plan(host)
        device_meta = host.to(dev)
        device_meta.slots = static["slots"]
        ctx = ForwardContext(engine.pool, device_meta, GraphStepAttention(attention, decode))
        with forward_context(ctx), engine.model_attention():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile/autotune and allocate outside the capture
                    engine.compiled_forward(static["ids"], static["positions"], static["keep"])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.memory_pool):
                static["logits"] = engine.compiled_forward(static["ids"], static["positions"], static["keep"])
        self.graphs[bucket] = (graph, static, decode)
        engine.recorder.event(f"decode CUDA graph captured for bucket {bucket}")

    def run(self, tokens, meta):
        """Replay the bucket's graph for this step's A rows; returns their fp32 logits [A, V]."""
        bucket = self.bucket_for(meta.num_seqs)
        if bucket not in self.graphs:
            self._capture(bucket)
        graph, static, decode = self.graphs[bucket]
        host = pad_decode_metadata(meta, bucket, self.scratch_page)
        ids = torch.zeros(1, bucket, dtype=torch.long)
        ids[0, : len(tokens)] = torch.tensor(tokens)
        static["ids"].copy_(ids, non_blocking=True)
        static["positions"].copy_(host.positions[None], non_blocking=True)
        static["slots"].copy_(host.slots, non_blocking=True)
        decode.plan(host)
        graph.replay()
        return static["logits"][0, : meta.num_seqs].float()
