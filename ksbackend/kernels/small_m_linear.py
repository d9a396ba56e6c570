"""``x @ w.T (+ b)`` for a handful of rows (decode batch 1..8): a Triton GEMV that reads each weight once.

At M = 1 a linear layer is a pure weight stream, and what matters is keeping every SM loading. cuBLAS's
heuristic sometimes picks split-K for such shapes (Llama-3.2-1B's fused q/k/v, 3072 x 2048, ran at 0.9 TB/s on an
H100, plus a separate reduce launch), and sometimes runs near the copy bandwidth (its 8192 x 2048 MLP). So
nothing is assumed: ``choose`` times cuBLAS (and at one row its matrix-vector routine) against a few tile shapes of
this kernel the first time a shape is seen (never during a CUDA-graph capture: the capture's warm-up calls come
first) and keeps the winner, which the explain report lists.

One program owns ``BLOCK_N`` output columns for all ``M`` rows and walks K: no split-K, so no partial sums in
memory and no second launch; a [BLOCK_M, BLOCK_N, BLOCK_K] product summed over K in fp32, as cuBLAS accumulates.
"""

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import threading
import time

import torch
import triton
import triton.language as tl

from ..ops import activation as activation_ops
from . import gemv_prologue_enabled
from . import pdl

log = logging.getLogger("ksbackend")

MAX_ROWS = 8  # above this a GEMM tile reuses each weight load across rows; cuBLAS is the right tool
# (BLOCK_N, BLOCK_K, num_warps): narrow tiles give the many programs a weight stream needs on ~132 SMs
TILES = ((4, 1024, 4), (8, 512, 4), (16, 256, 4), (16, 512, 8))
# one row only (a [rows, BLOCK_N, BLOCK_K] product would spill): a whole 2048-wide K slice per load, so each SM
# has more weight bytes in flight (the 3072 x 2048 qkv ran at 39% of the copy bandwidth with the tiles above)
WIDE_TILES = ((4, 2048, 4), (8, 2048, 8))
TILE_BY_NAME = {f"Triton {n}x{k}/{w}": (n, k, w) for n, k, w in TILES + WIDE_TILES}


@triton.jit
def _k_slice(ptr, rows, n_rows, stride, ks, K):
    """Rows ``rows`` of a row-major [n_rows, K] matrix at columns ``ks``, zero outside it (int64 ``rows`` where
    rows x stride may pass 2**31)."""
    return tl.load(ptr + rows[:, None] * stride + ks[None, :],
                   mask=(rows[:, None] < n_rows) & (ks[None, :] < K), other=0.0)


# what the kernel computes its input from (``PROLOGUE``): the input itself, ``act(gate) * up``, or RMSNorm of the
# input (plus a residual): the producer's launch folded into the GEMV, which reads its input anyway
PLAIN, ACT_MUL, RMS_NORM = 0, 1, 2
ACTIVATIONS = {name: index for index, name in enumerate(activation_ops.ACTIVATIONS)}  # silu 0, gelu_tanh 1


@triton.jit
def _activate(g, ACTIVATION: tl.constexpr):
    """The generated act_and_mul kernel's formulas (so a fused and an unfused step agree)."""
    if ACTIVATION == 0:
        return g / (1.0 + tl.exp(-g))
    return 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * (0.7978845608028654 * (g + 0.044715 * g * g * g)))) - 1.0))


@triton.jit
def _input(x_ptr, aux_ptr, nw_ptr, sum_ptr, x_off, aux_off, sum_off, k_off, mask, K, write_sum,
           PROLOGUE: tl.constexpr, HAS_AUX: tl.constexpr, ACTIVATION: tl.constexpr, WEIGHT_OFFSET: tl.constexpr):
    """One K slice of the GEMV's input in fp32, and the norm's row values there (for its sum of squares).
    ACT_MUL keeps the unfused kernel's rounding points (act(gate) and the product rounded to the input dtype).
    RMS_NORM returns the row times the norm weight, unscaled: the caller applies 1/rms to the dot product at the
    end, so the row is read once, not once for its rms and again for the product (in fp32 throughout, where the
    norm's kernel rounds the normalised row to bf16: the difference is within bf16's own rounding)."""
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    s = x.to(tl.float32)
    if PROLOGUE == 1:
        a = _activate(s, ACTIVATION).to(x.dtype).to(tl.float32)
        out = (a * tl.load(aux_ptr + aux_off, mask=mask, other=0.0).to(tl.float32)).to(x.dtype).to(tl.float32)
    elif PROLOGUE == 2:
        if HAS_AUX:  # HF's residual stream: the sum rounded to the activation dtype; program 0 stores it
            s = (s + tl.load(aux_ptr + aux_off, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            if write_sum:
                tl.store(sum_ptr + sum_off, s, mask=mask)
            s = s.to(tl.float32)
        out = s * (tl.load(nw_ptr + k_off, mask=k_off < K, other=0.0).to(tl.float32) + WEIGHT_OFFSET)
    else:
        out = s
    return out, s


@triton.jit
def small_m_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, aux_ptr, nw_ptr, sum_ptr, M, N, K, s_xm, s_wn, s_om, s_am,
                          eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, PDL: tl.constexpr, STATIC_WEIGHT: tl.constexpr,
                          PROLOGUE: tl.constexpr, HAS_AUX: tl.constexpr, ACTIVATION: tl.constexpr,
                          WEIGHT_OFFSET: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if not STATIC_WEIGHT:  # a weight made this step (a concatenation) is read after the wait like the rest
            tl.extra.cuda.gdc_wait()
    write_sum = tl.program_id(0) == 0
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    # a parameter's first K slice is read before waiting for the previous kernel (no kernel of a step writes a
    # parameter), so under PDL the weight stream starts while that kernel finishes; the sums run in the same order
    ks = tl.arange(0, BLOCK_K)
    w = _k_slice(w_ptr, cols.to(tl.int64), N, s_wn, ks, K)
    if PDL and STATIC_WEIGHT:
        tl.extra.cuda.gdc_wait()
    if BLOCK_M == 1:  # one row: multiply-add elementwise, reduce across threads once at the end, not every step
        x, s = _input(x_ptr, aux_ptr, nw_ptr, sum_ptr, ks, ks, ks, ks, ks < K, K, write_sum, PROLOGUE, HAS_AUX,
                      ACTIVATION, WEIGHT_OFFSET)
        partial = w.to(tl.float32) * x[None, :]
        if PROLOGUE == 2:
            squares = s * s
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = _k_slice(w_ptr, cols.to(tl.int64), N, s_wn, ks, K)
            x, s = _input(x_ptr, aux_ptr, nw_ptr, sum_ptr, ks, ks, ks, ks, ks < K, K, write_sum, PROLOGUE, HAS_AUX,
                          ACTIVATION, WEIGHT_OFFSET)
            partial += w.to(tl.float32) * x[None, :]
            if PROLOGUE == 2:
                squares += s * s
        acc = tl.sum(partial, axis=1)[None, :]
        if PROLOGUE == 2:
            acc = acc / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    else:  # [rows, cols, K] partial products would not fit in registers: reduce each step
        row_mask = rows[:, None] < M
        x, s = _input(x_ptr, aux_ptr, nw_ptr, sum_ptr, rows[:, None] * s_xm + ks[None, :],
                      rows[:, None] * s_am + ks[None, :], rows[:, None] * K + ks[None, :], ks[None, :],
                      row_mask & (ks[None, :] < K), K, write_sum, PROLOGUE, HAS_AUX, ACTIVATION, WEIGHT_OFFSET)
        acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if PROLOGUE == 2:
            squares = tl.sum(s * s, axis=1)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = _k_slice(w_ptr, cols.to(tl.int64), N, s_wn, ks, K)
            x, s = _input(x_ptr, aux_ptr, nw_ptr, sum_ptr, rows[:, None] * s_xm + ks[None, :],
                          rows[:, None] * s_am + ks[None, :], rows[:, None] * K + ks[None, :], ks[None, :],
                          row_mask & (ks[None, :] < K), K, write_sum, PROLOGUE, HAS_AUX, ACTIVATION, WEIGHT_OFFSET)
            acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            if PROLOGUE == 2:
                squares += tl.sum(s * s, axis=1)
        if PROLOGUE == 2:
            acc = acc / tl.sqrt(squares / K + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * s_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@dataclasses.dataclass(frozen=True)
class Prologue:
    """What the GEMV computes its input from. ``kind`` PLAIN: x2d itself. ACT_MUL: ``act(x2d) * aux`` (the gate and up
    halves of one gate_up output, any row stride). RMS_NORM: RMSNorm of x2d (of ``x2d + aux``, stored into
    ``summed``, a contiguous [M, K], when ``aux`` is given) for a norm whose output is x2d's dtype: see ``_input``
    for its one difference from the norm's kernel."""

    kind: int = PLAIN
    aux: torch.Tensor | None = None
    activation: int = 0
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0
    weight_offset: float = 0.0
    summed: torch.Tensor | None = None


def small_m_linear_triton(x2d, weight, bias, tile, static_weight=False, prologue=None):
    """x2d [M <= MAX_ROWS, K] with unit column stride; weight [N, K] contiguous; bias [N] or None.
    ``static_weight``: no kernel of this step writes the weight (a parameter), so PDL may read it early.
    ``prologue``: a ``Prologue`` the kernel computes its input with (x2d is then the gate, or the norm's input)."""
    m, k = x2d.shape
    n = weight.shape[0]
    block_n, block_k, warps = tile
    p = prologue or Prologue()
    if p.kind == RMS_NORM and p.aux is not None and not (p.summed is not None and p.summed.shape == (m, k)
                                                         and p.summed.is_contiguous()):
        raise ValueError("a norm prologue with a residual needs `summed`, a contiguous [M, K] for the sum")
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    aux = p.aux if p.aux is not None else x2d
    small_m_linear_kernel[(triton.cdiv(n, block_n),)](
        x2d, weight, bias if bias is not None else weight, out, aux,
        p.norm_weight if p.norm_weight is not None else x2d, p.summed if p.summed is not None else x2d,
        m, n, k, x2d.stride(0), weight.stride(0), out.stride(0), aux.stride(0), p.eps,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        STATIC_WEIGHT=static_weight, PROLOGUE=p.kind, HAS_AUX=p.aux is not None, ACTIVATION=p.activation,
        WEIGHT_OFFSET=p.weight_offset, num_warps=warps, **pdl.launch_options(x2d.device))
    return out


def gemv_enabled() -> bool:
    """``KERNELSTACK_SMALL_M_GEMV=0`` keeps every shape on cuBLAS (the benchmark's ``cublas-gemm`` system)."""
    return os.environ.get("KERNELSTACK_SMALL_M_GEMV", "1") != "0"


def candidate_names(m):
    """What ``choose`` times for ``m`` rows: cuBLAS's GEMM, its matrix-vector routine and the wide tiles at one row
    (the first a different kernel family from the one cuBLAS's GEMM heuristic picks), and each Triton tile."""
    tiles = [name for name, tile in TILE_BY_NAME.items() if tile not in WIDE_TILES]
    one_row = ["cuBLAS mv", *(name for name, tile in TILE_BY_NAME.items() if tile in WIDE_TILES)] if m == 1 else []
    return ["cuBLAS", *one_row, *tiles]


def run_candidate(name, x2d, weight, bias, static_weight=False):
    """x2d @ weight.T (+ bias) as [M, N] by the candidate ``name``."""
    if name == "cuBLAS":
        return torch.nn.functional.linear(x2d, weight, bias)
    if name == "cuBLAS mv":
        return (torch.mv(weight, x2d[0]) if bias is None else torch.addmv(bias, weight, x2d[0])).unsqueeze(0)
    return small_m_linear_triton(x2d, weight, bias, TILE_BY_NAME[name], static_weight)


class ShapeChoices:
    """The measured winner per (M, N, K, dtype, bias, device), by candidate name."""

    def __init__(self):
        self.lock = threading.Lock()  # guards ``winners``
        self.timing = threading.Lock()  # one shape timed at a time: two threads would spoil each other's timings
        self.winners = {}  # key -> (name, {candidate: microseconds})

    def choose(self, x2d, weight, bias):
        m, k = x2d.shape
        if not 0 < m <= MAX_ROWS or not weight.is_contiguous() or x2d.stride(1) != 1 or not gemv_enabled():
            return "cuBLAS"
        # one decision per power-of-2 row bucket: an eager step of 5 rows and the graph captured for 8 run the same
        # kernel (a Triton tile uses one BLOCK_M for both, so their rows come out bitwise equal), or sampling from
        # their logits drifts apart
        key = (triton.next_power_of_2(m), weight.shape[0], k, x2d.dtype, bias is not None, x2d.device.index)
        with self.lock:
            if key in self.winners:
                return self.winners[key][0]
        if torch.cuda.is_current_stream_capturing():
            return "cuBLAS"  # cannot time inside a capture; the warm-up calls before it normally decide
        with self.timing:
            with self.lock:
                if key in self.winners:  # another thread timed it meanwhile
                    return self.winners[key][0]
            started = time.perf_counter()
            try:
                with torch.cuda.device(x2d.device) if x2d.is_cuda else contextlib.nullcontext():  # (tests: CPU)
                    times = time_candidates(candidate_names(m), x2d, weight, bias)
                    winner = min(times, key=times.get)
            except Exception as exc:  # noqa: BLE001 - a timing that fails (memory for the copies) costs speed only
                log.warning("kernelstack: timing the GEMM candidates for %s failed (%s: %s); using cuBLAS", key,
                            type(exc).__name__, exc)
                times, winner = {"cuBLAS": float("nan")}, "cuBLAS"
            with self.lock:
                self.winners[key] = (winner, times)
            seconds = time.perf_counter() - started  # part of the first generate's wait (the cache spares the next)
        from ..backend import record_event

        record_event(f"linear {self.describe(key)}; timed in {seconds:.2f} s")
        return winner

    def export(self, device_index) -> list:
        """The measured winners on one device, JSON-ready (no device index: a later process may see the GPU as
        another; a failed timing is not kept)."""
        with self.lock:
            return [[*key[:3], str(key[3]).removeprefix("torch."), key[4], name, times]
                    for key, (name, times) in self.winners.items()
                    if key[5] == device_index and math.isfinite(times[name])]

    def seed(self, entries, device_index) -> list:
        """Adopt winners an earlier process measured on this GPU model (``export``'s list) for shapes not yet
        decided here; returns the keys adopted. ValueError, adopting none, if any entry is malformed."""
        parsed = []
        for entry in entries:
            m, n, k, dtype, bias, name, times = entry
            if not (isinstance(times, dict) and name in times and "cuBLAS" in times and name in candidate_names(m)
                    and isinstance(getattr(torch, str(dtype), None), torch.dtype)):
                raise ValueError(f"not a GEMM choice: {entry!r}")
            parsed.append(((m, n, k, getattr(torch, dtype), bool(bias), device_index), (name, times)))
        with self.lock:
            added = {key: choice for key, choice in parsed if key not in self.winners}
            self.winners.update(added)
        return list(added)

    def describe(self, key):
        """The shape, its winner and the winner's time against cuBLAS's."""
        m, n, k, dtype = key[:4]
        name, times = self.winners[key]
        if not math.isfinite(times[name]):
            return f"M<={m} N={n} K={k} {str(dtype).removeprefix('torch.')}: cuBLAS (the timing failed; see the log)"
        return (f"M<={m} N={n} K={k} {str(dtype).removeprefix('torch.')}: {name}, {times[name]:.1f} us "
                f"(cuBLAS {times['cuBLAS']:.1f} us)")


ROTATION_BYTES = 96 * 2**20  # weight copies a timing cycles through: about twice an H100/H200's 50 MB L2
MAX_COPIES = 128
MIN_CALLS = 16
HOST_HEAD_START_S = 30e-6  # per call of a burst: the GPU spins this long first, while the host enqueues the burst


class Burst:
    """One candidate called back to back on x2d against a rotation of weight copies: enough copies that every call
    streams its weight from memory, as in a decode step (which reads every other weight between two calls of one
    shape), and at least MIN_CALLS calls. The copies are never written, so the GEMV reads them as the graph reads a
    parameter (``static_weight``)."""

    def __init__(self, name, x2d, weights, bias):
        self.name, self.x2d, self.weights, self.bias = name, x2d, weights, bias
        self.calls = max(MIN_CALLS, len(weights))
        self.head_start_s = HOST_HEAD_START_S  # per call; doubled when the host fell behind

    def __call__(self):
        for i in range(self.calls):
            run_candidate(self.name, self.x2d, self.weights[i % len(self.weights)], self.bias, static_weight=True)


def weight_rotation(weight) -> list:
    """``weight`` and as many copies as ROTATION_BYTES takes (MAX_COPIES at most)."""
    count = min(MAX_COPIES, max(1, -(-ROTATION_BYTES // (weight.numel() * weight.element_size()))))
    return [weight, *(weight.clone() for _ in range(count - 1))]


def wake_gpu(device, seconds=0.05):
    """Keep the GPU busy for ``seconds`` so its clocks are up. A shape is first timed after a long compile that left
    the GPU idle; timed one call at a time there (H100, Llama-3.2-1B), every candidate took 34-48 us for GEMVs
    that run in 6-24 us in the decode graph, idle clocks or a host-bound launch, and cuBLAS won every shape."""
    a = torch.randn(2048, 2048, dtype=torch.bfloat16, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize(device)


def time_us(burst):
    """Microseconds per call of a ``Burst``, its calls back to back on the GPU. The GPU spins first while the host
    enqueues the whole burst, so no call waits for its launch. Triton's do_bench times one call at a time behind an
    L2 flush: a slow or busy host's launch counted into every candidate alike, and a split-K GEMM's reduce ran
    apart from the next call. Here, as in the decode graph, a PDL-launched Triton call overlaps the end of the one
    before it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(4):
        torch.cuda._sleep(int(burst.calls * burst.head_start_s * 2e9))  # cycles: the head start at up to 2 GHz
        start.record()
        burst()
        behind = start.query()  # the spin ended before the host had enqueued the burst: calls may have waited
        end.record()
        end.synchronize()
        if not behind:
            break
        burst.head_start_s *= 2
    return start.elapsed_time(end) * 1e3 / burst.calls


PAIRS = 3


def time_candidates(names, x2d, weight, bias):
    """Microseconds per candidate, robust to a GPU whose speed drifts while it times. The clocks are woken first;
    then a discarded warm-up round (compiles), then ``PAIRS`` pairs of rounds, each pair once forward and once
    backward (a linear drift adds the same to every candidate's pair mean), and the median pair mean counts."""
    if x2d.is_cuda:
        wake_gpu(x2d.device)
    weights = weight_rotation(weight)
    runs = {name: Burst(name, x2d, weights, bias) for name in names}
    for run in runs.values():
        time_us(run)  # warm-up round: compiles, picks cuBLAS's algorithms; discarded
    pair_means = {name: [] for name in names}
    for _ in range(PAIRS):
        forward = {name: time_us(run) for name, run in runs.items()}
        backward = {name: time_us(runs[name]) for name in reversed(names)}
        for name in names:
            pair_means[name].append((forward[name] + backward[name]) / 2)
    return {name: statistics.median(means) for name, means in pair_means.items()}


SHAPE_CHOICES = ShapeChoices()


def fused_tile(x2d, weight, bias):
    """The Triton tile that won this GEMV shape, for a kernel that computes x2d in its prologue; None where cuBLAS
    won (or the shape is not a GEMV's, or the prologue is off), and the producer runs as its own kernel."""
    return TILE_BY_NAME.get(SHAPE_CHOICES.choose(x2d, weight, bias)) if gemv_prologue_enabled() else None


def linear_cuda(x, weight, bias, static_weight=False):
    """``F.linear`` with the measured-fastest kernel for this shape (``static_weight``: see small_m_linear_triton)."""
    x2d = x.reshape(-1, x.shape[-1])
    name = SHAPE_CHOICES.choose(x2d, weight, bias)
    if name == "cuBLAS":
        return torch.nn.functional.linear(x, weight, bias)
    return run_candidate(name, x2d, weight, bias, static_weight).view(*x.shape[:-1], weight.shape[0])
