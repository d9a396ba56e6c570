"""The decode loop: admission in waves, one-step-late token reads, and the overlap that keeps the host
off the GPU's critical path.

Every iteration the host (1) retires rows that are done, (2) admits waiting sequences while slots and
pages allow (one ragged prefill for all of them), (3) reserves pages ahead for the rows that go on, and
(4) enqueues one decode step. Only then does it read the tokens of the *previous* step, through a
non-blocking copy it queued behind that step: by the time it waits, the GPU is already busy with the
step just enqueued, so the host's work (bookkeeping, stop checks, streamers) overlaps the GPU's.
A row whose stop is seen one step late has run one extra step; that token is dropped.

A batch larger than the pool or the batch limit runs in waves: sequences are admitted as pages and
rows free up. If a running row cannot get its next page, the youngest row is preempted (its pages
freed, its prompt and tokens so far re-queued for a later prefill); only a sequence that can never fit
the whole pool is an error, raised before any work.

A run that records (HF's ``output_scores`` / ``output_logits``) keeps every step's logits: it prefills all its
sequences at once and runs them together until all are done, finished rows on the pad token, as HF's loop does, so
step t of every row is the runner's t-th recorded step (``why_not_together`` says when a batch cannot run so).
"""

import collections
import time

from dataclasses import dataclass
from dataclasses import field

import torch

from .model_runner import NewRow
from .model_runner import RowParams
from .model_runner import Selection


@dataclass
class Request:
    """One sequence to generate. ``accept(token)`` sees every generated token in order (one step late, or at
    once under a ``constraint``) and returns True when the sequence must stop there (eos, a criterion).

    ``seen``: the tokens its penalties count besides what it generates (HF counts the padded prompt).
    ``fork_of``: another request with the same prompt (``num_return_sequences``): admitted together, the
    prompt is prefilled once and its pages shared. ``constraint``: an object whose ``bitmask()`` gives the
    packed allowed tokens for the next token (a grammar); such requests run step by step (see ``run``)."""

    prompt: list
    max_new_tokens: int
    params: RowParams
    accept: object
    seen: list = None
    min_new_tokens: int = 0
    fork_of: object = None
    constraint: object = None
    generated: list = field(default_factory=list)
    done: bool = False

    @property
    def penalized(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


@dataclass
class _Row:
    request: Request
    seq_id: int
    issued: int  # tokens computed or in flight for this row since it was (re)admitted, counting the prefill's
    base: int  # tokens the request had generated when this row was admitted
    finished: bool = False

    @property
    def cached(self) -> int:
        """Tokens in the row's cache before its next decode step writes one more."""
        return len(self.request.prompt) + self.base + self.issued - 1

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - self.base - self.issued


@dataclass
class LoopStats:
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0
    token_waits: int = 0
    host_seconds: float = 0.0
    wait_seconds: float = 0.0


class Scheduler:
    def __init__(self, runner, max_rows: int, max_prefill_tokens: int, reserve_tokens: int):
        self.runner, self.pool = runner, runner.pool
        self.max_rows, self.max_prefill_tokens, self.reserve_tokens = max_rows, max_prefill_tokens, reserve_tokens
        self._next_seq_id = 0

    def check_fits(self, requests) -> None:
        """A sequence that could never fit the pool, even alone, is an error before any work starts."""
        if self.pool.growable:
            return
        usable = self.pool.num_pages - 1  # the scratch page
        for r in requests:
            need = self.pool.pages_for(len(r.prompt) + r.max_new_tokens)
            if need > usable:
                raise self.pool.exhausted_error(need, f"a sequence of {len(r.prompt)} prompt tokens + "
                                                      f"{r.max_new_tokens} new tokens")

    def run(self, requests: list[Request], eos=(), record: list | None = None, pad_token: int = 0) -> LoopStats:
        """Generate every request. Constrained requests (a grammar) need each token before the next step's
        allowed set exists, so with them the loop reads every step's tokens at once instead of one step late.
        ``record``: a list that gets each step's fp32 logits [len(requests), V] (device tensors, rows in
        ``requests`` order; steps past the last token may follow), finished rows running on ``pad_token``."""
        self.check_fits(requests)
        if any(not r.params.greedy for r in requests):
            self.runner.reseed(int(torch.randint(0, 2**62, (1,))))
        if any(r.min_new_tokens for r in requests) or record is not None:
            self.runner.set_eos(eos)
        self.runner.record(record, pad_token)
        lockstep = any(r.constraint is not None for r in requests)
        stats = LoopStats()
        waiting = collections.deque(requests)
        running: list[_Row] = []
        inflight = collections.deque()  # (host tokens, event or None, rows in that step's order)
        start = time.perf_counter()
        try:
            while waiting or running or inflight:
                running = self._retire(running)
                if waiting and len(running) < self.max_rows and self._admit(waiting, running, stats, inflight):
                    while lockstep and inflight:  # a grammar's next allowed set needs the prefill's tokens now
                        self._process(inflight.popleft(), stats)
                    running = self._retire(running)
                if waiting and not running and not inflight:  # nothing holds pages, yet the next one cannot start
                    need = self.pool.pages_for(len(waiting[0].prompt) + waiting[0].max_new_tokens)
                    raise self.pool.exhausted_error(need, "the next sequence")
                if running:
                    running = self._reserve(running, waiting, inflight, stats)
                if running:
                    n = len(running)
                    selection = self._selection([(r.request, r.base + r.issued) for r in running])
                    if selection.bitmask:
                        self.runner.set_bitmask(torch.stack([r.request.constraint.bitmask() for r in running]))
                    tokens = self.runner.decode(n, selection)
                    self.runner.advance_host(n)
                    for row in running:
                        row.issued += 1
                    inflight.append(self._copy_back(tokens, list(running)))
                    stats.decode_steps += 1
                # one step late: read everything but the step just enqueued (all of it when nothing is running)
                while len(inflight) > (1 if running and not lockstep else 0):
                    self._process(inflight.popleft(), stats)
        finally:
            for row in running:
                self.pool.release(row.seq_id)
            self.runner.keep_rows([])
            self.runner.record(None)
        stats.host_seconds = time.perf_counter() - start - stats.wait_seconds
        return stats

    def why_not_together(self, requests) -> str | None:
        """Why ``requests`` cannot run as one batch from a single prefill to their last token (what a recording run
        needs), or None: more rows than a decode batch, or more KV pages than the pool has (each row's whole length,
        and the page per running row that admission keeps free)."""
        if len(requests) > self.max_rows:
            return f"{len(requests)} sequences, more than one decode batch ({self.max_rows})"
        need = sum(self.pool.pages_for(len(r.prompt) + r.max_new_tokens) + 1 for r in requests)
        if not self.pool.growable and need > self.pool.num_pages - 1:
            return f"{need} KV pages at once, more than the pool's {self.pool.num_pages - 1}"
        return None

    @property
    def _recording(self) -> bool:
        return self.runner.recorded is not None

    # -- pieces of one iteration --------------------------------------------------------------------------
    def _retire(self, running):
        """Drop the rows that are done; while recording, finished rows stay until every row is done."""
        together = self._recording and any(not r.finished and r.remaining > 0 for r in running)
        keep = [i for i, r in enumerate(running) if r.remaining > 0 and (not r.finished or together)]
        if len(keep) == len(running):
            return running
        for i, row in enumerate(running):
            if i not in keep:
                self.pool.release(row.seq_id)  # later work reuses the pages strictly after this row's last step
        self.runner.keep_rows(keep)
        return [running[i] for i in keep]

    def _admit(self, waiting, running, stats, inflight):
        rows, budget = [], float("inf") if self._recording else self.max_prefill_tokens  # recording: one prefill
        while waiting and len(running) + len(rows) < self.max_rows:
            request = waiting[0]
            tokens = request.prompt + request.generated
            if rows and len(tokens) > budget:
                break
            reserve = len(tokens) + min(self.reserve_tokens, request.max_new_tokens - len(request.generated))
            headroom = len(running) + len(rows)  # a page each for the rows already running, so they keep going
            if self.pool.pages_for(reserve) + headroom > self.pool.allocator.num_free and not self.pool.growable:
                break
            seq_id = self._new_seq_id()
            if not self._forks_here(request, rows):
                self.pool.reserve(seq_id, reserve)
                budget -= len(tokens)
            rows.append((waiting.popleft(), seq_id, tokens))
        if not rows:
            return []
        index = {id(request): i for i, (request, _, _) in enumerate(rows)}
        new = [NewRow(seq_id, tokens, request.params, seen=(request.seen or request.prompt) + request.generated,
                      generated=len(request.generated), min_new_tokens=request.min_new_tokens,
                      bitmask=request.constraint.bitmask() if request.constraint is not None else None,
                      fork_of=index.get(id(request.fork_of)) if not request.generated else None)
               for request, seq_id, tokens in rows]
        first, counts = self.runner.prefill(new, self._selection([(r, len(r.generated)) for r, _, _ in rows]))
        self.runner.add_rows(new, first, counts)
        admitted = [_Row(request, seq_id, issued=1, base=len(request.generated)) for request, seq_id, _ in rows]
        running.extend(admitted)
        inflight.append(self._copy_back(first, admitted))
        stats.prefill_steps += 1
        return admitted

    @staticmethod
    def _forks_here(request, rows) -> bool:
        """Will this request copy the prompt pages of one admitted in the same prefill (so needs none now)?"""
        return request.fork_of is not None and not request.generated and any(r is request.fork_of for r, _, _ in rows)

    def _selection(self, rows) -> Selection:
        """What this step's token selection needs, from (request, tokens it has generated before this step)."""
        return Selection(sampling=any(not r.params.greedy for r, _ in rows),
                         penalties=any(r.penalized for r, _ in rows),
                         ban_eos=any(done < r.min_new_tokens for r, done in rows),
                         bitmask=any(r.constraint is not None for r, _ in rows), record=self._recording)

    def _reserve(self, running, waiting, inflight, stats):
        """Pages for every row's next token, reserved ahead in chunks; preempt the youngest rows if the pool is full."""
        i = 0
        while i < len(running):
            row = running[i]
            needed = row.cached + 1
            seq = self.pool.sequences[row.seq_id]
            if self.pool.pages_for(needed) <= len(seq.pages):
                i += 1
                continue
            want = min(needed + self.reserve_tokens, row.cached + row.remaining)
            if self.pool.pages_for(want) - len(seq.pages) <= self.pool.allocator.num_free or self.pool.growable:
                self.runner.extend_pages(i, row.seq_id, self.pool.reserve(row.seq_id, want))
                i += 1
                continue
            running = self._preempt(running, waiting, inflight, stats)
            i = 0  # rows may have moved; start over (rows already served skip quickly)
        return running

    def _preempt(self, running, waiting, inflight, stats):
        """Free the youngest row's pages and re-queue its sequence (prompt + tokens so far) at the front.
        Its tokens are needed on the host first, so this waits for every step in flight (rare)."""
        while inflight:
            self._process(inflight.popleft(), stats)
        running = self._retire(running)
        if not running:
            return running
        victim = running[-1]
        self.pool.release(victim.seq_id)
        self.runner.keep_rows(list(range(len(running) - 1)))
        waiting.appendleft(victim.request)
        stats.preemptions += 1
        return running[:-1]

    def _copy_back(self, tokens, rows):
        if tokens.device.type != "cuda":
            return tokens.tolist(), None, rows
        host = tokens.to("cpu", non_blocking=True)  # into pinned memory, behind the step that makes them
        event = torch.cuda.Event()
        event.record()
        return host, event, rows

    def _process(self, entry, stats):
        host, event, rows = entry
        if event is not None:
            begin = time.perf_counter()
            event.synchronize()
            stats.wait_seconds += time.perf_counter() - begin
            stats.token_waits += 1
            host = host.tolist()
        for row, token in zip(rows, host):
            if row.finished:
                continue  # the extra step of a row whose stop we saw one step late
            request = row.request
            request.generated.append(token)
            if request.accept(token) or len(request.generated) >= request.max_new_tokens:
                row.finished = request.done = True

    def _new_seq_id(self):
        self._next_seq_id += 1
        return self._next_seq_id
