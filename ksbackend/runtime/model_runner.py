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

A step under a ``record`` selection also keeps its logits (HF's ``output_scores`` / ``output_logits``), and its rows
that have emitted an eos go on with the pad token as input, as HF's loop runs finished rows.

Both return the selected tokens as a device tensor; nothing here waits for the GPU.
"""

import collections
import contextlib
import dataclasses
import logging

from dataclasses import dataclass

import torch

from .context import ForwardContext
from .context import forward_context
from .cuda_graphs import CudaGraphRunner
from .metadata import DecodeMetadata
from .metadata import decode_step_metadata

log = logging.getLogger("ksbackend")


@dataclass
class RowParams:
    """A sequence's token-selection settings (plain values; the runner keeps them as device tensors, named
    as ``kernelstack::sample`` takes them). The defaults turn each one off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    greedy: bool = True


# the dtypes of kernelstack::sample's per-row arguments that are not float32 (ops.sampling.SamplingParams uses it too)
SAMPLER_DTYPES = {"top_k": torch.int64, "greedy": torch.bool}


def sampler_columns(params: list[RowParams]) -> dict:
    """Rows' settings as host tensors, one per ``kernelstack::sample`` argument (what prefill sends to the device
    and what the decode buffers hold)."""
    return {f.name: torch.tensor([getattr(p, f.name) for p in params], dtype=SAMPLER_DTYPES.get(f.name, torch.float32))
            for f in dataclasses.fields(RowParams)}


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (the first maximum of each row) in two stages: chunk maxima, then the best chunk.
    torch reduces each row of an arg-reduction in one thread block: over Llama-3's 128256 logits that is a 35 us
    kernel on an H100 at batch 1 and 32, where a max over 256-token chunks spreads the row over the GPU."""
    vocab = logits.shape[-1]
    chunk = next((c for c in (256, 512, 128) if vocab % c == 0 and vocab >= 16 * c), None)
    if chunk is None:
        return logits.argmax(-1)
    best, within = logits.unflatten(-1, (vocab // chunk, chunk)).max(-1)  # the first maximum of each chunk
    which = best.argmax(-1, keepdim=True)  # the first chunk holding the row's maximum
    return (which * chunk + within.gather(-1, which)).squeeze(-1)


def greedy_step(logits, ids, lens, kv_lens, active) -> None:
    """The end of a plain greedy step: ``ids = argmax(logits)`` (the first maximum) as the next inputs, and the
    lengths advanced to ``kv_lens * active`` (padding rows stay at 0). On CUDA two Triton launches instead of eight
    torch kernels (kernels/greedy_step.py); this torch form is their reference."""
    from ..kernels import step_kernels_enabled

    if logits.is_cuda and step_kernels_enabled():
        from ..kernels.greedy_step import greedy_step_triton

        return greedy_step_triton(logits if logits.stride(-1) == 1 else logits.contiguous(), ids, lens, kv_lens,
                                  active)
    ids.copy_(first_argmax(logits))
    lens.copy_(kv_lens * active)


@dataclass(frozen=True)
class Selection:
    """What choosing this step's tokens takes beyond an argmax; each combination is a graph of its own."""

    sampling: bool = False  # some row draws at random
    penalties: bool = False  # some row has a repetition / frequency / presence penalty (token counts kept)
    ban_eos: bool = False  # some row may not end yet (min_new_tokens): its eos logits are -inf
    bitmask: bool = False  # rows are constrained by an allowed-token bitmask (a grammar), set before each step
    record: bool = False  # the step's logits are kept, and rows past an eos go on with the pad token

    @property
    def argmax_only(self) -> bool:
        return not (self.sampling or self.penalties or self.bitmask)

    @property
    def label(self) -> str:
        return "+".join(f.name for f in dataclasses.fields(self) if getattr(self, f.name)) or "argmax"


@dataclass
class NewRow:
    """A sequence entering the decode batch: its id in the pool, its tokens so far and its settings.
    ``seen`` are the tokens its penalties count (HF counts the padded prompt); ``fork_of`` (an index into
    the same prefill's rows) makes it a copy of that row's prompt: prefilled once, full pages shared."""

    seq_id: object
    tokens: list
    params: RowParams
    seen: list = None
    generated: int = 0  # tokens generated before this admission (a preempted sequence resumes)
    min_new_tokens: int = 0
    bitmask: torch.Tensor = None  # allowed tokens for its next token, packed int32 (grammar rows)
    fork_of: int = None


class DecodeBuffers:
    """The decode batch on the device: ``capacity`` rows of fixed buffers (a graph captures their
    addresses). Rows past the live ones are padding: their page-table row is the scratch page and their
    length stays 0, so they attend to one scratch slot and write only there."""

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
        self.params = {f.name: zeros(capacity, dtype=SAMPLER_DTYPES.get(f.name, torch.float32))
                       for f in dataclasses.fields(RowParams)}
        self.generated = zeros(capacity, dtype=torch.int32)  # tokens generated so far (eos ban)
        self.min_new = zeros(capacity, dtype=torch.int32)
        self.done = zeros(capacity, dtype=torch.bool)  # has emitted an eos (record steps feed it the pad token)
        self.counts = None  # [capacity, vocab] int32 token counts, made when a penalty first needs them
        self.bitmask = None  # [capacity, ceil(vocab / 32)] int32, made when a grammar first needs it
        # host mirrors of what the host wrote: planned decode kernels build their plan from these
        self.table_host = torch.full((capacity, width), scratch_page, dtype=torch.int32)
        self.lens_host = torch.zeros(capacity, dtype=torch.int32)

    def row_tensors(self):
        lazy = [t for t in (self.counts, self.bitmask) if t is not None]
        return [self.ids, self.lens, self.active, self.table, self.generated, self.min_new, self.done,
                *self.params.values(), *lazy]

    def clear(self, start, stop, host=True) -> None:
        """Make rows [start, stop) padding (on the device; and in the host mirrors unless ``host`` is False)."""
        self.lens[start:stop] = 0
        self.active[start:stop] = 0
        self.table[start:stop] = self.scratch_page
        if host:
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

    def put(self, start: int, rows: list[NewRow], lengths: list[int], page_lists: list[list[int]]) -> None:
        """Rows ``start...`` hold ``rows``: ``lengths`` cached tokens in ``page_lists`` (first tokens come separately).
        One copy per buffer for all of them; host-to-device copies from pageable memory are staged at once, so the
        host never waits for the GPU."""
        stop = start + len(rows)
        table = torch.full((len(rows), self.width), self.scratch_page, dtype=torch.int32)
        for i, pages in enumerate(page_lists):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.table_host[start:stop] = table
        self.lens_host[start:stop] = torch.tensor(lengths, dtype=torch.int32)
        columns = [(self.table, table), (self.lens, self.lens_host[start:stop]),
                   (self.active, torch.ones(len(rows), dtype=torch.int32)),
                   (self.generated, torch.tensor([r.generated + 1 for r in rows], dtype=torch.int32)),
                   (self.min_new, torch.tensor([r.min_new_tokens for r in rows], dtype=torch.int32))]
        columns += [(self.params[k], v) for k, v in sampler_columns([r.params for r in rows]).items()]
        for target, values in columns:
            target[start:stop].copy_(values, non_blocking=True)

    def add_pages(self, row: int, first: int, pages: list[int]) -> None:
        chunk = torch.tensor(pages, dtype=torch.int32)
        self.table_host[row, first : first + len(pages)] = chunk
        self.table[row, first : first + len(pages)].copy_(chunk, non_blocking=True)


class ModelRunner:
    def __init__(self, forward_prefill, forward_decode, pool, attention, capacity, buckets, cuda_graphs, width,
                 vocab_size, model_scope=contextlib.nullcontext):
        """``forward_prefill(ids [1, N], positions [1, N], keep [K]) -> logits [1, K, V]`` and
        ``forward_decode(ids [1, B], positions [1, B]) -> logits [1, B, V]`` are the compiled forwards;
        ``model_scope()`` is entered around every forward call (the model's attention implementation)."""
        self.forward_prefill, self.forward_decode = forward_prefill, forward_decode
        self.pool, self.attention, self.model_scope = pool, attention, model_scope
        self.device = pool.device
        self.scratch_page = pool.alloc(1)[0]  # padding rows read and write only here
        self.buffers = DecodeBuffers(capacity, width, pool.page_size, self.scratch_page, self.device)
        self.buckets = tuple(b for b in buckets if b <= capacity)
        self.vocab_size = vocab_size
        self.graphs = {}  # Selection -> CudaGraphRunner, made on first use
        self.eager_reason = ("not on a GPU" if self.device.type != "cuda" else "cuda_graphs=False" if not cuda_graphs
                             else "the reference attention path" if attention is None else None)
        self.eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        self.pad_token = torch.zeros((), dtype=torch.int64, device=self.device)
        self.recorded = None  # the list record steps append their fp32 logits [n, V] to (see ``record``)
        self._decode_attention = {}  # bucket (or None: eager) -> the decode kernel object
        self.rng = (torch.zeros(1, dtype=torch.int64, device=self.device),  # seed, offset of the sampler's stream
                    torch.zeros(1, dtype=torch.int64, device=self.device))
        self._parked = None
        self._plan_uploaded = {}
        self.stats = collections.Counter()
        self.live = 0  # rows of the decode batch in use (the rest are padding)

    # -- the decode batch -----------------------------------------------------------------------------
    def add_rows(self, rows: list[NewRow], first_tokens: torch.Tensor, counts: torch.Tensor = None) -> None:
        """Append rows whose pages already hold their tokens; ``first_tokens`` (device) are their next inputs,
        ``counts`` their penalty counts so far (from ``prefill``)."""
        start, buf = self.live, self.buffers
        seqs = [self.pool.sequences[row.seq_id] for row in rows]
        buf.put(start, rows, [s.length for s in seqs], [s.pages for s in seqs])
        buf.ids[start : start + len(rows)].copy_(first_tokens)
        buf.done[start : start + len(rows)] = self.eos_mask[first_tokens]  # read by record steps
        if counts is not None:
            if buf.counts is None:
                buf.counts = torch.zeros(buf.capacity, self.vocab_size, dtype=torch.int32, device=self.device)
            buf.counts[start : start + len(rows)] = counts
        self.live += len(rows)

    def set_eos(self, token_ids) -> None:
        """The tokens ``min_new_tokens`` bans until a row has generated enough, and after which a record step
        feeds a row the pad token."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[list(token_ids)] = True
        self.eos_mask.copy_(mask, non_blocking=True)

    def record(self, into: list | None = None, pad_token: int = 0) -> None:
        """Steps under a ``record`` selection append their fp32 logits [rows, V] (rows in batch order) to ``into``
        (None: stop keeping them), and rows that have emitted an eos (``set_eos``) go on with ``pad_token``."""
        self.recorded = into
        self.pad_token.fill_(pad_token)

    def set_bitmask(self, bitmask: torch.Tensor) -> None:
        """The allowed tokens of rows 0..n-1 for the next step (host int32 [n, ceil(vocab / 32)])."""
        buf = self.buffers
        if buf.bitmask is None:
            buf.bitmask = torch.full((buf.capacity, -(-self.vocab_size // 32)), -1, dtype=torch.int32,
                                     device=self.device)
        buf.bitmask[: len(bitmask)].copy_(bitmask, non_blocking=True)

    def keep_rows(self, order: list[int]) -> None:
        """Keep only rows ``order`` (in that order), compacted to the front."""
        if order == list(range(self.live)):
            return
        self.buffers.keep(order, self.live)
        self.live = len(order)

    def extend_pages(self, row: int, seq_id, new_pages: list[int]) -> None:
        """Row ``row``'s sequence got ``new_pages`` (the last of its pages in the pool): append them to its
        page-table row."""
        if new_pages:
            first = len(self.pool.sequences[seq_id].pages) - len(new_pages)
            self.buffers.add_pages(row, first, new_pages)

    def advance_host(self, n: int) -> None:
        """The host mirror of the lengths after a decode step of the first ``n`` rows."""
        self.buffers.lens_host[:n] += 1

    # -- steps ------------------------------------------------------------------------------------------
    def prefill(self, rows: list[NewRow], selection: Selection):
        """Run new sequences' tokens (pages reserved for those not forked); returns (each row's next token, the
        rows' penalty counts or None). A forked row copies its source's prompt pages instead of running it."""
        run = [r for r in rows if r.fork_of is None]
        logits = self._prefill_logits(run)
        for row in rows:
            if row.fork_of is not None:
                self.pool.fork(rows[row.fork_of].seq_id, row.seq_id)
        if len(run) < len(rows):
            position = {id(r): i for i, r in enumerate(run)}
            index = [position[id(rows[r.fork_of] if r.fork_of is not None else r)] for r in rows]
            logits = logits.index_select(0, torch.tensor(index).to(self.device, non_blocking=True))
        params = {k: v.to(self.device, non_blocking=True) for k, v in sampler_columns([r.params for r in rows]).items()}
        counts = bitmask = generated = min_new = None
        if selection.penalties:
            counts = torch.zeros(len(rows), self.vocab_size, dtype=torch.int32, device=self.device)
            for i, row in enumerate(rows):
                seen = torch.tensor(row.seen if row.seen is not None else row.tokens).to(self.device, non_blocking=True)
                counts[i].index_add_(0, seen, torch.ones_like(seen, dtype=torch.int32))
        if selection.ban_eos:
            generated, min_new = (torch.tensor([getattr(r, name) for r in rows], dtype=torch.int32)
                                  .to(self.device, non_blocking=True) for name in ("generated", "min_new_tokens"))
        if selection.bitmask:
            bitmask = torch.stack([r.bitmask for r in rows]).to(self.device, non_blocking=True)
        tokens = self._select(logits, params, selection, counts, generated, min_new, bitmask)
        if selection.record:
            self.recorded.append(logits.to(torch.float32, copy=True))
        if counts is not None:
            counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))
        return tokens, counts

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

    def decode(self, n: int, selection: Selection) -> torch.Tensor:
        """One token for rows 0..n-1; returns them (a device view, valid until the next step)."""
        if self.eager_reason is not None:
            self.stats["eager"] += 1
            return self._kept(self._decode_step(n, selection, graphed=False), n, selection)
        if selection not in self.graphs:
            self.graphs[selection] = CudaGraphRunner(lambda b: self._decode_step(b, selection, graphed=True),
                                                     self.buckets, before_capture=self._park,
                                                     after_capture=self._unpark, label=selection.label)
        runner = self.graphs[selection]
        bucket = runner.bucket_for(n)
        if bucket is None:
            self.stats["eager"] += 1
            return self._kept(self._decode_step(n, selection, graphed=False), n, selection)
        if self.attention.decode_needs_plan:
            self._plan(bucket)
        self.stats[bucket] += 1
        return self._kept(runner.run(bucket), n, selection)

    def _kept(self, out, n: int, selection: Selection) -> torch.Tensor:
        """A step's tokens for rows 0..n-1; a record step's logits are copied out first (a graph writes the next
        replay's into the same memory), on the device: nothing waits for the GPU."""
        if not selection.record:
            return out[:n]
        tokens, logits = out
        self.recorded.append(logits[:n].to(torch.float32, copy=True))
        return tokens[:n]

    def graphs_captured(self) -> int:
        return sum(len(r.graphs) for r in self.graphs.values())

    def describe_graphs(self) -> str:
        """How many decode graphs are captured, how long capturing took, and the device memory their pools hold."""
        runners = [r for r in self.graphs.values() if r.graphs]
        return (f"CUDA graphs: {self.graphs_captured()} captured in {sum(r.capture_seconds for r in runners):.1f} s, "
                f"{sum(r.memory_bytes() for r in runners) / 2**20:.0f} MiB in their memory pools")

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

    def _decode_step(self, n: int, selection: Selection, graphed: bool):
        """The decode step over rows 0..n-1 of the buffers: run the model, select the tokens, write them as the
        next inputs and advance the lengths and counts. Under a graph every line here is a captured kernel; the
        host adds nothing per step. A record step also returns its logits, and feeds finished rows the pad token."""
        buf = self.buffers
        logits = self._decode_logits(n, graphed)
        if selection == Selection():  # plain greedy: the token and the lengths' advance, fused
            greedy_step(logits, buf.ids[:n], buf.lens[:n], buf.kv_lens[:n], buf.active[:n])
            return buf.ids[:n]
        counts = buf.counts[:n] if selection.penalties else None
        bitmask = buf.bitmask[:n] if selection.bitmask else None
        tokens = self._select(logits, {k: v[:n] for k, v in buf.params.items()}, selection, counts,
                              buf.generated[:n], buf.min_new[:n], bitmask)
        if selection.record:  # as HF's loop: a finished row's next token is the pad token, whatever it drew
            tokens = torch.where(buf.done[:n], self.pad_token, tokens)
            buf.done[:n] |= self.eos_mask[tokens]
        buf.ids[:n].copy_(tokens)
        buf.lens[:n].copy_(buf.kv_lens[:n] * buf.active[:n])
        if selection.ban_eos:
            buf.generated[:n] += buf.active[:n]
        if counts is not None:
            counts.scatter_add_(1, tokens[:, None], buf.active[:n, None])
        return (buf.ids[:n], logits) if selection.record else buf.ids[:n]

    def _decode_logits(self, n: int, graphed: bool) -> torch.Tensor:
        """Derive this step's positions, slots and lengths from the buffers, then run the model: logits [n, V]."""
        buf, page = self.buffers, self.pool.page_size
        positions, slots, kv_lens = buf.positions[:n], buf.slots[:n], buf.kv_lens[:n]
        decode_step_metadata(buf.lens[:n], buf.table[:n], page, positions, slots, kv_lens)
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
        self._parked = [t[:bucket].clone() for t in self.buffers.row_tensors()] + [self.rng[1].clone()]
        self.buffers.clear(0, bucket, host=False)  # the host mirrors still describe the live rows the plans use

    def _unpark(self, bucket):
        *rows, offset = self._parked
        for t, saved in zip(self.buffers.row_tensors(), rows):
            t[:bucket].copy_(saved)
        self.rng[1].copy_(offset)
        self._parked = None

    def reseed(self, seed: int) -> None:
        """Start the sampler's counter-based random stream at ``seed`` (a generate call draws it from torch's
        default generator, so ``torch.manual_seed`` reproduces a run)."""
        self.rng[0].fill_(seed)
        self.rng[1].zero_()

    def _select(self, logits, params, selection: Selection, counts=None, generated=None, min_new=None, bitmask=None):
        """Next token per row: argmax, or the fused sampler (penalties, bitmask, the draw; per-row device
        parameters, greedy rows take the argmax inside it). The random offset advances on the device, so every
        graph replay draws anew."""
        if selection.ban_eos:
            logits = logits.masked_fill((generated < min_new)[:, None] & self.eos_mask, float("-inf"))
        if selection.argmax_only:
            return first_argmax(logits)
        seed, offset = self.rng
        tokens = torch.ops.kernelstack.sample(logits, **params, token_counts=counts, allowed_bitmask=bitmask, seed=seed,
                                              offset=offset)
        if selection.sampling:
            offset.add_(1)
        return tokens
