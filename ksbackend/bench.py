"""kernelstack benchmarks: every number is a ratio against baselines measured in the same process,
plus bandwidth utilisation against the device-to-device copy bandwidth measured in the same run.
Results, with the commands that made them: docs/benchmarks.md.

    python -m ksbackend.bench all            # attention, kernels, generate
    python -m ksbackend.bench attention      # decode attention at the anchor shapes (+ fp8 KV)
    python -m ksbackend.bench kernels        # fused add+RMSNorm, RoPE, SiLU*mul
    python -m ksbackend.bench agreement      # greedy bf16 agreement with HF eager, and HF's own spread
    python -m ksbackend.bench generate --model llama-3.2-1b
"""

import argparse
import copy
import sys
import time

import torch


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench_us(fn) -> float:
    """Median time of one call, replayed from a CUDA graph: decode runs that way, and it removes host
    launch overhead equally for every candidate, so small shapes compare kernels, not launchers."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile / JIT / autotune outside the capture
    return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")


def row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


# -- decode attention --------------------------------------------------------------------------------
def attention(bw, out):
    hq, hkv, d = 32, 8, 128
    out.append("\n### Decode attention (32 q / 8 kv heads, head_dim 128, bf16), microseconds\n")
    out.append(row(["batch, context (static max)", "HF SDPA (expand + mask)", "SDPA enable_gqa", "kernelstack (FlashInfer paged)",
                    "HBM floor", "kernelstack BW util", "vs HF SDPA", "vs enable_gqa"]))
    out.append(row(["---"] * 8))
    shapes = [(1, [1024], 4096), (1, [8192], 16384), (32, [1024] * 32, 4096),
              (32, torch.randint(64, 4097, (32,), generator=torch.Generator().manual_seed(0)).tolist(), 4096),
              (64, [2048] * 64, 4096)]
    for batch, lens, max_len in shapes:
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        cache_k = torch.randn(batch, hkv, max_len, d, device="cuda", dtype=torch.bfloat16)
        cache_v = torch.randn_like(cache_k)
        mask = torch.arange(max_len, device="cuda")[None, :] < torch.tensor(lens, device="cuda")[:, None]
        mask = mask[:, None, None, :]

        def hf_sdpa():
            k = cache_k[:, :, None].expand(batch, hkv, hq // hkv, max_len, d).reshape(batch, hq, max_len, d)
            v = cache_v[:, :, None].expand(batch, hkv, hq // hkv, max_len, d).reshape(batch, hq, max_len, d)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        def gqa_sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, enable_gqa=True)

        t_hf, t_gqa = bench_us(hf_sdpa), bench_us(gqa_sdpa)
        del cache_k, cache_v
        t_ks = decode_us(lens, hq, hkv, d, torch.bfloat16, "tensor_cores")[0]
        kv_bytes = sum(lens) * hkv * d * 2 * 2
        floor = kv_bytes / bw * 1e6
        label = f"{batch}, {'ragged 64..4096' if len(set(lens)) > 1 else lens[0]} ({max_len})"
        out.append(row([label, f"{t_hf:.1f}", f"{t_gqa:.1f}", f"{t_ks:.1f}", f"{floor:.1f}",
                        f"{floor / t_ks:.0%}", f"{t_hf / t_ks:.1f}x", f"{t_gqa / t_ks:.2f}x"]))
        print(out[-1], flush=True)
    fp8_decode(bw, out, hq, hkv, d)


def fp8_decode(bw, out, hq, hkv, d):
    """fp8 KV against bf16 KV at batch 64, context 4096: time, bandwidth and output error of each kernel."""
    from ksbackend.config import RuntimeOptions

    lens = [4096] * 64
    kv_bytes = 64 * 4096 * hkv * d * 2 * 2
    out.append(f"\n### fp8 (e4m3) KV decode, batch 64, context 4096 (KV {kv_bytes / 2**20:.0f} MiB in bf16, "
               f"{kv_bytes / 2**21:.0f} MiB in fp8), microseconds\n")
    out.append(row(["KV dtype", "decode kernel", "page size", "time", "HBM floor", "BW util",
                    "speedup vs bf16 tensor cores", "output rel. error vs bf16 KV"]))
    out.append(row(["---"] * 8))
    t_bf16 = decode_us(lens, hq, hkv, d, torch.bfloat16, "tensor_cores")[0]
    references = {}  # bf16 output per page size: the random K/V fill depends on the pool's shape
    for kv_dtype, kernel, page in [(torch.bfloat16, "tensor_cores", None), (torch.bfloat16, "xqa", None),
                                   (torch.float8_e4m3fn, "tensor_cores", None), (torch.float8_e4m3fn, "cuda_cores", None),
                                   (torch.float8_e4m3fn, "xqa", 16), (torch.float8_e4m3fn, "xqa", None)]:
        label = [str(kv_dtype).replace("torch.", ""), kernel, page or f"{RuntimeOptions().page_size} (default)"]
        try:
            t, result = decode_us(lens, hq, hkv, d, kv_dtype, kernel, page)
        except Exception as exc:  # a kernel this FlashInfer build cannot run here: say so, keep the table
            out.append(row(label + [f"failed: {type(exc).__name__}: {str(exc)[:120]}", "", "", "", ""]))
            print(out[-1], flush=True)
            continue
        if page not in references:
            references[page] = decode_us(lens, hq, hkv, d, torch.bfloat16, "tensor_cores", page)[1].float()
        reference = references[page]
        floor = kv_bytes * torch.empty(0, dtype=kv_dtype).element_size() / 2 / bw * 1e6
        rel = ((result.float() - reference).norm() / reference.norm()).item()
        out.append(row(label + [f"{t:.1f}", f"{floor:.1f}", f"{floor / t:.0%}", f"{t_bf16 / t:.2f}x", f"{rel:.2%}"]))
        print(out[-1], flush=True)


def decode_us(lens, hq, hkv, d, kv_dtype, decode_kernel, page=None):
    """Time one layer's decode over ``lens`` (random K/V, same draw for every dtype); returns (us, output).
    Pages default to what ``ksbackend.optimize`` uses."""
    from ksbackend.config import RuntimeOptions
    from ksbackend.runtime.flashinfer_attention import FlashInferAttention
    from ksbackend.runtime.kv_pool import KVPool

    page = page or RuntimeOptions().page_size
    pool = KVPool(1, hkv, d, sum(-(-n // page) for n in lens) + 1, page, kv_dtype, "cuda")
    kv = torch.randn(pool.caches[0].shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(1))
    pool.caches[0].copy_(kv)  # fp8: scale 1.0, values well inside e4m3's range
    del kv
    attention = FlashInferAttention(pool, hq, torch.bfloat16, d ** -0.5, -1, decode_kernel=decode_kernel)
    attention.k_scale[0] = attention.v_scale[0] = 1.0
    meta = pool.extend(list(range(len(lens))), lens)
    meta.max_q_len = 1  # time the decode kernel over these contexts
    attention.plan(meta)
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(2))
    return bench_us(lambda: attention.decode.run(q, 0)), attention.decode.run(q, 0)


# -- norm / rope / activation kernels ----------------------------------------------------------------
def kernels(bw, out):
    import flashinfer

    from ksbackend.kernels.act_and_mul import act_and_mul_triton
    from ksbackend.kernels.rms_norm import rms_norm_triton
    from ksbackend.kernels.rope import rope_triton
    from ksbackend.ops.rope import rotate_half

    bf16 = dict(device="cuda", dtype=torch.bfloat16)

    def eager_add_norm(x, r, w):
        s = x + r
        h = s.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype), s

    compiled_add_norm = torch.compile(eager_add_norm)
    out.append("\n### Fused residual add + RMSNorm (bf16, eps 1e-5), microseconds\n")
    out.append(row(["tokens x hidden", "eager (HF chain)", "torch.compile", "flashinfer fused_add_rmsnorm",
                    "kernelstack (generated)", "HBM floor", "BW util", "vs compile", "vs flashinfer"]))
    out.append(row(["---"] * 9))
    for n, h in [(1, 2048), (32, 4096), (4096, 4096)]:
        x, r, w = torch.randn(n, h, **bf16), torch.randn(n, h, **bf16), torch.randn(h, **bf16)
        t_eager = bench_us(lambda: eager_add_norm(x, r, w))
        t_comp = bench_us(lambda: compiled_add_norm(x, r, w))
        xi, ri = x.clone(), r.clone()
        t_fi = bench_us(lambda: flashinfer.fused_add_rmsnorm(xi, ri, w, 1e-5))
        t_ks = bench_us(lambda: rms_norm_triton(x, w, 1e-5, 0.0, torch.bfloat16, torch.bfloat16, residual=r))
        floor = (4 * n * h + h) * 2 / bw * 1e6
        out.append(row([f"{n} x {h}", f"{t_eager:.1f}", f"{t_comp:.1f}", f"{t_fi:.1f}", f"{t_ks:.1f}", f"{floor:.1f}",
                        f"{floor / t_ks:.0%}", f"{t_comp / t_ks:.2f}x", f"{t_fi / t_ks:.2f}x"]))
        print(out[-1], flush=True)

    def eager_rope(q, k, cos, sin):
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    compiled_rope = torch.compile(eager_rope)
    out.append("\n### RoPE on q and k (bf16, 32 q / 8 kv heads, head_dim 128), microseconds\n")
    out.append(row(["tokens", "eager (HF chain)", "torch.compile", "kernelstack", "HBM floor", "BW util", "vs compile"]))
    out.append(row(["---"] * 7))
    for t in (1, 32, 4096):
        q = torch.randn(1, t, 32, 128, **bf16).transpose(1, 2)
        k = torch.randn(1, t, 8, 128, **bf16).transpose(1, 2)
        ang = torch.rand(1, 1, t, 128, device="cuda") * 6.3
        cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        t_eager = bench_us(lambda: eager_rope(q, k, cos, sin))
        t_comp = bench_us(lambda: compiled_rope(q, k, cos, sin))
        t_ks = bench_us(lambda: rope_triton(q, k, cos, sin))
        floor = (2 * t * 40 * 128 + 2 * t * 128) * 2 / bw * 1e6
        out.append(row([t, f"{t_eager:.1f}", f"{t_comp:.1f}", f"{t_ks:.1f}", f"{floor:.1f}", f"{floor / t_ks:.0%}",
                        f"{t_comp / t_ks:.2f}x"]))
        print(out[-1], flush=True)

    def eager_silu(g, u):
        return torch.nn.functional.silu(g) * u

    compiled_silu = torch.compile(eager_silu)
    out.append("\n### SiLU(gate) * up (bf16), microseconds\n")
    out.append(row(["tokens x intermediate", "eager", "torch.compile", "flashinfer silu_and_mul", "kernelstack (generated)",
                    "HBM floor", "BW util", "vs compile"]))
    out.append(row(["---"] * 8))
    for n, h in [(1, 8192), (32, 14336), (4096, 14336)]:
        g, u = torch.randn(n, h, **bf16), torch.randn(n, h, **bf16)
        gu = torch.cat([g, u], -1)
        t_eager, t_comp = bench_us(lambda: eager_silu(g, u)), bench_us(lambda: compiled_silu(g, u))
        t_fi = bench_us(lambda: flashinfer.silu_and_mul(gu))
        t_ks = bench_us(lambda: act_and_mul_triton(g, u, "silu"))
        floor = 3 * n * h * 2 / bw * 1e6
        out.append(row([f"{n} x {h}", f"{t_eager:.1f}", f"{t_comp:.1f}", f"{t_fi:.1f}", f"{t_ks:.1f}", f"{floor:.1f}",
                        f"{floor / t_ks:.0%}", f"{t_comp / t_ks:.2f}x"]))
        print(out[-1], flush=True)


# -- end to end ----------------------------------------------------------------------------------------
def generate(bw, out, model_name, batch, new_tokens):
    import ksbackend
    from ksbackend.agreement import agreement_rate
    from ksbackend.models import build_model, left_pad, real_config

    model = build_model(real_config(model_name), dtype=torch.bfloat16, device="cuda")
    generator = torch.Generator().manual_seed(0)
    lengths = [128] if batch == 1 else torch.randint(64, 1025, (batch,), generator=generator).tolist()
    prompts, mask = left_pad([torch.randint(3, model.config.vocab_size, (n,), generator=generator) for n in lengths],
                             device="cuda")
    width = prompts.shape[1]
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return result, (time.perf_counter() - start) * 1e3 / new_tokens

    model.generate(prompts, **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm up HF eager too
    hf_out, t_eager = timed(lambda: model.generate(prompts, **kwargs))
    static_kwargs = dict(kwargs, cache_implementation="static")
    t0 = time.perf_counter()
    model.generate(prompts, **static_kwargs)  # HF compiles its static-cache forward with Inductor here
    compile_s = time.perf_counter() - t0
    _, t_static = timed(lambda: model.generate(prompts, **static_kwargs))
    ks_model = copy.deepcopy(model)
    ksbackend.optimize(ks_model)
    ks_kwargs = dict(kwargs)
    ks_kwargs.pop("min_new_tokens")
    t0 = time.perf_counter()
    ks_model.generate(prompts, **ks_kwargs)
    ks_compile_s = time.perf_counter() - t0
    ks_out, t_ks = timed(lambda: ks_model.generate(prompts, **ks_kwargs))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = weights / bw * 1e3
    same = agreement_rate(hf_out, ks_out, width)
    shape = f"{batch} / {'128' if batch == 1 else 'ragged 64..1024'} / {new_tokens}"
    out.append(row([model_name, shape, f"{t_eager:.2f}", f"{t_static:.2f}", f"{t_ks:.2f}", f"{floor:.2f}",
                    f"{t_eager / t_ks:.2f}x", f"{t_static / t_ks:.2f}x", f"{same:.0%}",
                    f"{compile_s:.0f} s / {ks_compile_s:.0f} s"]))
    print(out[-1], flush=True)
    print(ksbackend.explain(ks_model), flush=True)


# -- greedy agreement ----------------------------------------------------------------------------------
AGREEMENT_HEADER = ["family / weights", "HF eager-attention vs HF SDPA", "HF one prompt at a time vs batched",
                    "kernelstack vs HF", "kernelstack fp8 KV vs HF", "kernelstack first divergences (token index)",
                    "fp32 margin at kernelstack divergences (median / max, in logit std)",
                    "at those, fp32 argmax = HF / = kernelstack"]


def agreement(out, family, weights, new_tokens=64):
    """Greedy bf16 agreement of kernelstack with HF eager (SDPA, batched), next to HF's own spread."""
    import statistics

    import ksbackend
    from ksbackend.agreement import agreement_rate, agreement_setup, divergences, first_divergences
    from ksbackend.hf import _attention_implementation

    model, ids, mask = agreement_setup(family, weights, "cuda")
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, attention_mask=mask, **kwargs)
    with _attention_implementation(model, "eager"):
        eager_attention = model.generate(ids, attention_mask=mask, **kwargs)
    single = reference.clone()
    for i in range(len(ids)):
        prompt = ids[i][mask[i].bool()][None]
        new = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)[0, prompt.shape[1]:]
        single[i, width:width + len(new)] = new
    candidate = ksbackend.optimize(copy.deepcopy(model)).generate(ids, attention_mask=mask, **kwargs)
    fp8_candidate = ksbackend.optimize(copy.deepcopy(model), kv_cache_dtype="fp8_e4m3").generate(ids, attention_mask=mask, **kwargs)
    found = divergences(copy.deepcopy(model).float(), ids, mask, reference, candidate)
    firsts = sorted(f for f in first_divergences(reference, candidate, width) if f is not None)
    margins = [d.margin for d in found]
    out.append(row([f"{family} / {weights}", f"{agreement_rate(reference, eager_attention, width):.0%}",
                    f"{agreement_rate(reference, single, width):.0%}", f"{agreement_rate(reference, candidate, width):.0%}",
                    f"{agreement_rate(reference, fp8_candidate, width):.0%}",
                    ", ".join(map(str, firsts)) or "none",
                    f"{statistics.median(margins):.3f} / {max(margins):.3f}" if margins else "-",
                    f"{sum(d.reference_right for d in found)} / {sum(d.candidate_right for d in found)} of {len(found)}"]))
    print(out[-1], flush=True)


GENERATE_HEADER = ["model", "batch / prompts / new", "HF eager ms/tok", "HF static + inductor ms/tok",
                   "kernelstack ms/tok", "weights floor ms/tok", "vs eager", "vs static+inductor",
                   "greedy = HF eager", "first call: HF static / kernelstack"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ksbackend.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["all", "attention", "kernels", "agreement", "generate"])
    parser.add_argument("--model", action="append", help="for generate (repeatable); default llama-3.2-1b")
    parser.add_argument("--batch", type=int, action="append", help="for generate (repeatable); default 1 and 32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", help="also write the markdown tables here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the benchmarks measure GPU kernels: run them on a CUDA machine")
    bw = copy_bandwidth()
    out = [f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth measured in this run: "
           f"{bw / 1e12:.2f} TB/s (bytes read + written). Command: `python -m ksbackend.bench {' '.join(argv or sys.argv[1:])}`"]
    print(out[0], flush=True)
    if args.what in ("all", "attention"):
        attention(bw, out)
    if args.what in ("all", "kernels"):
        kernels(bw, out)
    if args.what in ("all", "agreement"):
        out.append("\n### Greedy agreement with HF eager (bf16; 4 layers, hidden 512, 8/2 heads; 32 ragged prompts, "
                   "64 new tokens; HF = batched generate with SDPA)\n")
        out.append(row(AGREEMENT_HEADER))
        out.append(row(["---"] * len(AGREEMENT_HEADER)))
        for family in ("llama", "qwen3"):
            for weights in ("random", "copy-task"):
                agreement(out, family, weights)
    if args.what in ("all", "generate"):
        out.append("\n### model.generate (greedy, ms per generated token, prefill included)\n")
        out.append(row(GENERATE_HEADER))
        out.append(row(["---"] * len(GENERATE_HEADER)))
        for name in args.model or ["llama-3.2-1b"]:
            for batch in args.batch or [1, 32]:
                generate(bw, out, name, batch, args.new_tokens)
    text = "\n".join(out)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
