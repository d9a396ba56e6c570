"""CUDA graphs captured per batch-size bucket.

``CudaGraphRunner`` wraps a callable ``fn(bucket)`` that reads and writes fixed buffers its owner keeps:
it captures the call once per bucket and replays it. It knows nothing of models or engines. Capture
runs the callable twice first (compile, autotune and allocate outside the graph) on a side stream, and
every bucket's graph shares one memory pool: buckets are replayed one at a time, never concurrently.
"""

import time

import torch

from ..compile_cache import progress


class CudaGraphRunner:
    def __init__(self, fn, buckets, before_capture=None, after_capture=None, label="decode"):
        """``before_capture(bucket)`` / ``after_capture(bucket)`` let the owner put harmless values in its
        buffers while the warm-up calls run (they execute for real) and restore them afterwards."""
        self.fn, self.buckets = fn, tuple(buckets)
        self.before_capture, self.after_capture = before_capture, after_capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.memory_pool = torch.cuda.graph_pool_handle()
        self.capture_seconds = 0.0
        self.label = label

    def bucket_for(self, n: int):
        return next((b for b in self.buckets if b >= n), None)

    def capture(self, bucket: int) -> None:
        """Capture ``bucket``'s graph (when a step first needs it: the first token never waits for buckets it
        does not use)."""
        with progress(1, f"kernelstack: capturing the {self.label} graph for batch {bucket}", unit="graph") as bar:
            self._capture(bucket)
            bar.update()

    def _capture(self, bucket: int) -> None:
        start = time.perf_counter()
        if self.before_capture:
            self.before_capture(bucket)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's model may synchronize, allocate or time a GEMM meanwhile (global mode
        # would fail this capture for it); this thread makes no such call while it captures
        with torch.cuda.graph(graph, pool=self.memory_pool, capture_error_mode="thread_local"):
            output = self.fn(bucket)
        self.graphs[bucket] = (graph, output)
        if self.after_capture:
            self.after_capture(bucket)
        self.capture_seconds += time.perf_counter() - start

    def run(self, bucket: int):
        """Replay ``bucket``'s graph (capturing it first if needed); returns what ``fn`` returned at capture."""
        if bucket not in self.graphs:
            self.capture(bucket)
        graph, output = self.graphs[bucket]
        graph.replay()
        return output

    def memory_bytes(self) -> int:
        """Device memory the graphs' private pool holds."""
        pool = tuple(self.memory_pool)
        return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) == pool)
