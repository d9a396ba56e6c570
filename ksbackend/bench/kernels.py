"""The generated and hand-written Triton kernels against eager, torch.compile and FlashInfer: fused
add+RMSNorm, RoPE on q and k, SiLU*mul, the fused sampler, and the small-M GEMV against cuBLAS."""

import torch

from .common import bench_us
from .common import table

BF16 = dict(device="cuda", dtype=torch.bfloat16)


def add_rms_norm(bw, out):
    import flashinfer

    from ksbackend.kernels.rms_norm import rms_norm_triton

    def eager(x, r, w):
        s = x + r
        h = s.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype), s

    compiled = torch.compile(eager)

    def rows():
        for n, h in [(1, 2048), (32, 4096), (4096, 4096)]:
            x, r, w = torch.randn(n, h, **BF16), torch.randn(n, h, **BF16), torch.randn(h, **BF16)
            t_eager, t_comp = bench_us(lambda: eager(x, r, w)), bench_us(lambda: compiled(x, r, w))
            xi, ri = x.clone(), r.clone()
            t_fi = bench_us(lambda: flashinfer.fused_add_rmsnorm(xi, ri, w, 1e-5))
            t_ks = bench_us(lambda: rms_norm_triton(x, w, 1e-5, 0.0, torch.bfloat16, torch.bfloat16, residual=r))
            floor = (4 * n * h + h) * 2 / bw * 1e6
            yield [f"{n} x {h}", f"{t_eager:.1f}", f"{t_comp:.1f}", f"{t_fi:.1f}", f"{t_ks:.1f}", f"{floor:.1f}",
                   f"{floor / t_ks:.0%}", f"{t_comp / t_ks:.2f}x", f"{t_fi / t_ks:.2f}x"]

    table(out, "Fused residual add + RMSNorm (bf16, eps 1e-5), microseconds",
          ["tokens x hidden", "eager (HF chain)", "torch.compile", "flashinfer fused_add_rmsnorm",
           "kernelstack (generated)", "HBM floor", "BW util", "vs compile", "vs flashinfer"], rows())


def rope(bw, out):
    from ksbackend.kernels.rope import rope_triton
    from ksbackend.ops.rope import rotate_half

    def eager(q, k, cos, sin):
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    compiled = torch.compile(eager)

    def rows():
        for t in (1, 32, 4096):
            q = torch.randn(1, t, 32, 128, **BF16).transpose(1, 2)
            k = torch.randn(1, t, 8, 128, **BF16).transpose(1, 2)
            angle = torch.rand(1, 1, t, 128, device="cuda") * 6.3
            cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
            t_eager, t_comp = bench_us(lambda: eager(q, k, cos, sin)), bench_us(lambda: compiled(q, k, cos, sin))
            t_ks = bench_us(lambda: rope_triton(q, k, cos, sin))
            floor = (2 * t * 40 * 128 + 2 * t * 128) * 2 / bw * 1e6
            yield [t, f"{t_eager:.1f}", f"{t_comp:.1f}", f"{t_ks:.1f}", f"{floor:.1f}", f"{floor / t_ks:.0%}",
                   f"{t_comp / t_ks:.2f}x"]

    table(out, "RoPE on q and k (bf16, 32 q / 8 kv heads, head_dim 128), microseconds",
          ["tokens", "eager (HF chain)", "torch.compile", "kernelstack", "HBM floor", "BW util", "vs compile"], rows())


def silu_and_mul(bw, out):
    import flashinfer

    from ksbackend.kernels.act_and_mul import act_and_mul_triton

    def eager(g, u):
        return torch.nn.functional.silu(g) * u

    compiled = torch.compile(eager)

    def rows():
        for n, h in [(1, 8192), (32, 14336), (4096, 14336)]:
            g, u = torch.randn(n, h, **BF16), torch.randn(n, h, **BF16)
            gu = torch.cat([g, u], -1)
            t_eager, t_comp = bench_us(lambda: eager(g, u)), bench_us(lambda: compiled(g, u))
            t_fi = bench_us(lambda: flashinfer.silu_and_mul(gu))
            t_ks = bench_us(lambda: act_and_mul_triton(g, u, "silu"))
            floor = 3 * n * h * 2 / bw * 1e6
            yield [f"{n} x {h}", f"{t_eager:.1f}", f"{t_comp:.1f}", f"{t_fi:.1f}", f"{t_ks:.1f}", f"{floor:.1f}",
                   f"{floor / t_ks:.0%}", f"{t_comp / t_ks:.2f}x"]

    table(out, "SiLU(gate) * up (bf16), microseconds",
          ["tokens x intermediate", "eager", "torch.compile", "flashinfer silu_and_mul", "kernelstack (generated)",
           "HBM floor", "BW util", "vs compile"], rows())


def sampler(bw, out):
    """Temperature 0.7, top-k 50, top-p 0.9 over Llama-3's vocabulary, fp32 logits: HF's warper chain as
    torch ops, FlashInfer's fused sampler, kernelstack's (inside a CUDA graph, as decode runs it)."""
    import flashinfer

    from transformers.generation.logits_process import TemperatureLogitsWarper
    from transformers.generation.logits_process import TopKLogitsWarper
    from transformers.generation.logits_process import TopPLogitsWarper

    from ksbackend.ops.sampling import SamplingParams

    vocab = 128256
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)]

    def hf(logits):
        scores = logits
        for w in warpers:
            scores = w(None, scores)
        return torch.multinomial(scores.softmax(-1), 1)

    def rows():
        for batch in (1, 32, 128):
            logits = torch.randn(batch, vocab, device="cuda") * 3
            params = SamplingParams.from_values(batch, "cuda", temperature=0.7, top_k=50, top_p=0.9)
            seed, offset = torch.tensor([1], device="cuda"), torch.tensor([0], device="cuda")
            generator = torch.Generator("cuda").manual_seed(0)
            t_hf = bench_us(lambda: hf(logits))
            t_fi = bench_us(lambda: flashinfer.sampling.top_k_top_p_sampling_from_logits(
                logits / 0.7, 50, 0.9, generator=generator))
            t_ks = bench_us(lambda: params.sample(logits, seed, offset))
            floor = batch * vocab * 4 / bw * 1e6
            yield [batch, f"{t_hf:.1f}", f"{t_fi:.1f}", f"{t_ks:.1f}", f"{floor:.1f}", f"{t_hf / t_ks:.1f}x",
                   f"{t_fi / t_ks:.2f}x"]

    table(out, "Sampling over a 128256-token vocabulary (fp32 logits, temperature 0.7, top-k 50, top-p 0.9), "
               "microseconds",
          ["batch", "HF warpers (torch)", "flashinfer top_k_top_p", "kernelstack (Triton)", "floor (read once)",
           "vs HF", "vs flashinfer"], rows())


def sampler_launches(bw, out):
    """The fused sampler split into its two launches (profiler), at the default launch shape and the sweep's
    alternatives: where its time goes, by batch size."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    from ksbackend.kernels.sampler import sample_triton
    from ksbackend.ops.sampling import SamplingParams

    shapes = [dict(), dict(chunk=2048, warps=4, row_warps=16), dict(chunk=4096, warps=8, row_warps=16)]

    def per_launch(call):
        call()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                call()
            torch.cuda.synchronize()
        return {e.key: e.device_time_total / e.count for e in prof.key_averages()
                if e.device_type.name == "CUDA" and e.count >= 50}

    def rows():
        for batch in (1, 32):
            logits = torch.randn(batch, 128256, device="cuda") * 3
            p = SamplingParams.from_values(batch, "cuda", temperature=0.7, top_k=50, top_p=0.9)
            seed, offset = torch.tensor([1], device="cuda"), torch.tensor([0], device="cuda")
            for shape in shapes:
                def call():
                    return sample_triton(logits, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                                         p.frequency_penalty, p.presence_penalty, None, None, p.greedy, seed, offset,
                                         **shape)
                launches = per_launch(call)
                us = [f"{launches[name]:.1f}" if name in launches else "-" for name in ("_chunk_kernel", "_row_kernel")]
                yield [batch, shape or "default", f"{bench_us(call):.1f}", *us]

    table(out, "The fused sampler by launch (V 128256, T 0.7, top-k 50, top-p 0.9), microseconds",
          ["batch", "launch shape", "total (CUDA graph)", "launch 1: chunk lists", "launch 2: row merge + draw"],
          rows())


# (model, projection, N, K) at the decode shapes of the benchmark models: the fused ones go through linear_cat
PROJECTIONS = [("Llama-3.2-1B", "qkv", 3072, 2048), ("Llama-3.2-1B", "gate_up", 16384, 2048),
               ("Llama-3.2-1B", "o", 2048, 2048), ("Llama-3.2-1B", "down", 2048, 8192),
               ("Llama-3.1-8B / Mistral-7B", "qkv", 6144, 4096), ("Llama-3.1-8B / Mistral-7B", "gate_up", 28672, 4096),
               ("Qwen2.5-7B", "qkv (bias)", 4608, 3584), ("Qwen2.5-7B", "gate_up", 37888, 3584),
               ("135M", "qkv", 960, 576), ("135M", "gate_up", 3072, 576)]


def small_m_gemm(bw, out):
    """cuBLAS against the Triton GEMV tiles at decode shapes, calls back to back over weight copies that outgrow the
    L2 (as in a decode step): the measurement ``linear_cat`` repeats per shape to pick its kernel."""
    from ksbackend.kernels.small_m_linear import candidate_names
    from ksbackend.kernels.small_m_linear import time_candidates

    def rows():
        for model, proj, n, k in PROJECTIONS:
            weight = torch.randn(n, k, **BF16) / k**0.5
            bias = torch.randn(n, **BF16) if "bias" in proj else None
            for m in (1, 4, 8):
                x = torch.randn(m, k, **BF16)
                times = time_candidates(candidate_names(m), x, weight, bias)
                best = min(times, key=times.get)
                triton_best = min((t for name, t in times.items() if name.startswith("Triton")))
                floor = n * k * 2 / bw * 1e6
                mv = f"{times['cuBLAS mv']:.1f}" if "cuBLAS mv" in times else "-"  # timed at one row only
                yield [model, proj, f"{m} x {n} x {k}", f"{times['cuBLAS']:.1f}", mv, f"{triton_best:.1f}",
                       f"{floor:.1f}", best, f"{floor / times[best]:.0%}", f"{times['cuBLAS'] / times[best]:.2f}x"]

    table(out, "Small-M projections: cuBLAS against the Triton GEMV (bf16, weights streamed past the L2), microseconds",
          ["model", "projection", "M x N x K", "cuBLAS", "cuBLAS mv (M=1)", "best Triton tile", "weight-read floor",
           "winner", "winner BW util", "winner vs cuBLAS"], rows())


def run(bw, out):
    add_rms_norm(bw, out)
    rope(bw, out)
    silu_and_mul(bw, out)
    sampler(bw, out)
    sampler_launches(bw, out)
    small_m_gemm(bw, out)
