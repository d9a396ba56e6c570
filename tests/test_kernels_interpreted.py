"""Every Triton kernel against its op's reference, run by the Triton interpreter on CPU (CI) and
natively on the GPU (marked cuda) at real shapes. Odd shapes on purpose: non-power-of-2 rows, one
row, heads that do not fill a block."""

import os

import pytest
import torch

import ksbackend  # noqa: F401

from ksbackend.ops.activation import act_and_mul_reference
from ksbackend.ops.norm import rms_norm_reference
from ksbackend.ops.rope import rotate_half

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from ksbackend.kernels.sampler import _divide  # noqa: E402
from ksbackend.kernels.sampler import _survivors  # noqa: E402

ks = torch.ops.kernelstack
CPU_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16: two ulps (2 * 2^-8), since each rounding point of the chain may land one ulp apart
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=1e-3)}


def device_for_test():
    if torch.cuda.is_available():
        return "cuda"
    if CPU_INTERPRETED:
        return "cpu"
    pytest.skip("needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("rows,hidden", [(1, 7), (5, 48), (3, 130)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_generated_rms_norm(rows, hidden, dtype, gemma):
    from ksbackend.kernels.rms_norm import rms_norm_triton

    dev = device_for_test()
    x, r = torch.randn(rows, hidden, dtype=dtype, device=dev), torch.randn(rows, hidden, dtype=dtype, device=dev)
    w = torch.randn(hidden, dtype=dtype, device=dev)
    offset, cast_to = (1.0, None) if gemma else (0.0, dtype)
    ref = rms_norm_reference(x, w, 1e-6, offset, cast_to, dtype)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-6, offset, cast_to, dtype), ref, **TOL[dtype])
    out, summed = rms_norm_triton(x, w, 1e-6, offset, cast_to, dtype, residual=r)
    torch.testing.assert_close(summed, x + r, **TOL[dtype])
    torch.testing.assert_close(out, rms_norm_reference(x + r, w, 1e-6, offset, cast_to, dtype), **TOL[dtype])


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 37), (2, 1, 2100)])
@pytest.mark.parametrize("fused", [False, True])
def test_generated_act_and_mul(activation, dtype, shape, fused):
    """Separate tensors, and (fused) the two halves of one gate_up output: strided rows, read in place."""
    from ksbackend.kernels.act_and_mul import act_and_mul_triton
    from ksbackend.kernels.act_and_mul import as_rows

    dev = device_for_test()
    if fused:
        gate, up = (torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=dev) * 3).chunk(2, dim=-1)
    else:
        gate, up = torch.randn(shape, dtype=dtype, device=dev) * 3, torch.randn(shape, dtype=dtype, device=dev)
    if fused:  # read in place: the views handed to the kernel are the halves themselves
        assert as_rows(gate).data_ptr() == gate.data_ptr() and as_rows(up).data_ptr() == up.data_ptr()
    out = act_and_mul_triton(gate, up, activation)
    assert out.shape == gate.shape and out.is_contiguous()
    torch.testing.assert_close(out, act_and_mul_reference(gate, up, activation), **TOL[dtype])


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 1, 24), (8, 8, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kernel_on_transposed_views(hq, hk, d, dtype):
    from ksbackend.kernels.rope import rope_triton

    dev = device_for_test()
    b, t = 2, 5
    q = torch.randn(b, t, hq, d, dtype=dtype, device=dev).transpose(1, 2)  # as HF's view().transpose(1, 2)
    k = torch.randn(b, t, hk, d, dtype=dtype, device=dev).transpose(1, 2)
    angle = torch.rand(b, 1, t, d, device=dev) * 6.3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    q_out, k_out = rope_triton(q, k, cos, sin)
    # the sum of two rounded products can cancel: allow one ulp of the largest product (|x| < 8 here)
    tol = dict(TOL[dtype], atol=max(TOL[dtype]["atol"], 8 * torch.finfo(dtype).eps))
    torch.testing.assert_close(q_out, q * cos + rotate_half(q) * sin, **tol)
    torch.testing.assert_close(k_out, k * cos + rotate_half(k) * sin, **tol)
    assert q_out.transpose(1, 2).is_contiguous()  # token-major, as the op contract fixes


def test_step_kernels_switch_off_runs_the_torch_ops(monkeypatch):
    """``KERNELSTACK_STEP_KERNELS=0`` (the benchmark's torch-step system) takes the torch form; both agree."""
    from ksbackend import kernels
    from ksbackend.kernels import rope_table

    dev = device_for_test()
    pos, inv_freq = torch.randint(0, 9000, (2, 9), device=dev), torch.rand(16, device=dev)
    kernel, launches = rope_table.rope_cos_sin_triton, []
    monkeypatch.setattr(rope_table, "rope_cos_sin_triton", lambda *args: launches.append(1) or kernel(*args))
    fused = kernels._rope_cos_sin(pos, inv_freq, 0.7)
    monkeypatch.setenv("KERNELSTACK_STEP_KERNELS", "0")
    assert not kernels.step_kernels_enabled()
    unfused = kernels._rope_cos_sin(pos, inv_freq, 0.7)
    assert launches == [1]
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 2048), (4, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_step_kernels_equal_argmax_and_the_length_advance(rows, vocab, dtype):
    """The token is the first maximum of its row, as argmax: ties planted inside a chunk and across chunks (bf16
    logits tie often), and a row of -inf; the lengths advance only for live rows."""
    from ksbackend.kernels.greedy_step import greedy_step_triton
    from ksbackend.runtime.model_runner import greedy_step

    dev = device_for_test()
    logits = torch.randn(rows, vocab).to(dtype)
    top = logits.float().max() + 1
    logits[0, [7, vocab - 3]] = top.to(dtype)  # a tie across chunks: the first index wins
    if rows > 2:
        logits[2] = float("-inf")
    if rows > 3:  # NaN is the maximum, as in argmax: the first NaN of a row, and a row all NaN gives token 0
        logits[1, [vocab - 2, 5]] = float("nan")
        logits[3] = float("nan")
    kv_lens = torch.randint(1, 1000, (rows,), dtype=torch.int32)
    active = torch.randint(0, 2, (rows,), dtype=torch.int32)
    expected = [torch.full((rows,), -1, dtype=torch.int64), torch.full((rows,), -1, dtype=torch.int32)]
    greedy_step(logits, *expected, kv_lens, active)
    got = [t.to(dev) for t in expected]
    for t in got:
        t.fill_(-1)
    greedy_step_triton(logits.to(dev), *got, kv_lens.to(dev), active.to(dev))
    assert torch.equal(got[0].cpu(), logits.float().argmax(-1)) and got[0][0] == 7
    assert torch.equal(expected[0], got[0].cpu())  # the CPU path (first_argmax) agrees
    assert torch.equal(got[1].cpu(), kv_lens * active)


@pytest.mark.parametrize("rows,page", [(1, 16), (5, 1), (130, 16), (7, 64)])
def test_decode_metadata_kernel_equals_the_torch_steps(rows, page):
    """Positions, slots and KV lengths of a decode step from random lengths and a random page table (a row stride
    wider than the rows use), against the runtime's torch form."""
    from ksbackend.kernels.decode_metadata import decode_metadata_triton
    from ksbackend.runtime.metadata import decode_step_metadata

    dev = device_for_test()
    width = 40
    lens = torch.randint(0, width * page, (rows,), dtype=torch.int32)
    table = torch.randint(0, 50000, (rows, width + 3), dtype=torch.int32)[:, :width]
    expected = [torch.full((rows,), -7, dtype=dt) for dt in (torch.int64, torch.int64, torch.int32)]
    decode_step_metadata(lens, table, page, *expected)
    got = [t.to(dev) for t in expected]
    for t in got:
        t.fill_(-7)
    decode_metadata_triton(lens.to(dev), table.to(dev), page, *got)
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e)
    assert torch.equal(expected[0], lens.long()) and torch.equal(expected[2], lens + 1)


@pytest.mark.parametrize("shape,half", [((1, 1), 32), ((3, 7), 20), ((2, 300), 64), ((5,), 8)])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
def test_rope_table_kernel_equals_the_ops_reference(shape, half, scaling):
    """One launch for cos and sin against the torch chain it replaces: int64 positions out to a 128K context (the
    angles need full range reduction), and float positions; odd head halves (head size 40)."""
    from ksbackend.kernels.rope_table import rope_cos_sin_triton
    from ksbackend.ops.rope import rope_cos_sin

    dev = device_for_test()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(half, device=dev, dtype=torch.float32) / half))
    sliced = torch.randint(0, 131072, (*shape, 3), device=dev)[..., 1]  # a strided view, as pos[:, -1:] is
    for pos in (torch.randint(0, 131072, shape, device=dev), torch.rand(shape, device=dev) * 4096, sliced):
        cos, sin = rope_cos_sin_triton(pos, inv_freq, scaling)
        ref_cos, ref_sin = rope_cos_sin(pos.cpu(), inv_freq.cpu(), scaling)  # the op's reference, on the CPU
        assert cos.shape == (*shape, 2 * half) and cos.dtype == torch.float32 and cos.is_contiguous()
        torch.testing.assert_close(cos.cpu(), ref_cos, **TOL[torch.float32])
        torch.testing.assert_close(sin.cpu(), ref_sin, **TOL[torch.float32])


@pytest.mark.parametrize("hq,hk,d,page", [(4, 2, 16, 4), (3, 1, 24, 8), (8, 8, 64, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp32_table", [False, True])
def test_rope_append_kernel_writes_what_rope_then_pool_write_would(hq, hk, d, page, dtype, fp32_table):
    """The fused kernel against the unfused path: rope's rotation, then KVPool.write into the slots. Given the fp32
    table, the kernel rounds it to q's dtype as HF's cos.to(x.dtype) does before rope."""
    from ksbackend.kernels.rope_append import rope_append_triton
    from ksbackend.runtime.kv_pool import KVPool

    dev = device_for_test()
    n = 6
    q = torch.randn(1, n, hq, d, dtype=dtype, device=dev).transpose(1, 2)  # projection views, as HF leaves them
    k = torch.randn(1, n, hk, d, dtype=dtype, device=dev).transpose(1, 2)
    v = torch.randn(1, n, hk, d, dtype=dtype, device=dev).transpose(1, 2)[0].transpose(0, 1)
    angle = torch.rand(1, 1, n, d, device=dev) * 6.3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    pools = [KVPool(1, hk, d, 8, page, dtype, dev) for _ in range(2)]
    pools[0].caches[0].normal_()  # slots the step does not write must stay as they were
    pools[1].caches[0].copy_(pools[0].caches[0])
    slots = torch.randperm(8 * page, device=dev)[:n]
    q_ref, k_ref = torch.ops.kernelstack.rope(q, k, cos, sin)
    pools[0].write(0, k_ref[0].transpose(0, 1), v, slots)
    table = (angle.cos(), angle.sin()) if fp32_table else (cos, sin)
    q_out, k_out = rope_append_triton(q, k, v, *table, pools[1].caches[0], slots)
    assert q_out.dtype == k_out.dtype == dtype
    tol = dict(TOL[dtype], atol=max(TOL[dtype]["atol"], 8 * torch.finfo(dtype).eps))
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), **tol)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), **tol)
    torch.testing.assert_close(pools[1].caches[0], pools[0].caches[0], **tol)


def test_generated_kernels_are_cached_by_chain_structure():
    from ksbackend.kernels.act_and_mul import act_and_mul_chain
    from ksbackend.kernels.generator import compile_chain
    from ksbackend.kernels.rms_norm import rms_norm_chain

    llama = compile_chain(rms_norm_chain(True, 0.0, torch.bfloat16, torch.bfloat16))
    assert compile_chain(rms_norm_chain(True, 0.0, torch.bfloat16, torch.bfloat16)) is llama
    gemma = compile_chain(rms_norm_chain(True, 1.0, None, torch.bfloat16))
    assert gemma is not llama and "+ 1.0" in gemma.source and "tl.sum" in gemma.source
    grid, block, warps = llama.launch_shape(4096, 8)  # 8 rows of 4096
    assert grid == (8,) and block == 4096 and warps == 16
    assert llama.launch_shape(2048, 1)[1:] == (2048, 8)
    silu = compile_chain(act_and_mul_chain("silu", torch.bfloat16))  # pointwise: (rows, column blocks)
    assert "tl.sum" not in silu.source and silu.launch_shape(8192, 32) == ((32, 8), 1024, 4)
    assert silu.launch_shape(37, 3) == ((3, 1), 64, 4)
    with pytest.raises(ValueError, match="unit column stride"):  # the flat layout of old is refused, not misread
        silu({"g": torch.ones(8), "u": torch.ones(8), "out": torch.empty(8)}, 8)


@pytest.mark.parametrize("m,n,k", [(1, 19, 37), (1, 7, 4200), (3, 40, 300), (8, 5, 1030)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_small_m_linear_kernel_equals_f_linear_for_every_tile(m, n, k, dtype, bias):
    """Every tile the shape choice may pick, at shapes no tile divides, against F.linear (fp32 accumulation both)."""
    from ksbackend.kernels.small_m_linear import TILE_BY_NAME
    from ksbackend.kernels.small_m_linear import candidate_names
    from ksbackend.kernels.small_m_linear import small_m_linear_triton

    dev = device_for_test()
    x, w = torch.randn(m, k, dtype=dtype, device=dev), torch.randn(n, k, dtype=dtype, device=dev) / k**0.5
    b = torch.randn(n, dtype=dtype, device=dev) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    tiles = [TILE_BY_NAME[name] for name in candidate_names(m) if name.startswith("Triton")]
    assert len(tiles) == (6 if m == 1 else 4)
    for tile in tiles:
        torch.testing.assert_close(small_m_linear_triton(x, w, b, tile), ref, **TOL[dtype])


def prologue_case(kind, m, k, dtype, dev):
    """(x2d, Prologue, what the GEMV's input must be: the unfused op's output) for one prologue kind."""
    from ksbackend.kernels.small_m_linear import ACT_MUL
    from ksbackend.kernels.small_m_linear import ACTIVATIONS
    from ksbackend.kernels.small_m_linear import PLAIN
    from ksbackend.kernels.small_m_linear import RMS_NORM
    from ksbackend.kernels.small_m_linear import Prologue

    x = torch.randn(m, 2 * k, dtype=dtype, device=dev)[:, :k]  # a row stride that is not K, as a gate half has
    aux = torch.randn(m, 2 * k, dtype=dtype, device=dev)[:, k:]
    if kind == "plain":
        return x, Prologue(PLAIN), x
    if kind in ACTIVATIONS:
        return x, Prologue(ACT_MUL, aux=aux, activation=ACTIVATIONS[kind]), act_and_mul_reference(x, aux, kind)
    gemma = kind.endswith("gemma")
    w = torch.randn(k, dtype=dtype, device=dev) * 0.3 + (0.0 if gemma else 1.0)
    offset, cast_to = (1.0, None) if gemma else (0.0, dtype)
    residual = aux if kind.startswith("add") else None
    summed = torch.empty(m, k, dtype=dtype, device=dev) if residual is not None else None
    rows = x if residual is None else (x + residual)
    expected = rms_norm_reference(rows, w, 1e-5, offset, cast_to, dtype)
    prologue = Prologue(RMS_NORM, aux=residual, norm_weight=w, eps=1e-5, weight_offset=offset,
                        summed=summed)
    return x, prologue, expected


@pytest.mark.parametrize("kind", ["plain", "silu", "gelu_tanh", "norm", "add_norm", "add_norm_gemma"])
@pytest.mark.parametrize("m,n,k", [(1, 19, 300), (3, 40, 1030), (8, 5, 37)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_m_linear_prologue_equals_the_producer_then_the_linear(kind, m, n, k, dtype):
    """The GEMV that computes its own input (a norm, with the residual sum stored once; act(gate) * up) gives what
    the producer's op followed by F.linear gives, for every tile, at K no block divides."""
    from ksbackend.kernels.small_m_linear import TILE_BY_NAME
    from ksbackend.kernels.small_m_linear import candidate_names
    from ksbackend.kernels.small_m_linear import small_m_linear_triton

    dev = device_for_test()
    x, prologue, produced = prologue_case(kind, m, k, dtype, dev)
    w = torch.randn(n, k, dtype=dtype, device=dev) / k**0.5
    b = torch.randn(n, dtype=dtype, device=dev)
    ref = torch.nn.functional.linear(produced.float(), w.float(), b.float()).to(dtype)
    for name in candidate_names(m):
        if name.startswith("Triton"):
            if prologue.summed is not None:
                prologue.summed.normal_()  # stale values: the kernel must write every element
            torch.testing.assert_close(small_m_linear_triton(x, w, b, TILE_BY_NAME[name], prologue=prologue), ref,
                                       **TOL[dtype])
            if prologue.summed is not None:
                # (to a tolerance: the interpreter rounds to bf16 its own way)
                torch.testing.assert_close(prologue.summed, x + prologue.aux, **TOL[dtype])


@pytest.mark.parametrize("fused", [True, False])
def test_fused_linear_ops_on_cuda_run_the_prologue_only_where_the_gemv_won(fused, monkeypatch):
    """The CUDA implementations of the three fused ops (run here by the interpreter on CPU tensors): with a Triton
    tile chosen for the shape, one GEMV launch computes the producer too; with cuBLAS chosen, the producer's kernel
    and then the linear. Both against the op's reference, and the residual sum alike."""
    import ksbackend.kernels as kernels

    from ksbackend.kernels import small_m_linear

    dev = device_for_test()
    monkeypatch.delenv("KERNELSTACK_GEMV_PROLOGUE", raising=False)  # off by default: the shape is not even asked
    assert small_m_linear.fused_tile(None, None, None) is None
    launches = []
    real_launch = small_m_linear.small_m_linear_triton

    def launch(x2d, weight, bias, tile, static_weight=False, prologue=None):
        launches.append(prologue)
        return real_launch(x2d, weight, bias, tile, static_weight, prologue)

    monkeypatch.setattr(small_m_linear, "small_m_linear_triton", launch)
    monkeypatch.setattr(small_m_linear, "fused_tile", lambda *a: (8, 512, 4) if fused else None)
    monkeypatch.setattr(small_m_linear.SHAPE_CHOICES, "choose", lambda *a: "cuBLAS")  # the unfused linear's pick
    dtype = torch.bfloat16
    x, residual = torch.randn(2, 1, 96, dtype=dtype, device=dev), torch.randn(2, 1, 96, dtype=dtype, device=dev)
    norm_w = torch.randn(96, dtype=dtype, device=dev)
    weights = [torch.randn(n, 96, dtype=dtype, device=dev) / 10 for n in (24, 8)]
    cases = [(kernels._add_rms_norm_linear, ks.add_rms_norm_linear, (x, residual, norm_w, 1e-6, 0.0, dtype, dtype)),
             (kernels._rms_norm_linear, ks.rms_norm_linear, (x, norm_w, 1e-6, 1.0, None, dtype)),
             (kernels._act_and_mul_linear, ks.act_and_mul_linear, (x, residual, "silu"))]
    for cuda_impl, op, args in cases:
        launches.clear()
        got, expected = cuda_impl(*args, weights, []), op(*args, weights, [])
        for g, e in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, expected))):
            torch.testing.assert_close(g, e, **TOL[dtype])
        assert (launches != [] and launches[0] is not None) == fused, (op, launches)


def test_gemm_choice_is_not_fooled_by_a_gpu_that_speeds_up_while_it_times(monkeypatch):
    """Clocks still rising after a compile: each timing is 3 us faster than the one before. Timed one candidate
    after the other, the last would win; in forward-and-backward rounds, the truly fastest (cuBLAS mv) does."""
    from ksbackend.kernels import small_m_linear

    true_us = {"cuBLAS": 12.0, "cuBLAS mv": 10.0, **{name: 11.0 for name in small_m_linear.TILE_BY_NAME}}
    calls = []

    def drifting(burst):
        calls.append(burst.name)
        return true_us[burst.name] + 200.0 - 3.0 * len(calls)

    monkeypatch.setattr(small_m_linear, "time_us", drifting)
    names = small_m_linear.candidate_names(1)
    times = small_m_linear.time_candidates(names, torch.randn(1, 64), torch.randn(32, 64), None)
    assert min(times, key=times.get) == "cuBLAS mv"
    assert len(calls) == (2 * small_m_linear.PAIRS + 1) * len(names) and calls[:len(names)] == names


def test_a_timing_burst_cycles_through_a_rotation_of_weight_copies(monkeypatch):
    """The rotation outgrows the L2 (or is the weight alone, when that does): distinct copies with equal values,
    and a burst calls the candidate on each of them in turn."""
    from ksbackend.kernels import small_m_linear

    weight = torch.randn(96, 64)
    rotation = small_m_linear.weight_rotation(weight)
    assert len(rotation) == small_m_linear.MAX_COPIES and all(torch.equal(w, weight) for w in rotation)
    assert len({w.data_ptr() for w in rotation}) == len(rotation)
    monkeypatch.setattr(small_m_linear, "ROTATION_BYTES", 10 * weight.numel() * weight.element_size())
    assert len(small_m_linear.weight_rotation(weight)) == 10
    monkeypatch.setattr(small_m_linear, "ROTATION_BYTES", 1)
    assert small_m_linear.weight_rotation(weight) == [weight]
    seen = []
    monkeypatch.setattr(small_m_linear, "run_candidate",
                        lambda name, x, w, b, static_weight: seen.append((name, w.data_ptr(), static_weight)))
    x = torch.randn(2, 64)
    small_m_linear.Burst("cuBLAS", x, rotation[:3], None)()
    assert len(seen) == small_m_linear.MIN_CALLS and {p for _, p, _ in seen} == {w.data_ptr() for w in rotation[:3]}
    assert all(static for _, _, static in seen)  # the copies are never written, as a parameter in the graph


def test_threads_meeting_a_new_shape_time_it_once_and_agree(monkeypatch):
    """Four threads first use one shape together: one timing runs, and every thread gets its winner."""
    import threading

    from ksbackend.kernels import small_m_linear

    timings = []

    def slow_timing(names, x2d, weight, bias):
        timings.append(threading.get_ident())
        threading.Event().wait(0.2)
        return {name: 1.0 + i for i, name in enumerate(reversed(names))}

    monkeypatch.setattr(small_m_linear, "time_candidates", slow_timing)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU tensors stand in here
    choices = small_m_linear.ShapeChoices()
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    picked = []
    threads = [threading.Thread(target=lambda: picked.append(choices.choose(x, w, None))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = small_m_linear.candidate_names(3)[-1]
    assert len(timings) == 1 and picked == [last] * 4
    assert list(choices.winners) == [(4, 32, 64, torch.float32, False, None)]


@pytest.mark.cuda
def test_on_cuda_linear_cat_times_each_shape_once_and_keeps_the_winner():
    from ksbackend.kernels.small_m_linear import SHAPE_CHOICES
    from ksbackend.report import GLOBAL

    x = torch.randn(1, 1, 2048, dtype=torch.bfloat16, device="cuda")
    weights = [torch.randn(n, 2048, dtype=torch.bfloat16, device="cuda") / 45 for n in (2048, 512, 512)]
    key, key8 = ((m, 3072, 2048, torch.bfloat16, False, x.device.index) for m in (1, 8))
    with SHAPE_CHOICES.lock:  # an earlier test's model (Llama-3.2-1B's q/k/v) may have decided these shapes already
        SHAPE_CHOICES.winners.pop(key, None)
        SHAPE_CHOICES.winners.pop(key8, None)
    ref = torch.nn.functional.linear(x.float(), torch.cat(weights).float()).bfloat16()
    out = torch.ops.kernelstack.linear_cat(x, weights, [])
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    assert key in SHAPE_CHOICES.winners and {"cuBLAS", "cuBLAS mv"} <= set(SHAPE_CHOICES.winners[key][1])
    assert any("linear M<=1 N=3072 K=2048" in e for e in GLOBAL.snapshot().events)
    # 5 rows (an eager step) and 8 (the bucket a graph captures) share one decision, so one kernel serves both
    x8 = torch.randn(8, 2048, dtype=torch.bfloat16, device="cuda")
    out5, out8 = (torch.ops.kernelstack.linear_cat(x8[:m], weights, []) for m in (5, 8))
    assert key8 in SHAPE_CHOICES.winners and (5, *key8[1:]) not in SHAPE_CHOICES.winners
    if SHAPE_CHOICES.winners[key8][0].startswith("Triton"):  # same tile and BLOCK_M: bitwise the same rows
        assert torch.equal(out5, out8[:5])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the decided shape captures without timing anything
        captured = torch.ops.kernelstack.linear_cat(x, weights, [])
    x.normal_()
    graph.replay()
    torch.testing.assert_close(captured, torch.nn.functional.linear(x.float(), torch.cat(weights).float()).bfloat16(),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("hq,hk,d,page", [(4, 1, 16, 4), (6, 2, 32, 8), (8, 8, 64, 16)])
@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
@pytest.mark.parametrize("window_left", [-1, 5])
def test_triton_decode_attention_equals_the_dense_reference(hq, hk, d, page, kv_dtype, window_left):
    """Ragged lengths (1, a page boundary, long ones split and merged in the kernel), shuffled pages, a sliding
    window, fp8 K/V with scales; called twice, so the merge counters must have reset themselves."""
    from ksbackend.kernels.decode_attention import TritonDecodeWorkspace
    from ksbackend.kernels.decode_attention import decode_attention_triton
    from ksbackend.ops.paged_attention import decode_attention_reference
    from ksbackend.runtime.kv_pool import KVPool
    from ksbackend.runtime.metadata import DecodeMetadata

    dev = device_for_test()
    dtype = torch.bfloat16
    lens = torch.tensor([1, page, 3 * page + 1, 37], dtype=torch.int32, device=dev)
    width = -(-int(lens.max()) // page) + 1
    pool = KVPool(1, hk, d, 4 * width, page, torch.float8_e4m3fn if kv_dtype == "fp8" else dtype, dev)
    pool.caches[0].copy_(torch.randn(pool.caches[0].shape, device=dev).to(pool.caches[0].dtype))
    if kv_dtype == "fp8":
        pool.k_scales[0], pool.v_scales[0] = 0.5, 2.0
    table = torch.randperm(4 * width, device=dev)[:4 * width].view(4, width).to(torch.int32)
    meta = DecodeMetadata(slots=torch.zeros(4, dtype=torch.int64, device=dev), kv_lens=lens, page_table=table,
                          page_size=page)
    workspace = TritonDecodeWorkspace(8, hq, hk, d, dev)
    for splits, min_chunk, block_n in [(1, 256, None), (4, 16, 16), (4, 16, 16)]:  # None: the kernel's own block
        q = torch.randn(4, hq, d, dtype=dtype, device=dev)
        workspace.part_ml.fill_(float("nan"))
        ref = decode_attention_reference(q, 0, d**-0.5, window_left, pool, meta)
        out = decode_attention_triton(q, pool.caches[0], table, lens, d**-0.5, window_left, workspace,
                                      pool.k_scales[0], pool.v_scales[0], splits=splits, min_chunk=min_chunk,
                                      block_n=block_n)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        assert int(workspace.counts.abs().sum()) == 0
    if window_left < 0:  # (a 6-token window never splits)
        assert not workspace.part_ml.isnan().all()  # the long rows were split and merged, not one program each


@pytest.mark.parametrize("splits", [1, 4])
def test_triton_decode_attention_at_its_own_token_block_over_long_rows(splits):
    """The kernel's own block (128 tokens at these head sizes): rows of several loop steps, and with 4 splits rows
    long enough for the in-kernel merge (256 tokens a split at least), against the dense reference."""
    from ksbackend.kernels.decode_attention import TritonDecodeWorkspace
    from ksbackend.kernels.decode_attention import decode_attention_triton
    from ksbackend.kernels.decode_attention import token_block
    from ksbackend.ops.paged_attention import decode_attention_reference
    from ksbackend.runtime.kv_pool import KVPool
    from ksbackend.runtime.metadata import DecodeMetadata

    dev, d, page = device_for_test(), 32, 16
    assert token_block(d) == 128 and token_block(80) == token_block(128) == 64
    lens = torch.tensor([1, 129, 600, 257], dtype=torch.int32, device=dev)
    width = -(-int(lens.max()) // page)
    pool = KVPool(1, 2, d, 4 * width, page, torch.bfloat16, dev)
    pool.caches[0].copy_(torch.randn(pool.caches[0].shape, device=dev).to(pool.caches[0].dtype))
    table = torch.randperm(4 * width, device=dev).view(4, width).to(torch.int32)
    meta = DecodeMetadata(slots=torch.zeros(4, dtype=torch.int64, device=dev), kv_lens=lens, page_table=table,
                          page_size=page)
    workspace = TritonDecodeWorkspace(4, 8, 2, d, dev)
    q = torch.randn(4, 8, d, dtype=torch.bfloat16, device=dev)
    out = decode_attention_triton(q, pool.caches[0], table, lens, d**-0.5, -1, workspace, splits=splits)
    torch.testing.assert_close(out, decode_attention_reference(q, 0, d**-0.5, -1, pool, meta), atol=2e-2, rtol=2e-2)
    assert int(workspace.counts.abs().sum()) == 0


def test_threads_first_generating_one_chain_share_one_kernel():
    """Two models first running a norm in two threads: one module, no clash over its file."""
    import threading

    from ksbackend.kernels import generator
    from ksbackend.kernels.rms_norm import rms_norm_chain

    chain = rms_norm_chain(True, 0.5, torch.float16, torch.float16)  # a structure no other test generates
    generator._cache.pop(chain, None)
    got, start = [], threading.Barrier(4)

    def first_use():
        start.wait()
        got.append(generator.compile_chain(chain))

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(k is got[0] for k in got)


@triton.jit
def _survivors_kernel(x_ptr, out_ptr, N: tl.constexpr, KMAX: tl.constexpr, GROUPS: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), _survivors(x, KMAX, GROUPS, 128).to(tl.int8))


def _survivors_of(x, kmax, groups):
    """The candidate filter of both launches, run alone on one block (interpreted on CPU)."""
    out = torch.empty(x.numel(), dtype=torch.int8, device=x.device)
    _survivors_kernel[(1,)](x, out, x.numel(), kmax, groups)
    return out.bool()


@pytest.mark.parametrize("case", ["gaussian", "ties", "disallowed", "infinite", "equal", "few_allowed", "far_outlier",
                                  "near_outlier"])
def test_candidate_filter_keeps_every_token_of_the_top_kmax(case):
    """The histogram bound may let extra tokens through, never drop one that ranks within the best KMAX (ties with
    the KMAX-th included), and stays near KMAX on random scores."""
    dev = device_for_test()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1024, generator=g) * 4
    if case == "ties":
        x = x.round()
    if case in ("disallowed", "few_allowed"):
        x[torch.rand(1024, generator=g) < (0.5 if case == "disallowed" else 0.97)] = float("-inf")
    if case == "infinite":
        x[17] = float("inf")
    if case == "equal":
        x = torch.full((1024,), 2.5)
    if case in ("far_outlier", "near_outlier"):  # a finite mask value over whole groups stretches the range
        x[200:216] = -1e30 if case == "far_outlier" else -1e3
    kept = _survivors_of(x.to(dev), kmax=32, groups=128).cpu()
    finite = x > float("-inf")
    kth = x[finite].topk(min(32, int(finite.sum()))).values[-1]
    assert kept[finite & (x >= kth)].all()
    assert not kept[~finite].any()
    if case in ("gaussian", "far_outlier", "near_outlier"):
        assert int(kept.sum()) <= 64


@triton.jit
def _divide_kernel(x_ptr, d_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + tl.program_id(0) * N + offs, _divide(tl.load(x_ptr + offs), tl.load(d_ptr + tl.program_id(0))))


def test_temperature_division_is_ieee_division():
    """The sampler's reciprocal-and-corrections division gives torch's quotient bit for bit: random logits at every
    scale, values next to powers of two, zeros, infinities, NaN, the temperatures people use, divisors whose
    significand is all ones, and divisors out of the fast path's range (a plain division serves those)."""
    dev = device_for_test()
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    n = 4096
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-30, 31, (n,), generator=g).float()
    x[:64] = torch.ldexp(torch.ones(64), torch.arange(-90, 38, 2)) * (1 - 2.0**-24)  # just below powers of two
    x[64:70] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.0e38])
    all_ones = torch.tensor([2**24 - 1], dtype=torch.int32).float() * 2.0**-23  # 1.11...1 (binary)
    d = torch.cat([torch.tensor([0.7, 0.1, 0.3, 1.0, 1.3, 2.0, 1e-3, 2.0**-40, 2.0**40]), all_ones, all_ones / 3,
                   torch.rand(5, generator=g) * 4 + 1e-3])
    out = torch.empty(len(d), n, device=dev)
    _divide_kernel[(len(d),)](x.to(dev), d.to(dev), out, n)
    expected = x[None] / d[:, None]
    assert torch.equal(out.cpu().isnan(), expected.isnan())
    assert torch.equal(out.cpu().nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32))


def test_programmatic_dependent_launch_stays_off_where_it_cannot_run(monkeypatch):
    """The interpreter and CPUs cannot run grid-dependency waits; KERNELSTACK_PDL=0 turns it off on a GPU too."""
    from ksbackend.kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("KERNELSTACK_PDL", "0")
    assert pdl.off_reason(torch.device("cuda", 0)) == "KERNELSTACK_PDL=0"
