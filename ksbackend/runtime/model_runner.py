"""The model runner: one model on one device, one step at a time.

It owns the KV pool, the attention backend (FlashInfer on CUDA, the reference elsewhere), the compiled
forward and the decode graphs, and knows nothing of Hugging Face's generate semantics. Two steps:

- ``prefill(rows)``: new sequences, ragged (no padding), run eagerly; the next token of each row is
  selected on the device.
- ``decode(n)``: one token for each of the first ``n`` rows of the decode batch. The batch lives on the
  device in fixed buffers (``DecodeBuffers``): input ids, cache lengths, the page table, sampling
  parameters. A decode step reads them, writes the next ids and advances the lengths itself, so a step
  replayed from a CUDA graph needs nothing from the host: the host can enqueue step N+1 while the GPU
  still runs step N. Token selection (argmax, or the sampler) is part of the step.

Both return the selected tokens as a device tensor; nothing here waits for the GPU.
"""

import collections
import contextlib
import logging
from dataclasses import dataclass

import torch

from .context import ForwardContext, forward_context
from .cuda_graphs import CudaGraphRunner
from .metadata import DecodeMetadata

log = logging.getLogger("ksbackend")


@dataclass
class RowParams:
    """A sequence's token-selection settings (plain values; the runner keeps them as device tensors)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


@dataclass
class NewRow:
    """A sequence entering the decode batch: its id in the pool, its tokens so far and its settings."""

    seq_id: int
    tokens: list
    params: RowParams


class DecodeBuffers:
    """The decode batch on the device: ``capacity`` rows of fixed buffers (a graph captures their
    addresses). Rows past the live ones are padding: their page-table row is the scratch page and their
    length stays 0, so they attend to one scratch slot and write only there."""

    PARAMS = {"greedy": torch.bool, "temperature": torch.float32, "top_k": torch.int64, "top_p": torch.float32,
              "min_p": torch.float32}

    def __init__(self, capacity, width, page_size, scratch_page, device):
        self.capacity, self.width, self.page_size, self.scratch_page = capacity, width, page_size, scratch_page
        self.device = device

        def zeros(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.ids = zeros(capacity, dtype=torch.int64)  # next step's input token
        self.lens = zeros(capacity, dtype=torch.int32)  # tokens already in the cache
        self.active = zeros(capacity, dtype=torch.int32)
        self.table = torch.full((capacity, width), scratch_page, dtype=torch.int32, device=device)
        self.positions = zeros(capacity, dtype=torch.int64)  # per-step values the step itself derives
        self.slots = zeros(capacity, dtype=torch.int64)
        self.kv_lens = zeros(capacity, dtype=torch.int32)
        self.params = {name: zeros(capacity, dtype=dtype) for name, dtype in self.PARAMS.items()}
        # host mirrors of what the host wrote: planned decode kernels build their plan from these
        self.table_host = torch.full((capacity, width), scratch_page, dtype=torch.int32)
        self.lens_host = torch.zeros(capacity, dtype=torch.int32)

    def row_tensors(self):
        return [self.ids, self.lens, self.active, self.table, *self.params.values()]

    def clear(self, start, stop) -> None:
        """Make rows [start, stop) padding."""
        self.lens[start:stop] = 0
        self.active[start:stop] = 0
        self.table[start:stop] = self.scratch_page
        self.table_host[start:stop] = self.scratch_page
        self.lens_host[start:stop] = 0

    def keep(self, order: list[int], live: int) -> None:
        """Rows ``order`` (old indices) become rows 0..len(order)-1; the rest of the first ``live`` become padding."""
        index = torch.tensor(order, dtype=torch.int64)
        device_index = index.to(self.device, non_blocking=True)
        for t in self.row_tensors():
            t[: len(order)] = t.index_select(0, device_index)
        self.table_host[: len(order)] = self.table_host.index_select(0, index)
        self.lens_host[: len(order)] = self.lens_host.index_select(0, index)
        self.clear(len(order), live)

    def put(self, row: int, length: int, pages: list[int], params: RowParams) -> None:
        """Row ``row`` holds a sequence of ``length`` cached tokens in ``pages`` (its first token comes separately)."""
        table = torch.full((self.width,), self.scratch_page, dtype=torch.int32)
        table[: len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.table_host[row] = table
        self.lens_host[row] = length
        # Host-to-device copies from pageable memory are staged at once: the host never waits for the GPU.
        self.table[row].copy_(table, non_blocking=True)
        targets = [(self.lens, length), (self.active, 1)] + [(self.params[k], v) for k, v in vars(params).items()]
        for target, value in targets:
            target[row : row + 1].copy_(torch.tensor([value], dtype=target.dtype), non_blocking=True)

    def add_pages(self, row: int, first: int, pages: list[int]) -> None:
        chunk = torch.tensor(pages, dtype=torch.int32)
        self.table_host[row, first : first + len(pages)] = chunk
        self.table[row, first : first + len(pages)].copy_(chunk, non_blocking=True)


class ModelRunner:
    def __init__(self, forward_prefill, forward_decode, pool, attention, capacity, buckets, cuda_graphs, width,
                 model_scope=contextlib.nullcontext):
        """``forward_prefill(ids [1, N], positions [1, N], keep [K]) -> logits [1, K, V]`` and
        ``forward_decode(ids [1, B], positions [1, B]) -> logits [1, B, V]`` are the compiled forwards;
        ``model_scope()`` is entered around every forward call (the model's attention implementation)."""
        self.forward_prefill, self.forward_decode = forward_prefill, forward_decode
        self.pool, self.attention, self.model_scope = pool, attention, model_scope
        self.device = pool.device
        self.scratch_page = pool.alloc(1)[0]  # padding rows read and write only here
        self.buffers = DecodeBuffers(capacity, width, pool.page_size, self.scratch_page, self.device)
        self.buckets = tuple(b for b in buckets if b <= capacity)
        self.graphs = {}
        self.eager_reason = ("not on a GPU" if self.device.type != "cuda" else "cuda_graphs=False" if not cuda_graphs
                             else "the reference attention path" if attention is None else None)
        if self.eager_reason is None:
            for sampling in (False, True):
                self.graphs[sampling] = CudaGraphRunner(
                    lambda n, s=sampling: self._decode_step(n, s, graphed=True), self.buckets,
                    before_capture=self._park, after_capture=self._unpark)
        self._decode_attention = {}  # bucket (or None: eager) -> the decode kernel object
        self._parked = None
        self._plan_uploaded = {}
        self.stats = collections.Counter()
        self.live = 0  # rows of the decode batch in use (the rest are padding)

    # -- the decode batch -----------------------------------------------------------------------------
    def add_rows(self, rows: list[NewRow], first_tokens: torch.Tensor) -> None:
        """Append rows whose pages already hold their tokens; ``first_tokens`` (device) are their next inputs."""
        start = self.live
        for i, row in enumerate(rows):
            seq = self.pool.sequences[row.seq_id]
            self.buffers.put(start + i, seq.length, seq.pages, row.params)
        self.buffers.ids[start : start + len(rows)].copy_(first_tokens)
        self.live += len(rows)

    def keep_rows(self, order: list[int]) -> None:
        """Keep only rows ``order`` (in that order), compacted to the front."""
        if order == list(range(self.live)):
            return
        self.buffers.keep(order, self.live)
        self.live = len(order)

    def extend_pages(self, row: int, seq_id) -> None:
        """Row ``row``'s sequence got new pages in the pool: put them in its page-table row."""
        pages = self.pool.sequences[seq_id].pages
        first = int((self.buffers.table_host[row] != self.scratch_page).sum())
        if len(pages) > first:
            self.buffers.add_pages(row, first, pages[first:])

    def advance_host(self, n: int) -> None:
        """The host mirror of the lengths after a decode step of the first ``n`` rows."""
        self.buffers.lens_host[:n] += 1

    # -- steps ------------------------------------------------------------------------------------------
    def prefill(self, rows: list[NewRow]) -> torch.Tensor:
        """Run new sequences' tokens (pages must be reserved for them); returns each row's next token."""
        logits = self._prefill_logits(rows)
        params = {name: torch.tensor([getattr(r.params, name) for r in rows], dtype=dtype).to(self.device, non_blocking=True)
                  for name, dtype in DecodeBuffers.PARAMS.items()}
        return select_tokens(logits, params, any(not r.params.greedy for r in rows))

    def _prefill_logits(self, rows: list[NewRow]) -> torch.Tensor:
        meta = self.pool.extend([r.seq_id for r in rows], [len(r.tokens) for r in rows])
        flat = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.int64)
        ids = flat.to(self.device, non_blocking=True)[None]
        positions = meta.positions.to(self.device, non_blocking=True)[None]
        keep = (meta.qo_indptr[1:] - 1).long().to(self.device, non_blocking=True)
        for t in (ids, positions):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        torch._dynamo.maybe_mark_dynamic(keep, 0)
        step_attention = self.attention.plan_prefill(meta) if self.attention is not None else None
        with forward_context(ForwardContext(self.pool, meta.to(self.device), step_attention)), self.model_scope():
            return self.forward_prefill(ids, positions, keep)[0]

    def score(self, prompts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Teacher forcing: the next-token log-probs [B, T, V] (fp32) at each target position, with the targets
        (equal lengths T) fed as inputs through the same prefill and decode paths generate uses."""
        steps = len(targets[0])
        rows = [NewRow(("score", i), p, RowParams()) for i, p in enumerate(prompts)]
        for row in rows:
            self.pool.reserve(row.seq_id, len(row.tokens) + steps)
        try:
            out = [self._prefill_logits(rows).float().log_softmax(-1)]
            self.add_rows(rows, torch.zeros(len(rows), dtype=torch.int64, device=self.device))
            forced = torch.tensor(targets, dtype=torch.int64).to(self.device, non_blocking=True)
            n = len(rows)
            for t in range(steps - 1):
                self.buffers.ids[:n].copy_(forced[:, t])
                out.append(self._decode_logits(n, graphed=False).float().log_softmax(-1))
                self.buffers.lens[:n].copy_(self.buffers.kv_lens[:n])
                self.advance_host(n)
        finally:
            self.keep_rows([])
            for row in rows:
                self.pool.release(row.seq_id)
        return torch.stack(out, dim=1)

    def decode(self, n: int, sampling: bool) -> torch.Tensor:
        """One token for rows 0..n-1; returns them (a device view, valid until the next step)."""
        runner = self.graphs.get(sampling)
        bucket = runner.bucket_for(n) if runner is not None else None
        if bucket is None:
            self.stats["eager"] += 1
            return self._decode_step(n, sampling, graphed=False)
        if self.attention.decode_needs_plan:
            self._plan(bucket)
        self.stats[bucket] += 1
        return runner.run(bucket)[:n]

    def describe_decode(self) -> str:
        """What ran the decode steps so far (and clears the count): graph replays per bucket, eager steps and why."""
        eager = self.stats.pop("eager", 0)
        waits = self.stats.pop("plan_waits", 0)
        replays = ", ".join(f"{n} x bucket {b}" for b, n in sorted(self.stats.items()))
        self.stats.clear()
        parts = [f"graph replays: {replays}"] if replays else []
        if eager:
            parts.append(f"{eager} eager steps ({self.eager_reason or 'batch above the largest bucket'})")
        if waits:
            parts.append(f"{waits} host waits before a decode plan (decode_kernel={self.attention.decode_kernel!r})")
        return "; ".join(parts) or "no decode steps"

    def _plan(self, bucket):
        """Plan a planned decode kernel for this bucket's next replay. FlashInfer stages its plan in a pinned
        host buffer and uploads it asynchronously: before writing that buffer again, wait until the GPU has
        taken the previous upload (an event the host reaches about one step behind the GPU)."""
        uploaded = self._plan_uploaded.get(bucket)
        if uploaded is not None:
            uploaded.synchronize()
            self.stats["plan_waits"] += 1
        self._decode_kernel(bucket).plan(self.buffers.table_host[:bucket], self.buffers.lens_host[:bucket] + 1)
        self._plan_uploaded[bucket] = torch.cuda.Event()
        self._plan_uploaded[bucket].record()

    def _decode_kernel(self, bucket):
        if bucket not in self._decode_attention:
            self._decode_attention[bucket] = self.attention.new_decode(bucket) if self.attention is not None else None
        return self._decode_attention[bucket]

    def _decode_step(self, n: int, sampling: bool, graphed: bool) -> torch.Tensor:
        """The decode step over rows 0..n-1 of the buffers: run the model, select the tokens, write them as the
        next inputs and advance the lengths. Under a graph every line here is a captured kernel; the host adds
        nothing per step."""
        buf = self.buffers
        logits = self._decode_logits(n, graphed)
        tokens = select_tokens(logits, {k: v[:n] for k, v in buf.params.items()}, sampling)
        buf.ids[:n].copy_(tokens)
        buf.lens[:n].copy_(buf.kv_lens[:n] * buf.active[:n])
        return buf.ids[:n]

    def _decode_logits(self, n: int, graphed: bool) -> torch.Tensor:
        """Derive this step's positions, slots and lengths from the buffers, then run the model: logits [n, V]."""
        buf, page = self.buffers, self.pool.page_size
        positions, slots, kv_lens = buf.positions[:n], buf.slots[:n], buf.kv_lens[:n]
        positions.copy_(buf.lens[:n])
        pages = buf.table[:n].gather(1, (positions // page)[:, None])[:, 0]
        slots.copy_(pages * page + positions % page)
        kv_lens.copy_(buf.lens[:n] + 1)
        max_pages = None if graphed else self.pool.pages_for(int(buf.lens_host[:n].max()) + 1)
        meta = DecodeMetadata(slots, kv_lens, buf.table[:n], page, max_pages)
        decode = self._decode_kernel(n if graphed else None)
        if decode is not None and not graphed and self.attention.decode_needs_plan:
            decode.plan(buf.table_host[:n], buf.lens_host[:n] + 1)
        ids, step_positions = buf.ids[:n][None], positions[None]
        for t in (ids, step_positions):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        with forward_context(ForwardContext(self.pool, meta, decode)), self.model_scope():
            return self.forward_decode(ids, step_positions)[0]

    # -- graph capture ----------------------------------------------------------------------------------
    def _park(self, bucket):
        """Warm-up calls before a capture run for real: give them padding rows, keep the live ones aside."""
        self._parked = [t[:bucket].clone() for t in self.buffers.row_tensors()]
        self.buffers.clear(0, bucket)

    def _unpark(self, bucket):
        for t, saved in zip(self.buffers.row_tensors(), self._parked):
            t[:bucket].copy_(saved)
        self._parked = None


def select_tokens(logits: torch.Tensor, params: dict, sampling: bool) -> torch.Tensor:
    """Next token per row: argmax, or the sampler where a row samples (per-row device parameters)."""
    greedy = logits.argmax(-1)
    if not sampling:
        return greedy
    uniform = torch.rand(logits.shape[0], device=logits.device)  # graph-safe: advances on every replay
    sampled = torch.ops.kernelstack.sample(logits.float(), params["temperature"], params["top_k"], params["top_p"],
                                           params["min_p"], uniform)
    return torch.where(params["greedy"], greedy, sampled)
