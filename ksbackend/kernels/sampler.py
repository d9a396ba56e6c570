"""Sampling in two launches with no vocabulary sort: the CUDA implementation of ``kernelstack::sample``.

Launch 1, one program per (chunk of the vocabulary, row), reads its chunk once, applies the penalties, the bitmask
and the temperature, and keeps only what its row needs:
- greedy rows: the chunk's argmax;
- rows with no truncation (temperature only): the argmax of the scores plus Gumbel noise. Gumbel-max is an exact
  categorical draw and an argmax combines across chunks like a max, so these rows need no softmax at all;
- truncated rows (top-k, top-p or min-p): the chunk's max and sum of exp(x - max), a short list (``SLOTS``) holding
  at least its best ``KMAX`` tokens, and the best score of any token left out of the list (its "floor").
Launch 2, one program per row, filters the chunk lists the same way into one list of the row's best tokens and
applies top-k / top-p / min-p to it as HF's warpers would to the whole vocabulary: each warper keeps a prefix of the
row sorted by score, and pairwise comparisons within the list give each token its rank and the mass of the better
ones without sorting. The draw is an inverse CDF over the list. This is exact whenever the first token the warpers
drop scores at least the floor (checked; top-k <= KMAX passes unless ties or a list too short for its survivors
raise the floor). Other rows (top-k above KMAX, top-p or min-p over a flat distribution with top-k off) take an exact
walk over their whole row in the same program: radix searches for the top-k and top-p thresholds, then Gumbel-max over
the tokens kept.

Random numbers are Philox with counters (token, row, offset): stateless, so the same seed/offset reproduces a step
and the op never writes to the generator.
"""

import torch
import triton
import triton.language as tl

from . import pdl

_NONE: tl.constexpr = tl.constexpr(-(2**63))  # a packed (score, index) key below every real one: "no token"
_PIVOTS: tl.constexpr = tl.constexpr(16)  # thresholds a radix search tests per step: 4 bits of the 32


@triton.jit
def _warpers(top_k_ptr, top_p_ptr, min_p_ptr, row, vocab):
    top_k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)
    # HF adds no warper for top_k 0 (or >= V), top_p 1.0 or min_p 0
    return top_k, (top_k > 0) & (top_k < vocab), top_p, top_p < 1.0, min_p, min_p > 0.0


@triton.jit
def _row_mode(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, greedy_ptr, row, vocab):
    """(temperature to divide by, greedy, truncated): greedy rows take the argmax, truncated ones (any warper
    besides temperature) the candidate lists, the others Gumbel-max."""
    temperature = tl.load(temp_ptr + row).to(tl.float32)
    greedy = (tl.load(greedy_ptr + row) != 0) | (temperature <= 0.0)
    _, topk_on, _, topp_on, _, minp_on = _warpers(top_k_ptr, top_p_ptr, min_p_ptr, row, vocab)
    truncated = (topk_on | topp_on | minp_on) & (greedy == 0)
    return tl.where(greedy, 1.0, temperature), greedy, truncated  # x / 1.0 is exact: greedy rows see raw scores


@triton.jit
def _scores(logits_ptr, counts_ptr, mask_ptr, row, offs, vocab, stride_l, stride_c, stride_m, temperature,
            rep_ptr, freq_ptr, pres_ptr, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr):
    """fp32 scores of tokens ``offs`` of ``row`` after the penalties, the bitmask and the temperature; -inf where a
    token may not be drawn (disallowed, or past the vocabulary), so -inf means "never drawn" everywhere below."""
    row = row.to(tl.int64)
    valid = offs < vocab
    s = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_COUNTS:
        rep = tl.load(rep_ptr + row).to(tl.float32)
        freq = tl.load(freq_ptr + row).to(tl.float32)
        pres = tl.load(pres_ptr + row).to(tl.float32)
        if (rep != 1.0) | (freq != 0.0) | (pres != 0.0):  # rows without penalties never read their counts
            count = tl.load(counts_ptr + row * stride_c + offs, mask=valid, other=0)
            seen = count > 0
            # as RepetitionPenaltyLogitsProcessor: IEEE division, not a multiply by the reciprocal
            s = tl.where(seen, tl.where(s < 0, s * rep, tl.math.div_rn(s, rep)), s)
            s = s - (freq * count.to(tl.float32) + pres * seen.to(tl.float32))
    if HAS_MASK:
        word = tl.load(mask_ptr + row * stride_m + (offs >> 5), mask=valid, other=0)
        s = tl.where(((word >> (offs & 31)) & 1) != 0, s, float("-inf"))
    return _divide(s, temperature)  # TemperatureLogitsWarper divides too


@triton.jit
def _divide(x, d):
    """x / d rounded as IEEE division rounds it (torch's, so HF's warper's), for one divisor d > 0 shared by the
    block. A division is about 10 instructions with a branch of its own around each element, which keeps the
    elements from overlapping; here one reciprocal serves them all, and each pays a product and two remainder
    corrections, 5 instructions with no branch. The first correction makes the quotient faithful (within an ulp),
    the second exact: Markstein's theorem, given a correctly rounded reciprocal and no under- or overflow, which
    the divisor's range and |x| >= 2**-90 rule out (a smaller nonzero |x| may round one ulp apart)."""
    if (d >= 2.0**-32) & (d <= 2.0**32):
        r = tl.math.div_rn(1.0, d)
        minus_d = -d  # negated once here, not per element
        product = x * r
        q = tl.fma(tl.fma(product, minus_d, x), r, product)
        q = tl.fma(tl.fma(q, minus_d, x), r, q)
        # the product is the IEEE answer where the corrections cannot serve: an infinite x or quotient (they leave
        # NaN behind) and -0.0 (they give +0.0)
        q = tl.where((q == q) & (x != 0.0), q, product)
    else:
        q = tl.math.div_rn(x, d)
    return q


@triton.jit
def _key32(x):
    """A non-negative int64 below 2**32 whose order is the float order of x (-0.0 folded onto +0.0, which compare
    equal): radix searches take it 4 bits at a time."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2**31


@triton.jit
def _from_key32(key):
    k = (key - 2**31).to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _pack(x, idx):
    """(score desc, index asc) as one int64: one comparison orders two tokens, ties going to the lower index."""
    return ((_key32(x) - 2**31) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _unpack(packed):
    return _from_key32((packed >> 32) + 2**31), 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _uniform(seed, offset, row, idx):
    """Uniforms in (0, 1), one per (token idx, row, step offset): Philox counters, never a stored state."""
    c0 = (row * 0 + idx).to(tl.uint32)  # idx: a block of tokens, or a plain int
    c1 = (c0 * 0 + row).to(tl.uint32)
    c2 = (c0 * 0 + (offset & 0xFFFFFFFF)).to(tl.uint32)
    c3 = (c0 * 0 + (offset >> 32)).to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return ((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # 24 bits, centred: never 0 or 1


@triton.jit
def _gumbel(seed, offset, row, idx):
    return -tl.log(-tl.log(_uniform(seed, offset, row, idx)))


# Combine functions for reductions of two values at once: each tl.reduce costs one round through shared memory and a
# barrier or two, whatever it carries, and a program that merges lists is a chain of such rounds (launch 2 at batch 1)
@triton.jit
def _min_and_max(a_min, a_max, b_min, b_max):
    return tl.minimum(a_min, b_min), tl.maximum(a_max, b_max)


@triton.jit
def _max_and_max(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


@triton.jit
def _sum_and_sum(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _histogram_bound(group_max, lo, hi, KMAX: tl.constexpr, BINS: tl.constexpr):
    """Bins the group maxima into BINS equal bins over [lo, hi] (below lo: bin 0) and finds the highest bin whose
    suffix holds KMAX of them. Returns (scale, that bin, each maximum's position in bins, whether that bin's suffix
    holds over 2 KMAX maxima: a far outlier below stretched the range)."""
    scale = tl.where(hi > lo, BINS / (hi - lo), 0.0)  # 0: one bin (equal maxima, or an infinity)
    where = tl.where(scale > 0.0, (group_max - lo) * scale, 0.0)
    counts = tl.histogram(tl.minimum(tl.maximum(where, 0.0), BINS - 1).to(tl.int32), BINS)  # -inf groups: bin 0
    reached = tl.cumsum(counts, axis=0, reverse=True)  # maxima in this bin or above: non-increasing
    # the bins reaching KMAX are a prefix, so the last one's count is their least
    qualifies = reached >= KMAX
    least, first = tl.reduce((tl.where(qualifies, reached, 2**30), tl.where(qualifies, tl.arange(0, BINS), 0)), 0,
                             _min_and_max)
    return scale, first, where, (least > 2 * KMAX) & (least < 2**30)


@triton.jit
def _survivors(x, KMAX: tl.constexpr, GROUPS: tl.constexpr, BINS: tl.constexpr):
    """A superset of the block's best KMAX tokens, found without selecting them: if KMAX of the GROUPS group maxima
    reach a bound, KMAX distinct tokens do, so every token below it can go. The bound is the lower edge of the highest
    of BINS equal bins over the maxima's range whose suffix holds KMAX maxima: one histogram instead of a sort. On
    random scores about 75 tokens of 2048 pass (KMAX 64, 256 groups, 128 bins; 72 with the exact KMAX-th maximum).
    Any lower edge of the range is correct (a bin holding the KMAX-th maximum at 0 keeps everything); a far outlier
    (a finite -1e30) would crowd every real maximum into one bin, so then the range is binned again from the lowest
    maximum of that bin. Tokens are binned by the same float expression as the maxima, which is monotone in x, so
    none is lost to rounding."""
    group_max = tl.max(tl.reshape(x, [GROUPS, x.numel // GROUPS]), axis=1)
    finite = group_max > float("-inf")
    lo, hi = tl.reduce((tl.where(finite, group_max, float("inf")), group_max), 0, _min_and_max)
    scale, first, where, crowded = _histogram_bound(group_max, lo, hi, KMAX, BINS)
    if crowded:  # lo becomes a maximum at or below the KMAX-th best, so the bound stays a lower bound
        lo = tl.min(tl.where(finite & (where >= first), group_max, float("inf")), axis=0)
        scale, first, where, crowded = _histogram_bound(group_max, lo, hi, KMAX, BINS)
    # bin 0 holds the -inf groups too, so nothing is dropped when it is the one reached
    return (x > float("-inf")) & tl.where(first == 0, True, (x - lo) * scale >= first)


@triton.jit
def _compact(dst_ptr, packed, x, survivors, SLOTS: tl.constexpr):
    """Writes the first SLOTS survivors to dst[0:SLOTS] in order (a prefix sum gives each its slot), _NONE after
    them, and returns the best score of an allowed token left out (-inf: none)."""
    slot = tl.cumsum(survivors.to(tl.int32), axis=0) - 1
    listed = survivors & (slot < SLOTS)
    tl.store(dst_ptr + slot, packed, mask=listed)
    last, floor = tl.reduce((slot, tl.where((x > float("-inf")) & (listed == 0), x, float("-inf"))), 0, _max_and_max)
    rest = tl.arange(0, SLOTS)
    tl.store(dst_ptr + rest, tl.full([SLOTS], _NONE, tl.int64), mask=rest > last)
    return floor


@triton.jit
def _chunk_kernel(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m,
                  temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, rep_ptr, freq_ptr, pres_ptr, greedy_ptr,
                  seed_ptr, offset_ptr, best_ptr, best_idx_ptr, sum_ptr, floor_ptr, list_ptr, n_chunks,
                  vocab: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr,
                  KMAX: tl.constexpr, SLOTS: tl.constexpr, GROUPS: tl.constexpr, BINS: tl.constexpr,
                  PDL: tl.constexpr):
    if PDL:  # launched while the logits' kernel finishes; everything is read after the wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    temperature, greedy, truncated = _row_mode(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, greedy_ptr, row, vocab)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = _scores(logits_ptr, counts_ptr, mask_ptr, row, offs, vocab, stride_l, stride_c, stride_m, temperature,
                rep_ptr, freq_ptr, pres_ptr, HAS_COUNTS, HAS_MASK)
    # NaN counts as the maximum, as in argmax (+inf ties with it): Triton's max may keep either side of a NaN
    # comparison and return a padding lane's index. A select, not greedy_step's first_max: launch 1 is
    # instruction-bound at batch 32, and with first_max's two extra reductions it took 37.6 us on an H100 (34.0 before)
    x = tl.where(x != x, float("inf"), x)
    slot = row.to(tl.int64) * n_chunks + chunk
    if truncated:  # the lists decide: the chunk's max is needed, not where it is
        best = tl.max(x, axis=0)
        tl.store(best_ptr + slot, best)
        # the row's softmax mass serves top-p and min-p without top-k; with top-k, launch 2 sums the kept tokens
        _k, topk_on, _p, _topp_on, _m, _minp_on = _warpers(top_k_ptr, top_p_ptr, min_p_ptr, row, vocab)
        if topk_on == 0:  # exp(-inf) = 0 drops disallowed tokens; the clamp keeps -inf - -inf out
            tl.store(sum_ptr + slot, tl.sum(tl.exp(x - tl.maximum(best, -3.0e38)), axis=0))
        floor = _compact(list_ptr + slot * SLOTS, _pack(x, offs), x, _survivors(x, KMAX, GROUPS, BINS), SLOTS)
        tl.store(floor_ptr + slot, floor)
    else:  # greedy rows: the first maximum; the others: Gumbel-max, an exact categorical draw
        score = x
        if greedy == 0:
            score = x + _gumbel(tl.load(seed_ptr), tl.load(offset_ptr), row, offs)
        best, arg = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(best_ptr + slot, best)
        tl.store(best_idx_ptr + slot, chunk * CHUNK + arg)


@triton.jit
def _row_kernel(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m,
                temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, rep_ptr, freq_ptr, pres_ptr, greedy_ptr,
                seed_ptr, offset_ptr, best_ptr, best_idx_ptr, sum_ptr, floor_ptr, list_ptr, top_ptr, out_ptr,
                n_chunks, vocab: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr, CHUNKS: tl.constexpr,
                KMAX: tl.constexpr, SLOTS: tl.constexpr, GROUPS: tl.constexpr, BINS: tl.constexpr,
                BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched while launch 1 finishes: its lists are read after the wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    temperature, _greedy, truncated = _row_mode(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, greedy_ptr, row, vocab)
    seed = tl.load(seed_ptr)
    offset = tl.load(offset_ptr)
    chunk = tl.arange(0, CHUNKS)
    in_row = chunk < n_chunks
    slots = row.to(tl.int64) * n_chunks + chunk
    best = tl.load(best_ptr + slots, mask=in_row, other=float("-inf"))
    if truncated == 0:  # greedy and Gumbel rows: the first chunk holding the max holds the first index of it
        token = tl.load(best_idx_ptr + row.to(tl.int64) * n_chunks + tl.argmax(best, axis=0, tie_break_left=True))
    else:
        top_k, topk_on, top_p, topp_on, min_p, minp_on = _warpers(top_k_ptr, top_p_ptr, min_p_ptr, row, vocab)
        # the row's max, and the best score a chunk left out of its list
        top_max, chunk_floor = tl.reduce((best, tl.load(floor_ptr + slots, mask=in_row, other=float("-inf"))), 0,
                                         _max_and_max)
        z_full = tl.zeros([], tl.float32)  # rows with top-k store no mass and never read z_full
        if topk_on == 0:  # the softmax denominator of the whole row: each chunk's sum, rescaled to the row's max
            z_full = tl.sum(tl.load(sum_ptr + slots, mask=in_row, other=0.0) * tl.exp(best - top_max), axis=0)
        # the chunk lists, filtered again into one list of the row's best, top[row] (read back after a barrier)
        flat = tl.arange(0, CHUNKS * SLOTS)
        lists = tl.load(list_ptr + row.to(tl.int64) * n_chunks * SLOTS + flat, mask=flat < n_chunks * SLOTS,
                        other=_NONE)
        x, _idx = _unpack(lists)
        x = tl.where(lists != _NONE, x, float("-inf"))
        floor = _compact(top_ptr + row * SLOTS, lists, x, _survivors(x, KMAX, GROUPS, BINS), SLOTS)
        floor = tl.maximum(floor, chunk_floor)  # the best score of a token missing from top[row]
        tl.debug_barrier()
        top = tl.load(top_ptr + row * SLOTS + tl.arange(0, SLOTS), volatile=True)
        token, exact = _draw_from_best(top, top_max, z_full, floor, top_k, topk_on, top_p, topp_on, min_p, minp_on,
                                       seed, offset, row, vocab)
        if exact == 0:
            token = _full_row_draw(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature,
                                   rep_ptr, freq_ptr, pres_ptr, row, vocab, top_max, z_full, top_k, topk_on,
                                   top_p, topp_on, min_p, minp_on, seed, offset, HAS_COUNTS, HAS_MASK, BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _draw_from_best(top, top_max, z_full, floor, top_k, topk_on, top_p, topp_on, min_p, minp_on, seed, offset, row,
                    vocab):
    """Top-k / top-p / min-p and the draw on the row's best tokens (packed keys, unordered); returns (token, exact).

    Each warper keeps a prefix of the row sorted by score. ``floor`` bounds every token missing from ``top``, so the
    prefix computed here is the row's own when the first token it drops scores >= floor (ties are HF's free choice).
    """
    valid = top != _NONE
    x, _ = _unpack(top)
    e = tl.where(valid, tl.exp(x - top_max), 0.0)  # unnormalised probabilities; 1 for the best token
    # pairwise comparisons instead of a sort: each token's rank and the mass of the strictly better tokens
    better = top[:, None] > top[None, :]
    rank, before = tl.reduce((better.to(tl.int32), tl.where(better, e[:, None], 0.0)), 0, _sum_and_sum)

    # top-k keeps every token >= the k-th best score (ties too): exact if no missing token reaches it
    kth = tl.max(tl.where(valid & (rank == top_k - 1), x, float("-inf")), axis=0)
    everything = floor == float("-inf")  # no token is missing
    in_k = valid & ((x >= kth) | (topk_on == 0))
    z = tl.where(topk_on, tl.sum(tl.where(in_k, e, 0.0), axis=0), z_full)
    keep = in_k & ((topp_on == 0) | (before < top_p * z)) & ((minp_on == 0) | (e >= min_p))
    keep = keep | (valid & (rank == 0))  # HF's min_tokens_to_keep=1
    dropped_above_floor, kept_mass = tl.reduce(((valid & (keep == 0) & (x >= floor)).to(tl.int32),
                                                tl.where(keep, e, 0.0)), 0, _sum_and_sum)
    exact = tl.where(topk_on, floor < kth, dropped_above_floor > 0) | everything

    # inverse CDF: the kept token whose interval [before, before + e) holds the target is the worst one starting
    # at or below it (kept tokens are a prefix, so their `before` counts kept tokens only)
    target = _uniform(seed, offset, row, vocab) * kept_mass  # counter `vocab`: unused
    chosen = tl.min(tl.where(keep & (before <= target), top, 2**63 - 1), axis=0)
    return 0x7FFFFFFF - (chosen & 0x7FFFFFFF).to(tl.int32), exact


@triton.jit
def _full_row_draw(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature, rep_ptr, freq_ptr,
                   pres_ptr, row, vocab, top_max, z_full, top_k, topk_on, top_p, topp_on, min_p, minp_on, seed,
                   offset, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """The exact path over the whole row, in passes of BLOCK tokens: the top-k threshold (the k-th best score) and
    the top-p threshold (where the mass of the better tokens reaches top_p) by radix search, then Gumbel-max over the
    tokens every warper keeps. About 20 passes: only for rows the candidate lists cannot settle."""
    k_floor = tl.zeros([], tl.int64)  # key 0: no threshold
    z = z_full
    if topk_on:
        k_floor = _stream_threshold(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature,
                                    rep_ptr, freq_ptr, pres_ptr, row, vocab, top_k.to(tl.float32), k_floor, top_max,
                                    False, HAS_COUNTS, HAS_MASK, BLOCK)
        z, _ties = _masses(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature, rep_ptr,
                       freq_ptr, pres_ptr, row, vocab, k_floor, k_floor - 1, top_max, HAS_COUNTS, HAS_MASK, BLOCK)
    p_floor = tl.zeros([], tl.int64)
    ties_kept = tl.zeros([], tl.int32)
    if topp_on:
        p_floor = _stream_threshold(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature,
                                    rep_ptr, freq_ptr, pres_ptr, row, vocab, top_p * z, k_floor, top_max, True,
                                    HAS_COUNTS, HAS_MASK, BLOCK)
        p_floor = tl.minimum(p_floor, _key32(top_max))  # top_p = 0 still keeps the best token
        above, ties = _masses(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature, rep_ptr,
                              freq_ptr, pres_ptr, row, vocab, k_floor, p_floor, top_max, HAS_COUNTS, HAS_MASK, BLOCK)
        # tokens tied at the threshold are kept in index order while the mass before them stays below top_p
        room = (top_p * z - above) / tl.exp(_from_key32(p_floor) - top_max)
        ties_kept = tl.minimum(tl.maximum(tl.ceil(room), 1.0), ties).to(tl.int32)

    best = tl.full([], float("-inf"), tl.float32)
    token = tl.zeros([], tl.int32)
    tie_rank = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _scores(logits_ptr, counts_ptr, mask_ptr, row, offs, vocab, stride_l, stride_c, stride_m, temperature,
                    rep_ptr, freq_ptr, pres_ptr, HAS_COUNTS, HAS_MASK)
        key = _key32(x)
        keep = (x > float("-inf")) & (key >= k_floor)
        tie = keep & (key == p_floor)
        rank = tie_rank + tl.cumsum(tie.to(tl.int32), axis=0) - 1
        tie_rank += tl.sum(tie.to(tl.int32), axis=0)
        keep = keep & ((topp_on == 0) | (key > p_floor) | (tie & (rank < ties_kept)))
        keep = keep & ((minp_on == 0) | (tl.exp(x - top_max) >= min_p))
        g = tl.where(keep, x + _gumbel(seed, offset, row, offs), float("-inf"))
        m, a = tl.max(g, axis=0, return_indices=True, return_indices_tie_break_left=True)
        token = tl.where(m > best, start + a, token)
        best = tl.maximum(best, m)
    return token


@triton.jit
def _stream_threshold(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature, rep_ptr,
                      freq_ptr, pres_ptr, row, vocab, target, floor, top_max, MASS: tl.constexpr,
                      HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """A radix search over the whole row: the largest key t with sum(w over allowed tokens with key >= max(t, floor))
    >= target, w being 1 (a count, for top-k) or exp(x - max) (a mass, for top-p). Each of the 8 passes tests 16
    pivots (the next 4 bits of the key), instead of the 32 passes of a bisection."""
    digits = tl.arange(0, _PIVOTS).to(tl.int64)
    found = tl.zeros([], tl.int64)
    for shift in tl.static_range(28, -4, -4):
        pivots = found + (digits << shift)
        reached = tl.zeros([_PIVOTS], tl.float32)
        for start in range(0, vocab, BLOCK):
            x = _scores(logits_ptr, counts_ptr, mask_ptr, row, start + tl.arange(0, BLOCK), vocab, stride_l,
                        stride_c, stride_m, temperature, rep_ptr, freq_ptr, pres_ptr, HAS_COUNTS, HAS_MASK)
            key = _key32(x)
            w = tl.exp(x - top_max) if MASS else tl.full([BLOCK], 1.0, tl.float32)
            w = tl.where((x > float("-inf")) & (key >= floor), w, 0.0)
            reached += tl.sum(tl.where(key[:, None] >= pivots[None, :], w[:, None], 0.0), axis=0)
        found += tl.maximum(tl.sum((reached >= target).to(tl.int64), axis=0) - 1, 0) << shift
    return found


@triton.jit
def _masses(logits_ptr, counts_ptr, mask_ptr, stride_l, stride_c, stride_m, temperature, rep_ptr, freq_ptr, pres_ptr,
            row, vocab, floor, split, top_max, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr,
            BLOCK: tl.constexpr):
    """Over allowed tokens with key >= floor: the mass of those with key > split, and how many have key == split."""
    above = tl.zeros([], tl.float32)
    ties = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        x = _scores(logits_ptr, counts_ptr, mask_ptr, row, start + tl.arange(0, BLOCK), vocab, stride_l, stride_c,
                    stride_m, temperature, rep_ptr, freq_ptr, pres_ptr, HAS_COUNTS, HAS_MASK)
        key = _key32(x)
        allowed = (x > float("-inf")) & (key >= floor)
        above += tl.sum(tl.where(allowed & (key > split), tl.exp(x - top_max), 0.0), axis=0)
        ties += tl.sum((allowed & (key == split)).to(tl.float32), axis=0)
    return above, ties


def launch_shape(batch, vocab):
    """(chunk, num_warps) of launch 1, measured on an H100 (docs/benchmarks.md, V = 128256, top-k 50, top-p 0.9).

    Up to 4 rows launch 2 is the step's critical path (one program per row merging every chunk's list), so chunks
    of 4096 tokens halve its input: 22.5 us at batch 1 against 24.9 with 2048. With more rows launch 1's 2,000
    programs are bound by instruction issue, and 4 warps of 2048-token chunks ran it fastest: 52.6 us at batch 32
    against 62.4 with 8 warps. Lists do not overflow at either length: the filter keeps groups of 8 tokens."""
    chunk, warps = (4096, 8) if batch <= 4 else (2048, 4)
    return min(chunk, max(triton.next_power_of_2(vocab), 64)), warps


def sample_triton(logits, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty,
                  token_counts, allowed_bitmask, greedy, seed, offset, chunk=None, kmax=64, slots=128, warps=None,
                  row_warps=16):
    """The op on CUDA (or the Triton interpreter). ``chunk`` (tokens per program of launch 1), ``kmax`` (the depth the
    lists guarantee: top-k up to it never takes the full-row path) and ``slots`` (list length, room for the tokens the
    filter lets through beyond kmax) are powers of 2; tests shrink them to reach every path on small vocabularies.
    ``warps`` and ``row_warps`` (the two launches' warps) are there for tuning sweeps.
    Shapes alone choose the launches: no host sync, so CUDA graphs capture it."""
    batch, vocab = logits.shape
    chunk, default_warps = launch_shape(batch, vocab) if chunk is None else (chunk, 4)
    warps = warps or default_warps
    n_chunks = triton.cdiv(vocab, chunk)
    dev = logits.device
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    counts = logits if token_counts is None else token_counts.contiguous()
    mask = logits if allowed_bitmask is None else allowed_bitmask.contiguous()
    rows = [t.contiguous() for t in (temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                                     presence_penalty, greedy, seed, offset)]
    best = torch.empty(batch, n_chunks, device=dev, dtype=torch.float32)
    best_idx = torch.empty(batch, n_chunks, device=dev, dtype=torch.int32)
    sums = torch.empty(batch, n_chunks, device=dev, dtype=torch.float32)
    floors = torch.empty(batch, n_chunks, device=dev, dtype=torch.float32)
    lists = torch.empty(batch, n_chunks, slots, device=dev, dtype=torch.int64)
    top = torch.empty(batch, slots, device=dev, dtype=torch.int64)
    out = torch.empty(batch, device=dev, dtype=torch.int64)
    common = {"HAS_COUNTS": token_counts is not None, "HAS_MASK": allowed_bitmask is not None, "KMAX": kmax,
              "SLOTS": slots, "BINS": 128, **pdl.launch_options(dev)}
    strides = (logits.stride(0), counts.stride(0), mask.stride(0))
    # vocab is a constexpr (one compile per model vocabulary): loop bounds and masks fold into constants
    # groups of at most 8 tokens (256 at least): about 75 tokens of a chunk pass its filter with KMAX 64, whatever the
    # chunk's length (a simulation over Gaussian rows: 2048 tokens 74 on average, 90 at most; 8192 tokens 69 and 80),
    # which keeps lists from overflowing their slots (an overflow can send the row down the full-row path)
    _chunk_kernel[(n_chunks, batch)](logits, counts, mask, *strides, *rows, best, best_idx, sums, floors, lists,
                                     n_chunks, vocab, CHUNK=chunk, GROUPS=max(min(256, chunk), chunk // 8),
                                     num_warps=warps, **common)
    chunks = triton.next_power_of_2(n_chunks)
    _row_kernel[(batch,)](logits, counts, mask, *strides, *rows, best, best_idx, sums, floors, lists, top, out,
                          n_chunks, vocab, CHUNKS=chunks, GROUPS=min(256, chunks * slots),
                          BLOCK=min(1024, triton.next_power_of_2(vocab)),
                          num_warps=row_warps, **common)  # one program per row: wide, so its reductions are short
    return out
